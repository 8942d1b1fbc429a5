"""Contrastive loader: batch contract, world-size-independent global order, exact mid-epoch resume, skips."""

import pytest
import torch

from mmtrain.data.loader import ContrastiveCollator, ResumableDistributedSampler, build_contrastive_loader
from mmtrain.data.shapes import shapes_dataset
from mmtrain.data.tokenizers import shapes_tokenizer
from mmtrain.errors import DataError


@pytest.fixture(scope="module")
def data():
    return shapes_dataset("train", train_samples=22, image_size=16, transform={"scale": [0.5, 1.0]}), shapes_tokenizer(8)


def _batches(loader, n=None):
    out = []
    for batch in loader:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def test_batch_contract(data):
    ds, tok = data
    batch = next(iter(build_contrastive_loader(ds, tok, batch_size=4, seed=0)))
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].shape == (4, 8) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.long and batch["index"].dtype == torch.long
    assert batch["num_skipped"].dtype == torch.long and batch["num_skipped"].ndim == 0
    assert torch.equal(batch["input_ids"], tok([ds.captions[i] for i in batch["index"].tolist()])["input_ids"])


@pytest.mark.parametrize("drop_last", [True, False])
def test_same_global_batches_on_one_and_two_ranks(drop_last):
    one = ResumableDistributedSampler(22, 4, seed=5, drop_last=drop_last)
    ranks = [ResumableDistributedSampler(22, 2, seed=5, rank=r, world_size=2, drop_last=drop_last) for r in (0, 1)]
    for epoch in (0, 1):
        for s in [one, *ranks]:
            s.set_epoch(epoch)
        flat = list(one)
        per_rank = [list(s) for s in ranks]
        assert len(per_rank[0]) == len(per_rank[1])
        merged = []
        for g in range(0, len(per_rank[0]), 2):
            merged += per_rank[0][g : g + 2] + per_rank[1][g : g + 2]
        if drop_last:
            assert merged == flat and len(flat) == 20
        else:
            assert merged[:20] == flat[:20] and sorted(set(merged)) == list(range(22))
            assert len(merged) == 22  # 2 left over split 1 + 1: nothing repeated
    assert list(one) != list(range(20))  # shuffled


def test_exact_resume_mid_epoch_and_across_epochs(data):
    ds, tok = data
    make = lambda: build_contrastive_loader(ds, tok, batch_size=4, seed=1, drop_last=True)
    straight = make()
    reference = _batches(straight) + _batches(straight)  # two epochs, 5 batches each
    first = make()
    head = _batches(first, 3)
    state = first.state_dict()
    assert state["epoch"] == 0 and state["position"] == 12
    resumed = make()
    resumed.load_state_dict(state)
    tail = _batches(resumed) + _batches(resumed)
    got = head + tail
    assert len(got) == len(reference) == 10
    for a, b in zip(got, reference):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    assert resumed.state_dict() == {"epoch": 2, "position": 0, "world_size": 1}
    assert not torch.equal(reference[0]["index"], reference[5]["index"])  # epochs reshuffle


def test_resume_on_another_world_size_keeps_the_global_order():
    one = ResumableDistributedSampler(40, 4, seed=2)
    full = list(one)
    one.position = 16  # 4 global batches consumed
    two = ResumableDistributedSampler(40, 2, seed=2, rank=1, world_size=2)
    two.load_state_dict(one.state_dict())
    assert two.position == 8
    assert list(two)[:2] == full[16 + 2 : 16 + 4]
    three = ResumableDistributedSampler(40, 3, seed=2, world_size=1)
    with pytest.raises(DataError, match="global batch"):
        ResumableDistributedSampler(40, 3, seed=2, world_size=3).load_state_dict({"epoch": 0, "position": 16, "world_size": 1})
    assert three.position == 0


def test_worker_processes_give_the_same_batches(data):
    ds, tok = data
    a = _batches(build_contrastive_loader(ds, tok, batch_size=4, seed=3, num_workers=0), 3)
    b = _batches(build_contrastive_loader(ds, tok, batch_size=4, seed=3, num_workers=1), 3)
    for x, y in zip(a, b):
        assert torch.equal(x["pixel_values"], y["pixel_values"]) and torch.equal(x["index"], y["index"])


def test_persistent_workers_draw_each_epochs_crops_and_resume_exactly(data):
    ds, tok = data
    make = lambda workers: build_contrastive_loader(ds, tok, batch_size=4, seed=4, num_workers=workers, drop_last=True)
    main_process, persistent = make(0), make(2)
    assert persistent.persistent_workers
    epochs = {workers: [_batches(loader) for _ in range(3)] for workers, loader in ((0, main_process), (2, persistent))}
    workers_alive = persistent._iterator._workers
    assert all(w.is_alive() for w in workers_alive)  # the same processes served all three epochs
    for reference, got in zip(epochs[0], epochs[2]):
        assert len(reference) == len(got) == 5
        for a, b in zip(reference, got):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    # a sample's crop changes with the epoch: the workers learned it from the (epoch, index) keys
    first, second = ({int(i): px for batch in epoch for i, px in zip(batch["index"], batch["pixel_values"])}
                     for epoch in epochs[2][:2])
    assert any(not torch.equal(first[i], second[i]) for i in first)
    # resuming mid-epoch 1 with persistent workers continues the uninterrupted sequence
    resumed = make(2)
    resumed.load_state_dict({"epoch": 1, "position": 8})
    tail = _batches(resumed)
    assert [b["index"].tolist() for b in tail] == [b["index"].tolist() for b in epochs[0][1][2:]]
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(tail, epochs[0][1][2:]))


class _Flaky(torch.utils.data.Dataset):
    """Every sample whose index is in ``bad`` is unreadable (None)."""

    def __init__(self, n, bad):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            return None
        return {"image": torch.full((3, 4, 4), i, dtype=torch.uint8), "text": "a red circle", "index": i}

    def make_transform(self, train=None):
        from mmtrain.data.transforms import ContrastiveImageTransform

        return ContrastiveImageTransform(4)


def test_collator_drops_unreadable_and_counts():
    collate = ContrastiveCollator(shapes_tokenizer(8))
    sample = {"pixel_values": torch.zeros(3, 4, 4), "text": "a red circle", "index": 3}
    batch = collate([None, sample, None])
    assert batch["index"].tolist() == [3] and batch["num_skipped"].item() == 2 and batch["pixel_values"].shape[0] == 1


def test_all_unreadable_batch_is_carried_into_the_next(data):
    _, tok = data
    loader = build_contrastive_loader(_Flaky(8, bad=[0, 1]), tok, batch_size=2, shuffle=False)
    batches = _batches(loader)
    assert [b["index"].tolist() for b in batches] == [[2, 3], [4, 5], [6, 7]]
    assert batches[0]["num_skipped"].item() == 2 and loader.total_skipped == 2
    with pytest.raises(DataError, match="max_skipped_fraction"):
        _batches(build_contrastive_loader(_Flaky(8, bad=[0, 1]), tok, batch_size=2, shuffle=False,
                                          max_skipped_fraction=0.1))
    with pytest.raises(DataError, match="none of the 8 samples"):
        _batches(build_contrastive_loader(_Flaky(8, bad=range(8)), tok, batch_size=2, shuffle=False))


def test_normalize_on_device_hands_over_uint8_and_the_normalizer(data):
    dataset, tok = data
    plain = build_contrastive_loader(dataset, tok, batch_size=4, shuffle=True, seed=3)
    raw = build_contrastive_loader(dataset, tok, batch_size=4, shuffle=True, seed=3, normalize_on_device=True)
    assert plain.pixel_normalizer is None
    for expected, batch in zip(_batches(plain)[:3], _batches(raw)[:3]):
        assert batch["pixel_values"].dtype == torch.uint8
        assert torch.equal(batch["index"], expected["index"])
        torch.testing.assert_close(raw.pixel_normalizer(batch["pixel_values"]), expected["pixel_values"],
                                   atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="unnormalized"):
        build_contrastive_loader(dataset, tok, image_transform=lambda image, text, seed=None: image, batch_size=2,
                                 normalize_on_device=True)
