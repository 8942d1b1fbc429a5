"""Data benchmark smoke run: a generated JPEG folder through the real loader, JSON written."""

import json

from mmtrain.bench.data import main


def test_data_bench_smoke(tmp_path):
    out = tmp_path / "data.json"
    assert main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["path"] for r in report["results"]] == ["cpu", "cpu_uint8", "decode_on_device"]
    for result in report["results"]:
        assert result["images"] == 2 * 8 and result["images_per_s"] > 0
    assert report["image_size"] == 32
