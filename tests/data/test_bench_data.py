"""Data benchmark smoke run: a generated JPEG folder through the real loader, JSON written."""

import json

from mmtrain.bench.data import main


def test_data_bench_smoke(tmp_path):
    out = tmp_path / "data.json"
    assert main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (cpu,) = [r for r in report["results"] if r["path"] == "cpu"]
    assert cpu["images"] == 2 * 8 and cpu["images_per_s"] > 0 and report["image_size"] == 32
