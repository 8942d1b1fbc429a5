"""The ALIGN benchmark's smoke mode runs every variant on CPU and writes its JSON."""

from __future__ import annotations

import json

import pytest

from mmtrain.bench.align import main
from mmtrain.errors import UserError


def test_bench_smoke_writes_json(tmp_path):
    out = tmp_path / "align.json"
    assert main(["--smoke", "--no-hf", "--out", str(out)]) == 0  # HF itself is covered by the parity tests
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["results"]]
    assert names[0] == "mmtrain" and report["smoke"] is True
    assert all(r["samples_per_s"] > 0 for r in report["results"])
    if "transformers" in names:
        assert report["speedup_vs_transformers"] > 0


def test_unknown_compile_mode_is_one_line_before_anything_runs(tmp_path):
    with pytest.raises(UserError, match="--compile-modes: unknown fast"):
        main(["--smoke", "--no-hf", "--compile-modes", "regional,fast", "--out", str(tmp_path / "a.json")])
    assert not (tmp_path / "a.json").exists()
