"""The completion marker carries a size and a sha256 for every file, and a checkpoint *corrupted*
in place (same size, one byte flipped: what a bad disk or a partial overwrite leaves, which a size check alone
misses) is reported and the previous complete one used; the resumed run then ends bit-identical to a straight run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

RUN = ["device=cpu", "batch_size=8", "dataset.train_samples=32", "dataset.validation_samples=16",
       "dataset.image_size=16", "model.image_size=16", "eval.batch_size=16", "eval.every_n_steps=100",
       "log.every_n_steps=1", "checkpoint.every_n_steps=2", "checkpoint.keep=3"]


def _main(out: Path, *overrides: str) -> tuple[int, str, list[str]]:
    import contextlib
    import io

    from mmtrain.cli.main import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(["run", "contrastive", "--config", "align_tiny", f"output_dir={out}", *RUN, *overrides])
    return status, stdout.getvalue(), [line for line in stderr.getvalue().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``trained``: 4 steps (checkpoints 2 and 4); ``straight``: 6 steps without interruption."""
    root = tmp_path_factory.mktemp("integrity")
    status, _, err = _main(root / "trained", "max_steps=4")
    assert status == 0, err
    status, _, err = _main(root / "straight", "max_steps=6")
    assert status == 0, err
    return root / "trained", root / "straight"


@pytest.fixture
def run_copy(runs, tmp_path):
    shutil.copytree(runs[0], tmp_path / "run")
    return tmp_path / "run"


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_marker_lists_size_and_sha256_of_every_file(runs):
    for checkpoint in sorted((runs[0] / "checkpoints").iterdir()):
        marker = json.loads((checkpoint / "COMPLETE.json").read_text())
        assert marker["step"] == int(checkpoint.name.split("_")[1]) and marker["world_size"] == 1
        on_disk = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
        assert set(marker["files"]) == on_disk - {"COMPLETE.json"}
        assert ".metadata" in marker["files"] and any(name.endswith(".distcp") for name in marker["files"])
        for name, entry in marker["files"].items():
            data = (checkpoint / name).read_bytes()
            assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


@pytest.mark.parametrize("victim", ["shard", "index"])
def test_corrupted_newest_checkpoint_falls_back_and_matches_straight_run(runs, run_copy, victim):
    from safetensors.torch import load_file

    from mmtrain.training.checkpoint import verify_checkpoint

    newest = run_copy / "checkpoints" / "step_00000004"
    target = next(newest.glob("*.distcp")) if victim == "shard" else newest / ".metadata"
    size = target.stat().st_size
    _flip_one_byte(target)
    assert target.stat().st_size == size  # not truncated: only the checksum can tell
    assert "checksum mismatch (corrupted)" in verify_checkpoint(newest)

    status, out, err = _main(run_copy, "max_steps=6")
    assert status == 0, err
    assert f"checkpoint {newest} is incomplete or corrupted ({target.name} checksum mismatch (corrupted))" in out
    assert f"resumed from {run_copy / 'checkpoints' / 'step_00000002'} (step 2)" in out
    assert verify_checkpoint(newest) is None  # rewritten by the resumed run, intact again

    straight = load_file(str(runs[1] / "model" / "model.safetensors"))
    resumed = load_file(str(run_copy / "model" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_corrupted_checkpoint_named_explicitly_is_one_line(run_copy):
    newest = run_copy / "checkpoints" / "step_00000004"
    _flip_one_byte(next(newest.glob("*.distcp")))
    written = {p: p.read_bytes() for p in sorted(run_copy.rglob("*")) if p.is_file()}
    status, _, err = _main(run_copy, "max_steps=6", f"resume={newest}")
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and f"resume={newest}" in err[0] and "checksum mismatch" in err[0]
    # nothing already written changes: checkpoints and the earlier export stay as they were
    assert {p: p.read_bytes() for p in written} == written
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
