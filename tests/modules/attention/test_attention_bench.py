"""``mmtrain bench attention --smoke`` runs on CPU and writes the JSON report (no timing is asserted)."""

import json

import pytest

from mmtrain.bench.attention import ALL_MECHANISMS, main


def test_bench_smoke_writes_json(tmp_path, capsys):
    out = tmp_path / "attention.json"
    assert main(["--smoke", "--out", str(out), "--local-variant", 'bs64={"block_size": 64}']) == 0
    report = json.loads(out.read_text())
    assert {"device", "torch", "dtype", "heads", "head_dim", "results", "summary", "smoke"} <= set(report)
    assert report["smoke"] is True
    names = {row["mechanism"] for row in report["results"]}
    assert {"sdpa", "sdpa_masked", "naive", *ALL_MECHANISMS} <= names
    assert {f"{name}_masked_reference" for name in ("local", "random", "global")} <= names
    assert {f"{name}_eager" for name in ("linformer", "nystrom", "favor", "orthoformer")} <= names
    assert "local[bs64]" in names
    for row in report["results"]:
        assert {"mechanism", "seq_len", "time_ms", "peak_mem_mb", "tflops", "status"} <= set(row)
        assert row["status"] == "ok" and row["time_ms"] > 0, row
    for name in ("local", "random", "global"):
        rows = [r for r in report["results"] if r["mechanism"] == name]
        assert all(r["max_abs_err_vs_reference"] < 1e-4 for r in rows), rows
    assert "local_tflops_fraction_of_dense" in report["summary"]
    assert "sdpa" in capsys.readouterr().out


def test_bench_rejects_a_malformed_local_variant(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--smoke", "--out", str(tmp_path / "a.json"), "--local-variant", 'x={"block": 64}'])
    assert exit_info.value.code == 2


def test_a_pattern_mechanism_that_disagrees_with_its_reference_is_not_a_result(tmp_path, monkeypatch):
    from mmtrain.modules.attention import LocalAttention

    original = LocalAttention.forward
    monkeypatch.setattr(LocalAttention, "forward", lambda self, *a, **k: original(self, *a, **k) * float("nan"))
    out = tmp_path / "attention.json"
    assert main(["--smoke", "--out", str(out), "--mechanisms", "local", "--approx-modes", "eager"]) == 0
    rows = [r for r in json.loads(out.read_text())["results"] if r["mechanism"] == "local"]
    assert rows and all(r["status"].startswith("wrong: differs from its masked reference") for r in rows), rows
    assert "local_tflops_fraction_of_dense" not in json.loads(out.read_text())["summary"]
