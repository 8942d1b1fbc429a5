"""`mmtrain bench contrastive --smoke`: the CLIP train-step benchmark and the end-to-end recipe run on a generated
JPEG folder, on CPU with a tiny CLIP; checks the JSON it writes."""

from __future__ import annotations

import json

import pytest

from mmtrain.bench import contrastive

pytestmark = pytest.mark.slow


def test_contrastive_bench_smoke_writes_step_and_end_to_end_results(tmp_path, monkeypatch, capsys):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "contrastive.json"
    assert contrastive.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["batch"] == 4 and report["image_size"] == 32
    rows = {r["name"]: r for r in report["results"]}
    assert set(rows) == {"mmtrain", "recipe_end_to_end"}
    step = rows["mmtrain"]
    assert step["samples_per_s"] == pytest.approx(4 / step["step_s"])
    assert step["params"] > 0
    e2e = rows["recipe_end_to_end"]
    assert e2e["steps"] == 2 and e2e["samples_per_s"] > 0 and e2e["data"] == "generated JPEGs"
    assert report["end_to_end_over_step_only"] == pytest.approx(e2e["samples_per_s"] / step["samples_per_s"])
    assert "recipe_end_to_end" in capsys.readouterr().out


def test_jpeg_folder_follows_the_imagefolder_convention(tmp_path):
    from PIL import Image

    contrastive._write_jpeg_folder(tmp_path, train=3, validation=2, size=8)
    for split, count in (("train", 3), ("validation", 2)):
        rows = [json.loads(line) for line in (tmp_path / split / "metadata.jsonl").read_text().splitlines()]
        assert len(rows) == count and all(set(r) == {"file_name", "text"} for r in rows)
        with Image.open(tmp_path / split / rows[0]["file_name"]) as image:
            assert image.format == "JPEG" and image.size == (8, 8)
