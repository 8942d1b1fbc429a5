"""Contrastive data loading: a resumable, rank-sharded sampler, a skip-aware collator and the DataLoader.

Batch contract (what the recipe receives), B <= batch_size samples after dropping unreadable ones:

    pixel_values   float (B, 3, H, W); uint8 with ``normalize_on_device`` (then ``loader.pixel_normalizer``,
                   applied after the copy to the device, gives the float pixels)
    input_ids      long  (B, L)
    attention_mask long  (B, L)
    index          long  (B,)     dataset indices of the samples
    num_skipped    long  ()       unreadable samples dropped from this batch

Global order. For each epoch the sampler draws one permutation of the dataset from (seed, epoch). Global batch
g is the slice ``perm[g*G : (g+1)*G]`` with G = batch_size * world_size, and rank r takes the r-th block of
batch_size in it. So the same global batches come in the same order on any world size with the same G, and
the data position is one number: the samples each rank has consumed this epoch.

Augmentation randomness comes from (seed, epoch, index) per sample (see ``transforms``), so a resumed run sees
the same pixels as an uninterrupted one, whatever the worker count. The sampler hands the workers ``(epoch, index)``
keys, so they stay alive from one epoch to the next (``persistent_workers``) and still draw each epoch's crops.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mmtrain.errors import DataError

# Mid-epoch checks of max_skipped_fraction wait for this many samples, so that one bad image in the first small
# batch does not stop a run whose real rate is far below the limit.
_MIN_SAMPLES_FOR_SKIP_CHECK = 512


class ResumableDistributedSampler(Sampler[int]):
    """Per-rank indices of a seeded global order; resumable mid-epoch.

    Args:
        num_samples: dataset length N.
        batch_size: per-rank batch size B (the global batch is B * world_size).
        shuffle: permute per (seed, epoch); otherwise 0..N-1.
        seed: permutation seed.
        rank, world_size: this process's shard.
        drop_last: drop the final incomplete global batch. Otherwise it is padded (wrapping to the start of the
            epoch's order) only up to a multiple of world_size and split evenly, so every rank gets the same
            number of batches and at most world_size - 1 samples repeat.

    State: ``{"epoch", "position"}`` with position = samples this rank consumed in the epoch (a multiple of B),
    and ``world_size`` so that a resume on another world size with the same global batch is exact.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if num_samples < 1:
            raise DataError("dataset: no samples to load")
        if batch_size < 1:
            raise DataError(f"batch_size: must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.position = 0
        if self.drop_last and self.num_samples < self.global_batch_size:
            raise DataError(
                f"dataset: {self.num_samples} samples cannot fill one global batch of {self.global_batch_size} "
                f"(batch_size {self.batch_size} x {self.world_size} ranks) with drop_last"
            )

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def global_order(self, epoch: int | None = None) -> torch.Tensor:
        """The epoch's order of dataset indices, long (N,)."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(_mix(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=generator)

    def _rank_indices(self, epoch: int) -> torch.Tensor:
        order = self.global_order(epoch)
        full = self.num_samples // self.global_batch_size
        head = order[: full * self.global_batch_size].view(full, self.world_size, self.batch_size)
        parts = [head[:, self.rank].reshape(-1)]
        rest = self.num_samples - full * self.global_batch_size
        if rest and not self.drop_last:
            per_rank = math.ceil(rest / self.world_size)
            tail = order[full * self.global_batch_size :]
            if per_rank * self.world_size > rest:  # wrap to the start of the order to fill the last ranks
                tail = torch.cat([tail, order[: per_rank * self.world_size - rest]])
            parts.append(tail.view(self.world_size, per_rank)[self.rank])
        return torch.cat(parts)

    def samples_per_rank(self) -> int:
        """Samples each rank sees in a full epoch."""
        full = self.num_samples // self.global_batch_size * self.batch_size
        rest = self.num_samples % self.global_batch_size
        return full + (math.ceil(rest / self.world_size) if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[int]:
        indices = self._rank_indices(self.epoch)[self.position :]
        return iter(indices.tolist())

    def __len__(self) -> int:
        """Samples left in the current epoch from ``position``."""
        return max(0, self.samples_per_rank() - self.position)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        old_world = int(state.get("world_size", self.world_size))
        if old_world != self.world_size:
            consumed = position * old_world
            if consumed % self.world_size or (consumed // self.world_size) % self.batch_size:
                raise DataError(
                    f"data position: {consumed} samples consumed on {old_world} ranks cannot be split into whole "
                    f"batches of {self.batch_size} on {self.world_size} ranks; keep the global batch size"
                )
            position = consumed // self.world_size
        if not 0 <= position <= self.samples_per_rank():
            raise DataError(f"data position: {position} is outside an epoch of {self.samples_per_rank()} samples")
        self.epoch, self.position = epoch, position


def _mix(*values: int) -> int:
    """A stable 63-bit seed from integers; nearby inputs give unrelated seeds."""
    text = "/".join(str(v) for v in values).encode()
    return (zlib.crc32(text) << 31) ^ zlib.crc32(text + b"#")


def split_sample_key(key: int | tuple[int, int], default_epoch: int) -> tuple[int, int]:
    """``(epoch, index)`` from a sampler key: an ``(epoch, index)`` pair, or a bare index in ``default_epoch``."""
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return int(default_epoch), int(key)


class EpochTaggedSampler(Sampler):
    """Yields ``(epoch, index)`` for each index of a ``ResumableDistributedSampler``: a persistent worker learns a
    sample's epoch from its key, as it is never forked again to see the dataset's ``epoch`` attribute."""

    def __init__(self, sampler: ResumableDistributedSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((epoch, int(index)) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class TransformedDataset(Dataset):
    """Applies the image transform per sample: item -> {"pixel_values", "text", "index"} or None (unreadable).

    The augmentation seed of a sample is a function of (seed, epoch, index) only. Keys are ``(epoch, index)``
    pairs (``EpochTaggedSampler``) or bare indices, read in ``self.epoch``.
    """

    def __init__(self, dataset: Dataset, image_transform, seed: int = 0) -> None:
        self.dataset = dataset
        self.image_transform = image_transform
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict | None:
        epoch, index = split_sample_key(key, self.epoch)
        item = self.dataset[index]
        if item is None:
            return None
        pixels = self.image_transform(item["image"], item["text"], seed=_mix(self.seed, epoch, index))
        return {"pixel_values": pixels, "text": item["text"], "index": index}


class ContrastiveCollator:
    """Drops None (unreadable) samples, stacks pixels, tokenizes the texts as one batch, counts what it dropped."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, samples: list[dict | None]) -> dict[str, torch.Tensor]:
        kept = [s for s in samples if s is not None]
        num_skipped = torch.tensor(len(samples) - len(kept), dtype=torch.long)
        if not kept:
            return {"pixel_values": None, "index": torch.zeros(0, dtype=torch.long), "num_skipped": num_skipped}
        tokens = self.tokenizer([s["text"] for s in kept])
        return {
            "pixel_values": torch.stack([s["pixel_values"] for s in kept]),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "index": torch.tensor([s["index"] for s in kept], dtype=torch.long),
            "num_skipped": num_skipped,
        }


class ContrastiveDataLoader(DataLoader):
    """A DataLoader that keeps the data position exact and watches the skipped-sample rate.

    - ``state_dict()`` / ``load_state_dict()``: the sampler's state, counted from batches handed out (not the
      ones prefetched by workers), so a checkpoint taken between steps resumes at the next unseen batch.
    - When an epoch ends the next iteration starts the next epoch (``set_epoch`` also works).
    - A batch whose samples were all unreadable is not handed out; its count goes into the next batch's
      ``num_skipped`` (an epoch's last batch has no next one: ``total_skipped`` still counts it).
    - ``max_skipped_fraction``: a DataError once the skipped share of samples exceeds it (checked after
      512 samples and at each epoch end); a DataError when a whole epoch had no readable sample.
    - ``total_skipped`` / ``total_seen``: counts since construction.
    - ``pixel_normalizer``: None, or (with ``normalize_on_device``) the uint8 -> float step left to the caller.
    - ``device_decoder``: None, or (with ``decode_on_device``) the decode + crop step left to the caller, before
      ``pixel_normalizer``.
    """

    def __init__(self, *args, max_skipped_fraction: float = 1.0, source: str = "dataset",
                 pixel_normalizer=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pixel_normalizer = pixel_normalizer
        self.device_decoder = None
        self.max_skipped_fraction = float(max_skipped_fraction)
        self.source = source
        self.total_skipped = 0
        self.total_seen = 0

    @property
    def resumable_sampler(self) -> ResumableDistributedSampler:
        sampler = self.sampler
        return sampler.sampler if isinstance(sampler, EpochTaggedSampler) else sampler  # type: ignore[return-value]

    def set_epoch(self, epoch: int) -> None:
        self.resumable_sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        return self.resumable_sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resumable_sampler.load_state_dict(state)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        sampler = self.resumable_sampler
        if isinstance(self.dataset, TransformedDataset):
            self.dataset.epoch = sampler.epoch  # for bare-index keys (the keys this loader makes carry it)
        epoch = sampler.epoch
        position = sampler.position
        epoch_seen = epoch_kept = 0
        carried_skips = 0
        for batch in super().__iter__():
            skipped = int(batch["num_skipped"])
            kept = int(batch["index"].numel())
            position += kept + skipped
            epoch_seen += kept + skipped
            epoch_kept += kept
            self.total_seen += kept + skipped
            self.total_skipped += skipped
            self._check_skips(final=False)
            if kept == 0:
                carried_skips += skipped
                sampler.position = position
                continue
            if carried_skips:
                batch["num_skipped"] = batch["num_skipped"] + carried_skips
                carried_skips = 0
            # Position is the state *after* this batch: a checkpoint written after the step that used it
            # resumes at the next batch.
            sampler.position = position
            yield batch
        if sampler.epoch == epoch:  # a full epoch went by (nobody called set_epoch meanwhile)
            if epoch_seen and not epoch_kept:
                raise DataError(f"{self.source}: none of the {epoch_seen} samples of epoch {epoch} could be read")
            self._check_skips(final=True)
            sampler.epoch, sampler.position = epoch + 1, 0

    def _check_skips(self, final: bool) -> None:
        if self.max_skipped_fraction >= 1.0 or not self.total_skipped:
            return
        if not final and self.total_seen < _MIN_SAMPLES_FOR_SKIP_CHECK:
            return
        fraction = self.total_skipped / self.total_seen
        if fraction > self.max_skipped_fraction:
            raise DataError(
                f"{self.source}: {self.total_skipped} of {self.total_seen} images unreadable ({fraction:.1%}), more "
                f"than max_skipped_fraction={self.max_skipped_fraction}"
            )


def build_contrastive_loader(
    dataset: Dataset,
    tokenizer,
    image_transform=None,
    *,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    persistent_workers: bool = True,
    max_skipped_fraction: float | None = None,
    normalize_on_device: bool = False,
    decode_on_device: torch.device | str | None = None,
) -> ContrastiveDataLoader:
    """DataLoader of contrastive batches (see the module docstring) for this rank.

    Args:
        dataset: items ``{"image": PIL or uint8 (3, H, W), "text": str, "index": int}`` or None (unreadable).
        tokenizer: ``texts -> {"input_ids", "attention_mask", ...}`` (e.g. ``mmtrain.data.tokenizers``).
        image_transform: ``(image, text, seed=int) -> float (3, H, W)``; None: ``dataset.make_transform()``
            (augmenting for the train split).
        batch_size: per rank.
        persistent_workers: with ``num_workers > 0``, keep the workers from one epoch to the next instead of
            starting them again (with short epochs, the restarts bounded the loader's rate).
        max_skipped_fraction: default: the dataset's own ``max_skipped_fraction`` attribute, else 1 (no limit).
        pin_memory: only takes effect when CUDA is available.
        normalize_on_device: batches carry uint8 pixels (a quarter of the bytes from the workers to the GPU);
            the caller applies ``loader.pixel_normalizer`` once they are on the device. Needs a transform with
            ``unnormalized()`` and ``pixel_normalizer()`` (``ContrastiveImageTransform``).
        decode_on_device: a device: workers hand over encoded JPEG bytes and their crops, and the caller applies
            ``loader.device_decoder`` (decode + crop + flip there, see ``mmtrain.data.device_decode``), then
            ``loader.pixel_normalizer``. Image folders with a training transform only; implies
            ``normalize_on_device``.
    """
    if image_transform is None:
        if not hasattr(dataset, "make_transform"):
            raise TypeError(f"{type(dataset).__name__} has no make_transform(); pass image_transform")
        image_transform = dataset.make_transform()
    pixel_normalizer = None
    if decode_on_device is not None:
        normalize_on_device = True
    if normalize_on_device:
        if not (hasattr(image_transform, "unnormalized") and hasattr(image_transform, "pixel_normalizer")):
            raise TypeError(f"normalize_on_device needs a transform with unnormalized() and pixel_normalizer(), "
                            f"got {type(image_transform).__name__}")
        pixel_normalizer = image_transform.pixel_normalizer()
        image_transform = image_transform.unnormalized()
    if max_skipped_fraction is None:
        max_skipped_fraction = float(getattr(dataset, "max_skipped_fraction", 1.0))
    sampler = ResumableDistributedSampler(
        len(dataset), batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last
    )
    if pin_memory and not torch.cuda.is_available():
        pin_memory = False
    extra = {}
    if num_workers > 0 and prefetch_factor is not None:
        extra["prefetch_factor"] = prefetch_factor
    if num_workers > 0 and persistent_workers:
        extra["persistent_workers"] = True
    items, collate, device_decoder = TransformedDataset(dataset, image_transform, seed=seed), ContrastiveCollator, None
    if decode_on_device is not None:
        from mmtrain.data.device_decode import DeviceImageDecoder, EncodedCollator, EncodedImageDataset

        items, collate = EncodedImageDataset(dataset, image_transform, seed=seed), EncodedCollator
        device_decoder = DeviceImageDecoder(image_transform.image_size, image_transform.interpolation,
                                            decode_on_device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "This DataLoader will create N workers" on small machines
        loader = ContrastiveDataLoader(
            items,
            batch_size=batch_size,
            sampler=EpochTaggedSampler(sampler),
            collate_fn=collate(tokenizer),
            num_workers=num_workers,
            drop_last=False,  # the sampler already decided; a short last batch only exists when drop_last=False
            pin_memory=pin_memory,
            max_skipped_fraction=max_skipped_fraction,
            source=str(getattr(dataset, "source", type(dataset).__name__)),
            pixel_normalizer=pixel_normalizer,
            **extra,
        )
    loader.device_decoder = device_decoder
    return loader
