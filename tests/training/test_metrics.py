"""MetricLogger's metrics.jsonl across a resume."""

import json

from mmtrain.training.metrics import MetricLogger, read_metrics


def _steps(path):
    return [(r["step"], sorted(k for k in r if k not in ("step", "time"))) for r in read_metrics(path)]


def test_a_resumed_logger_drops_the_rows_it_will_log_again(tmp_path):
    first = MetricLogger(tmp_path, progress_bar=False)
    for step in range(1, 6):
        first.log(step, {"loss": float(step)}, echo=False)
    first.log(4, {"val/acc": 0.5}, echo=False)
    first.close(plot=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # the line a killed run was writing

    resumed = MetricLogger(tmp_path, progress_bar=False, start_step=4)  # the checkpoint was at step 4
    resumed.log(5, {"loss": 5.5}, echo=False)
    resumed.close(plot=False)
    assert _steps(tmp_path / "metrics.jsonl") == [(1, ["loss"]), (2, ["loss"]), (3, ["loss"]), (4, ["loss"]),
                                                 (4, ["val/acc"]), (5, ["loss"])]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["loss"] == 5.5


def test_forget_after_while_open_keeps_appending(tmp_path):
    logger = MetricLogger(tmp_path, progress_bar=False)
    for step in (1, 2, 3):
        logger.log(step, {"loss": 1.0}, echo=False)
    logger.forget_after(1)
    logger.log(2, {"loss": 2.0}, echo=False)
    logger.close(plot=False)
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 2.0)]


def test_a_fresh_logger_keeps_an_earlier_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 9, "loss": 1.0}\n')
    MetricLogger(tmp_path, progress_bar=False).close(plot=False)
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 9, "loss": 1.0}]


def test_a_line_cut_by_a_killed_run_does_not_swallow_the_next_row(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    resumed = MetricLogger(tmp_path, progress_bar=False, start_step=1)
    resumed.log(2, {"loss": 2.0}, echo=False)
    resumed.close(plot=False)
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 2.0)]
