"""Retrieval / zero-shot metrics against a plain float64 reference on hand-made embeddings."""

import torch

from mmtrain.training.retrieval import caption_ids_from_tokens, gather_eval_outputs, retrieval_metrics


def _reference(img, txt, cid, k):
    """Loops, float64: rank lists by similarity, a hit if any of the first k shares the caption."""
    n = img.shape[0]
    i2t = t2i = 0
    for i in range(n):
        sims = [float(img[i] @ txt[j]) for j in range(n)]
        top = sorted(range(n), key=lambda j: -sims[j])[:k]
        i2t += any(cid[j] == cid[i] for j in top)
        sims = [float(img[j] @ txt[i]) for j in range(n)]
        top = sorted(range(n), key=lambda j: -sims[j])[:k]
        t2i += any(cid[j] == cid[i] for j in top)
    return i2t / n, t2i / n


def test_perfect_and_permuted_embeddings():
    eye = torch.eye(4, dtype=torch.float64)
    m = retrieval_metrics(eye, eye, torch.arange(4))
    assert m["i2t_r@1"] == m["t2i_r@1"] == m["zero_shot_acc"] == 1.0
    # texts rotated by one: every image's best text is the wrong caption, but r@5 covers all four
    m = retrieval_metrics(eye, eye.roll(1, dims=0), torch.arange(4))
    assert m["i2t_r@1"] == 0.0 and m["t2i_r@1"] == 0.0 and m["zero_shot_acc"] == 0.0
    assert m["i2t_r@5"] == 1.0 and m["t2i_r@10"] == 1.0


def test_matches_float64_reference_with_shared_captions():
    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(12, 6, generator=gen, dtype=torch.float64), dim=1)
    cid = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 4, 5, 0, 1])
    base = torch.nn.functional.normalize(torch.randn(6, 6, generator=gen, dtype=torch.float64), dim=1)
    txt = base[cid]  # identical captions -> identical text embeddings
    m = retrieval_metrics(img, txt, cid, ks=(1, 5, 10))
    for k in (1, 5, 10):
        ref_i2t, ref_t2i = _reference(img, txt, cid.tolist(), k)
        assert m[f"i2t_r@{k}"] == ref_i2t
        assert m[f"t2i_r@{k}"] == ref_t2i
    # zero-shot reference: classify among the 6 distinct captions
    correct = sum(int(torch.argmax(base @ img[i]).item() == cid[i].item()) for i in range(12))
    assert m["zero_shot_acc"] == correct / 12
    assert m["num_classes"] == 6


def test_hand_computed_case():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    cid = torch.tensor([7, 8, 9])  # image 2 (0.6, 0.8) is nearest text 1 or 2 (tie), caption 9 only at text 2
    m = retrieval_metrics(img, txt, cid, ks=(1, 2))
    # zero-shot: classes 7 -> (1,0), 8 -> (0,1), 9 -> (0,1); argmax ties go to the first (8): image 2 wrong
    assert m["zero_shot_acc"] == 2 / 3
    assert m["i2t_r@2"] == 1.0


def test_caption_ids_ignore_padding_and_gather_dedups():
    ids = torch.tensor([[5, 6, 0, 0], [5, 6, 7, 0], [5, 6, 9, 9]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]])
    cid = caption_ids_from_tokens(ids, mask)
    assert cid[0] == cid[2] and cid[0] != cid[1]
    emb = torch.arange(8.0).reshape(4, 2)
    img, txt, c = gather_eval_outputs(emb, emb + 1, torch.tensor([1, 2, 3, 1]), torch.tensor([3, 1, 0, 3]))
    assert torch.equal(img, emb[[2, 1, 0]]) and torch.equal(c, torch.tensor([3, 2, 1]))
