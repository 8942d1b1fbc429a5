"""`mmtrain bench scaling --smoke`: re-launches itself through torchrun on 1 and 2 gloo ranks for the tiny CLIP and
ALIGN models and writes one JSON row per (model, world size) with samples/s and the speed-up over one rank."""

from __future__ import annotations

import json
import os

import pytest

from mmtrain.bench import scaling

pytestmark = pytest.mark.slow


def test_scaling_smoke_runs_one_and_two_ranks(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "scaling.json"
    # bf16 as on GPUs: FSDP2 then hands EfficientNet's batch norms bf16 parameters beside float32 statistics.
    assert scaling.main(["--smoke", "--strategy", "ddp,fsdp:bf16", "--precision", "bf16", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["strategy"] == "ddp,fsdp:bf16"
    rows = {(r["model"], r["world_size"], r["strategy"]): r for r in report["results"]}
    # One process wraps nothing, so world size 1 runs once per model and is both variants' baseline.
    assert set(rows) == {(m, 1, "none") for m in ("clip_tiny", "align_tiny")} | {
        (m, 2, v) for m in ("clip_tiny", "align_tiny") for v in ("ddp", "fsdp:bf16")}
    for (model, world, _), row in rows.items():
        assert "error" not in row, row
        assert row["global_batch"] == row["batch_per_gpu"] * world
        assert row["samples_per_s"] == pytest.approx(row["global_batch"] / row["step_s"])
        assert row["speedup"] == pytest.approx(row["samples_per_s"] / rows[(model, 1, "none")]["samples_per_s"])
    assert rows[("clip_tiny", 1, "none")]["speedup"] == 1.0
    table = capsys.readouterr().out
    assert "clip_tiny" in table and "align_tiny" in table and "speed-up" in table
    assert os.environ.get("WORLD_SIZE") is None  # the parent never joined a process group


def test_bad_variant_is_refused_before_any_launch():
    with pytest.raises(ValueError, match="'zero3' is not ddp or fsdp"):
        scaling.main(["--smoke", "--strategy", "ddp,zero3"])
    assert scaling._variants("ddp, fsdp:bf16") == [("ddp", None), ("fsdp", "bf16")]


def test_unknown_model_is_reported():
    with pytest.raises(ValueError, match="unknown benchmark model 'vit_h14'"):
        scaling._build("vit_h14")
