"""`mmtrain bench tiled_loss --smoke`: tiled and plain losses agree on CPU, the tiled peak is below the plain one,
and the JSON carries every variant's figures."""

from __future__ import annotations

import json

import pytest
import torch

from mmtrain.bench import tiled_loss
from mmtrain.errors import UserError


def test_smoke_writes_json_and_tiled_matches_plain(tmp_path, capsys):
    out = tmp_path / "tiled_loss.json"
    assert tiled_loss.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "tiled_loss" and report["smoke"] is True
    assert (report["batch"], report["dim"], report["block_sizes"], report["target_gib"]) == (256, 16, [64], 4.0)
    assert report["memory_source"].startswith("live-storage tracker")
    rows = {r["name"]: r for r in report["results"]}
    expected = {f"{loss}_{form}_{dtype}" for loss in ("align", "clip", "siglip") for form in ("tiled", "plain")
                for dtype in ("bf16", "fp32")}
    assert set(rows) == expected
    for name, row in rows.items():
        assert "error" not in row and row["step_s"] > 0 and row["loss_value"] > 0, row
        if row["form"] == "tiled":
            assert row["block_size"] == 64 and row["within_target"] is True
            plain = rows[name.replace("tiled", "plain")]
            # 256 x 64 blocks vs full 256 x 256 logits: the tracker must see the tiled form use less
            assert 0 < row["peak_beyond_embeddings_gib"] < plain["peak_beyond_embeddings_gib"]
        else:
            check = row["vs_tiled"]
            assert check["agree"] is True and check["tolerance"] == {"bf16": 2e-2, "fp32": 1e-4}[row["dtype"]]
            assert check["grad_max_rel_diff"] <= check["tolerance"]
    # fp32: same loss to float rounding (label smoothing on for ALIGN, off for CLIP)
    assert rows["align_tiled_fp32"]["loss_value"] == pytest.approx(rows["align_plain_fp32"]["loss_value"], rel=1e-5)
    printed = capsys.readouterr().out
    assert printed.count("\n{") + printed.startswith("{") == len(expected)  # one JSON line per variant
    assert "siglip_plain_fp32" in printed and "PASS" in printed


def test_plain_is_skipped_with_a_note_where_logits_do_not_fit(tmp_path):
    out = tmp_path / "t.json"
    argv = ["--smoke", "--plain-max-logits-gib", "0", "--loss", "siglip", "--dtype", "fp32", "--out", str(out)]
    assert tiled_loss.main(argv) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["name"] for r in rows] == ["siglip_tiled_fp32", "siglip_plain_fp32"]
    assert "256^2 fp32 logits" in rows[1]["skipped"] and "step_s" not in rows[1]


def test_full_batch_without_cuda_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA device"):
        tiled_loss.main(["--out", str(tmp_path / "t.json")])


def test_live_storage_tracker_counts_peak_and_frees():
    x = torch.randn(100, 100)
    nbytes = x.numel() * 4
    with tiled_loss._LiveStorageTracker() as tracker:
        y = x.exp()
        z = y.exp()
        del y
        view = z[:10]  # a view allocates nothing
        w = z.exp()
        del z, view
    assert tracker.peak == 2 * nbytes and tracker.current == nbytes
    assert w.shape == (100, 100)


@pytest.mark.parametrize("loss_cls", ["AlignLoss", "ClipLoss", "SigLipLoss"])
def test_tiled_loss_peak_is_about_two_blocks_of_logits(loss_cls):
    import mmtrain.losses

    n, dim, block = 2048, 32, 128
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(n, dim), dim=-1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(n, dim), dim=-1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    loss_fn = getattr(mmtrain.losses, loss_cls)(tiled=True, block_size=block, gather=False)
    with tiled_loss._LiveStorageTracker() as tracker:
        loss_fn(image, text, scale).backward()
    block_bytes = n * block * 4
    embedding_bytes = n * dim * 4
    # two live (N, block) float32 buffers per tile step, plus gradient-sized buffers of the embeddings;
    # the loop before in-place updates and explicit frees held seven blocks
    assert tracker.peak <= 2 * block_bytes + 8 * embedding_bytes, tracker.peak / block_bytes
