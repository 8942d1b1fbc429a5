"""Checkpoint mistakes: a checkpoint that does not fit the model lists the keys; unsafe pickles are refused and
their payload never runs; a truncated checkpoint is reported and the previous complete one used."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


class _Payload:
    """Unpickling this runs ``touch SENTINEL`` (through os.system): a loader that runs it is unsafe."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def _reseal(checkpoint: Path) -> None:
    """Rewrite COMPLETE.json to match the files as they are now, so that only the loader's own safety is tested."""
    marker = json.loads((checkpoint / "COMPLETE.json").read_text())
    for name in marker["files"]:
        data = (checkpoint / name).read_bytes()
        marker["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "COMPLETE.json").write_text(json.dumps(marker))


RUN = ["device=cpu", "batch_size=8", "dataset.train_samples=32", "dataset.validation_samples=16",
       "dataset.image_size=16", "model.image_size=16", "eval.batch_size=16", "eval.every_n_steps=100",
       "log.every_n_steps=1", "checkpoint.every_n_steps=2", "checkpoint.keep=3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with checkpoints at steps 2 and 4 (shared: cases copy it before changing anything)."""
    import contextlib
    import io

    from mmtrain.cli.main import main

    out = tmp_path_factory.mktemp("trained") / "run"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["run", "contrastive", "--config", "align_tiny", f"output_dir={out}", "max_steps=4", *RUN]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    return out


@pytest.fixture
def run_copy(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def _resume(cli, run: Path, *overrides, resume=None, max_steps=6):
    argv = ["run", "contrastive", "--config", "align_tiny", f"output_dir={run}", f"max_steps={max_steps}", *RUN]
    if resume is not None:
        argv.append(f"resume={resume}")
    return cli(argv + list(overrides))


SHAPE_CASES = [  # the trained run: align_tiny's 1-layer, 32-wide text tower
    pytest.param(["model.intermediate_size=96"], ["does not fit the model", "shape mismatches",
                 "layer.0.intermediate.dense.weight (64, 32) vs model (96, 32)"], id="wrong-shapes-listed"),
    pytest.param(["model.num_hidden_layers=2"], ["does not fit the model", "missing keys", "layer.1.attention"],
                 id="missing-keys-listed"),
    pytest.param(["model.hidden_size=48"], ["does not fit the model", "shape mismatches", "more)"],
                 id="many-mismatches-counted"),
]


@pytest.mark.parametrize("overrides, expected", SHAPE_CASES)
def test_checkpoint_that_does_not_fit_lists_keys(cli, one_line, run_copy, overrides, expected):
    before = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    one_line(_resume(cli, run_copy, *overrides), "step_00000004", *expected)
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == before  # nothing overwritten


def test_malicious_checkpoint_index_is_refused_and_never_runs(cli, one_line, run_copy, tmp_path):
    sentinel = tmp_path / "pwned"
    newest = run_copy / "checkpoints" / "step_00000004"
    (newest / ".metadata").write_bytes(pickle.dumps(_Payload(sentinel)))
    _reseal(newest)  # checksums match: only the restricted unpickler stands in the way
    one_line(_resume(cli, run_copy, resume=newest), ".metadata", "refusing to load posix.system")
    assert not sentinel.exists()


def test_malicious_pytorch_model_bin_is_refused_and_never_runs(tmp_path):
    import torch

    from mmtrain.errors import CheckpointError
    from mmtrain.models.align import AlignModel
    from mmtrain.models.align.builders import align_tiny

    folder = tmp_path / "hf"
    align_tiny(vocab_size=72, image_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32, vision_width=16).save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    sentinel = tmp_path / "pwned"
    torch.save({"text_model.embeddings.word_embeddings.weight": _Payload(sentinel)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot read weights") as info:
        AlignModel.from_pretrained(folder)
    assert "\n" not in str(info.value)
    assert not sentinel.exists()


def test_truncated_newest_checkpoint_falls_back_to_previous(cli, run_copy):
    shard = next((run_copy / "checkpoints" / "step_00000004").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = _resume(cli, run_copy)
    assert result.status == 0, result.err
    assert "incomplete or corrupted" in result.out and "truncated" in result.out
    assert f"resumed from {run_copy / 'checkpoints' / 'step_00000002'} (step 2)" in result.out


def test_truncated_checkpoint_named_explicitly_is_one_line(cli, one_line, run_copy):
    newest = run_copy / "checkpoints" / "step_00000004"
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    one_line(_resume(cli, run_copy, resume=newest), f"resume={newest}", "truncated")


def test_half_written_checkpoint_without_marker_is_never_loaded(cli, one_line, run_copy):
    newest = run_copy / "checkpoints" / "step_00000004"
    (newest / "COMPLETE.json").unlink()
    one_line(_resume(cli, run_copy, resume=newest), f"resume={newest}", "COMPLETE.json")


def test_resume_folder_without_checkpoints(cli, one_line, tmp_path, run_copy):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line(_resume(cli, run_copy, resume=empty), f"resume={empty}", "no complete checkpoint")


# ----------------------------------------------------------------------- no traceback, in a fresh process
def test_fresh_processes_print_one_line_and_no_traceback(tmp_path, trained):
    """The console entry point in new processes (run side by side): exit 2, one stderr line, no traceback."""
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("max_steps: [1, 2\n")
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    newest = run / "checkpoints" / "step_00000004"
    (newest / ".metadata").write_bytes(pickle.dumps(_Payload(tmp_path / "pwned")))
    _reseal(newest)
    commands = {
        "yaml": ["run", "contrastive", "--config", str(bad_yaml)],
        "data": ["run", "contrastive", "--config", "align_tiny", f"output_dir={tmp_path / 'o'}", "dataset=image_folder",
                 f"dataset.path={tmp_path / 'nowhere'}",
                 "device=cpu"],
        "pickle": ["run", "contrastive", "--config", "align_tiny", f"output_dir={run}", f"resume={newest}", *RUN],
    }
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = {name: subprocess.Popen([sys.executable, "-m", "mmtrain.cli.main", *argv], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env)
             for name, argv in commands.items()}
    expected = {"yaml": "bad.yaml:2", "data": "nowhere", "pickle": "refusing to load"}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, (name, err)
        assert "Traceback" not in err, (name, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected[name] in lines[0], (name, err)
    assert not (tmp_path / "pwned").exists()
