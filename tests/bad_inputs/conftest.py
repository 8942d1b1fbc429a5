"""Shared helpers for the bad-input suite: run ``mmtrain`` in-process and read back its exit status and stderr.

Every case goes through ``mmtrain.cli.main.main(argv)`` (the console script's entry point), so what is checked is
what a user sees: the exit status and the lines on stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

# A contrastive run that takes about a second on one CPU core: built-in align_tiny, 16x16 images, 2 steps.
TINY_CONTRASTIVE = [
    "device=cpu", "max_steps=2", "batch_size=8", "dataset.train_samples=32", "dataset.validation_samples=16",
    "dataset.image_size=16", "model.image_size=16", "eval.batch_size=16", "eval.every_n_steps=100",
    "log.every_n_steps=1", "checkpoint.every_n_steps=100",
]
# The same with a local image folder instead of the generated shapes, swapped in as the README shows.
IMAGE_FOLDER = [
    "device=cpu", "max_steps=2", "batch_size=4", "dataset=image_folder", "dataset.image_size=16", "model.image_size=16", "eval.batch_size=16",
    "eval.every_n_steps=100", "log.every_n_steps=1", "checkpoint.every_n_steps=100",
    "dataset.validation_fraction=0.25",
]
TINY_VLM = [
    "device=cpu", "max_steps=1", "batch_size=2", "dataset.train_samples=8", "dataset.validation_samples=2",
    "eval.batch_size=2", "eval.every_n_steps=0", "checkpoint.every_n_steps=0", "log.progress_bar=false",
]


def _run_cli(argv, capsys) -> SimpleNamespace:
    from mmtrain.cli.main import main

    capsys.readouterr()
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse errors
        status = exit_.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    return SimpleNamespace(status=status, err=captured.err, out=captured.out, lines=lines)


@pytest.fixture
def cli(capsys):
    """``cli(argv) -> result`` with ``.status``, ``.err``, ``.out``, ``.lines`` (non-empty stderr lines)."""
    return lambda argv: _run_cli(argv, capsys)


def assert_one_line_error(result, *expected: str) -> str:
    """Exit status 2, exactly one stderr line ``error: ...`` that contains every ``expected`` text, no traceback."""
    assert result.status == 2, (result.status, result.err)
    assert "Traceback" not in result.err, result.err
    assert len(result.lines) == 1, result.err
    line = result.lines[0]
    assert line.startswith("error: "), line
    for text in expected:
        assert text in line, f"{text!r} not in {line!r}"
    return line


def metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines() if line]


@pytest.fixture
def contrastive(tmp_path, cli):
    """``contrastive(*overrides, verb="run", config="align_tiny")``: the tiny contrastive command in tmp_path/out."""
    out = tmp_path / "out"

    def run(*overrides, verb="run", config="align_tiny", base=TINY_CONTRASTIVE):
        return cli([verb, "contrastive", "--config", config, f"output_dir={out}", *base, *overrides])

    run.out = out
    return run


@pytest.fixture
def one_line():
    """``one_line(result, *texts)``: see :func:`assert_one_line_error`."""
    return assert_one_line_error


@pytest.fixture
def tiny():
    """The override lists above: ``.contrastive``, ``.image_folder``, ``.vlm``."""
    return SimpleNamespace(contrastive=TINY_CONTRASTIVE, image_folder=IMAGE_FOLDER, vlm=TINY_VLM)
