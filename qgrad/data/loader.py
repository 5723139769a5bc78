"""``DeviceLoader``: mini-batches of an in-memory tensor dataset, shuffled and augmented on the device."""

from __future__ import annotations

import itertools
import math
import numbers
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "DeviceLoader",
    "EpochLoader",
    "batch_spans",
    "check_batching",
    "epoch_generator",
    "num_batches",
    "random_crop_flip",
]


def _check_int(name: str, value, low: int, high: Optional[int] = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < low
        or (high is not None and value >= high)
    ):
        bound = f"an int >= {low}" if high is None else f"an int in [{low}, {high})"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return int(value)


def check_batching(
    num_samples: int,
    batch_size,
    drop_last,
    rank,
    world_size,
    memory_format: torch.memory_format,
    sample_dim: int,
) -> Tuple[int, int, int]:
    """Check the batching arguments shared by qgrad's loaders; returns ``(batch_size, rank, world_size)``.

    ``sample_dim`` is the number of dimensions of an input batch (4 for ``(N, C, H, W)`` images).
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    if not isinstance(drop_last, bool):
        raise ValueError(f"drop_last must be a bool, got {drop_last!r}")
    if drop_last and batch_size > num_samples:
        raise ValueError(
            f"batch_size {batch_size} exceeds the {num_samples} samples and drop_last=True: every epoch "
            "would be empty"
        )
    world_size = _check_int("world_size", world_size, 1)
    rank = _check_int("rank", rank, 0, world_size)
    if world_size > 1 and (batch_size % world_size or not drop_last):
        raise ValueError(
            f"a loader shared by {world_size} processes needs a batch_size divisible by {world_size} and "
            f"drop_last=True, got batch_size={batch_size}, drop_last={drop_last}"
        )
    ranks = {torch.channels_last: 4, torch.channels_last_3d: 5}
    if memory_format is not torch.contiguous_format and memory_format not in ranks:
        raise ValueError(
            "memory_format must be torch.contiguous_format, torch.channels_last or torch.channels_last_3d, "
            f"got {memory_format!r}"
        )
    if memory_format in ranks and sample_dim != ranks[memory_format]:
        raise ValueError(
            f"memory_format {memory_format} needs {ranks[memory_format]}-d inputs, got {sample_dim}-d ones"
        )
    return batch_size, rank, world_size


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator for epoch ``epoch`` of a loader seeded with ``seed``.

    ``numpy.random.SeedSequence`` mixes ``(seed, epoch)`` into well-spread state: nearby seeds or epochs give
    unrelated streams.
    """
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def num_batches(num_samples: int, batch_size: int, drop_last: bool) -> int:
    """Batches per epoch: the last, smaller one counts unless ``drop_last``."""
    return num_samples // batch_size if drop_last else math.ceil(num_samples / batch_size)


def batch_spans(num_samples: int, batch_size: int, drop_last: bool, rank: int, world_size: int):
    """``(start, stop)`` positions in the epoch's order of this process's part of every batch.

    ``batch_size`` is the batch of all ``world_size`` processes together; process ``rank`` gets positions
    ``[rank * b, (rank + 1) * b)`` of each batch, ``b = batch_size / world_size``.
    """
    part = batch_size // world_size
    for i in range(num_batches(num_samples, batch_size, drop_last)):
        start = i * batch_size + rank * part
        yield start, min(start + part, num_samples)


class EpochLoader:
    """The epochs of qgrad's loaders: each ``iter()`` runs the next epoch, :meth:`set_epoch` chooses it.

    Subclasses set ``batch_size``, ``drop_last`` and ``num_samples``, and call :meth:`_start_epoch` at the
    top of ``__iter__``.
    """

    batch_size: int
    drop_last: bool
    _next_epoch: int = 0
    _first_batch: int = 0

    @property
    def num_samples(self) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        """Batches of a whole epoch (one started at ``first_batch`` yields the last ``len - first_batch``)."""
        return num_batches(self.num_samples, self.batch_size, self.drop_last)

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        """Make the next ``iter()`` run epoch ``epoch`` (int >= 0) from its batch ``first_batch`` on (the
        earlier ones are skipped without being produced: a run resumed in the middle of an epoch gets the
        batches it had not trained on yet); later epochs continue from there, whole."""
        epoch = _check_int("epoch", epoch, 0)
        self._first_batch = _check_int("first_batch", first_batch, 0, len(self) + 1)
        self._next_epoch = epoch

    def _start_epoch(self) -> Tuple[int, int]:
        """``(epoch, first_batch)`` of the epoch that starts now."""
        epoch, first = self._next_epoch, self._first_batch
        self._next_epoch, self._first_batch = epoch + 1, 0
        return epoch, first


def random_crop_flip(x: Tensor, top: Tensor, left: Tensor, flip: Tensor, padding: int) -> Tensor:
    """Per-sample crop of the zero-padded images followed by an optional horizontal flip, in one gather.

    With ``p = padding`` and ``xp = zero_pad(x, p)`` of shape ``(N, C, H + 2p, W + 2p)``, sample ``n`` of the
    result is the window ``xp[n, :, top[n] : top[n] + H, left[n] : left[n] + W]``, mirrored along the width
    when ``flip[n]``. ``top`` and ``left`` are integer tensors ``(N,)`` with values in ``[0, 2p]`` (``p`` is
    the unshifted window); ``flip`` is a bool tensor ``(N,)``. All on ``x``'s device.

    Shape: ``(N, C, H, W) -> (N, C, H, W)``.
    """
    n, c, h, w = x.shape
    if padding > 0:
        x = F.pad(x, (padding, padding, padding, padding))
    rows = top[:, None] + torch.arange(h, device=x.device)  # (N, H) row of the padded image per output row
    cols = torch.arange(w, device=x.device).expand(n, w)
    # flipping the cropped window reads its columns right to left: output column j <- window column W-1-j
    cols = left[:, None] + torch.where(flip[:, None], w - 1 - cols, cols)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(c, device=x.device)[None, :, None, None]
    # four broadcast index tensors (N, C, H, W): one gather that yields a contiguous NCHW result
    return x[batch, channels, rows[:, None, :, None], cols[:, None, None, :]]


class DeviceLoader(EpochLoader):
    """Iterate over ``(inputs, targets)`` mini-batches of tensors that live on one device.

    The whole dataset is moved to ``device`` once; shuffling, random crops and flips run there, vectorized
    over the batch. Each ``iter()`` is one epoch and covers every sample once (the last, smaller batch is
    dropped when ``drop_last``). Batches that need no copy (no shuffle, no augmentation, already on
    ``device``) are views of ``x`` and ``y``: modify them out of place, or clone them first.

    Randomness: epoch ``e`` draws, from a CPU ``torch.Generator`` seeded with a hash of ``(seed, e)``, first
    the permutation (if ``shuffle``), then every sample's crop offsets (if ``crop_padding``), then its flip
    bits (if ``flip``); the draws are per sample, independent of ``batch_size`` and of the device, and move to
    the device once per epoch. A new ``iter()`` runs the next epoch (the first is epoch 0); :meth:`set_epoch`
    chooses the epoch the next ``iter()`` runs, so a resumed run replays exactly the batches it would have
    seen.

    Args:
        x: inputs ``(N, ...)``; ``(N, C, H, W)`` when ``crop_padding`` or ``flip`` is used.
        y: targets ``(N, ...)``.
        batch_size: samples per batch, int >= 1.
        shuffle: new random order each epoch (else the stored order).
        crop_padding: zero-pad every side by this many pixels, then crop back to ``H x W`` at a random offset
            (0 disables the crop).
        flip: mirror each sample horizontally with probability 1/2.
        seed: int in [0, 2**63).
        device: where batches are produced; default ``x.device``.
        drop_last: drop the last batch when it has fewer than ``batch_size`` samples.
        rank, world_size: for data-parallel training, ``batch_size`` is the batch of all ``world_size``
            processes together, and this loader yields part ``rank`` of each: samples
            ``[rank * b, (rank + 1) * b)`` of the batch, ``b = batch_size / world_size``. Loaders with the
            same seed in every process draw the same epochs, so the parts are disjoint and together are
            exactly the batches of a single-process loader. Needs ``batch_size`` divisible by
            ``world_size`` and ``drop_last`` when ``world_size > 1``.
        memory_format: layout of the input batches, e.g. ``torch.channels_last`` for ``(N, C, H, W)`` inputs
            of a channels-last model (default: contiguous).
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        shuffle: bool = False,
        crop_padding: int = 0,
        flip: bool = False,
        seed: int = 0,
        device: Optional[Union[str, torch.device]] = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        memory_format: torch.memory_format = torch.contiguous_format,
    ):
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
        if x.dim() == 0 or y.dim() == 0:
            raise ValueError(
                f"x and y need a sample dimension, got shapes {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"x and y must hold the same number of samples, got {x.shape[0]} and {y.shape[0]}"
            )
        if x.shape[0] == 0:
            raise ValueError("x and y are empty; a loader needs at least one sample")
        batch_size, rank, world_size = check_batching(
            x.shape[0], batch_size, drop_last, rank, world_size, memory_format, x.dim()
        )
        crop_padding = _check_int("crop_padding", crop_padding, 0)
        seed = _check_int("seed", seed, 0, 2**63)
        for name, value in (("shuffle", shuffle), ("flip", flip)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
        if (crop_padding or flip) and (x.dim() != 4 or not x.is_floating_point()):
            raise ValueError(
                f"random crops and flips need floating-point images (N, C, H, W), got a {x.dtype} tensor of "
                f"shape {tuple(x.shape)}"
            )
        device = x.device if device is None else torch.device(device)
        self.x = x.to(device)
        self.y = y.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.crop_padding = crop_padding
        self.flip = flip
        self.seed = seed
        self.device = device
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.memory_format = memory_format

    @property
    def num_samples(self) -> int:
        return self.x.shape[0]

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        epoch, first = self._start_epoch()
        n, p = self.num_samples, self.crop_padding
        gen = epoch_generator(self.seed, epoch)
        order = torch.randperm(n, generator=gen).to(self.device) if self.shuffle else None
        augment = bool(p) or self.flip
        if augment:
            zeros = torch.full((n,), p, dtype=torch.int64)
            top = torch.randint(0, 2 * p + 1, (n,), generator=gen) if p else zeros
            left = torch.randint(0, 2 * p + 1, (n,), generator=gen) if p else zeros
            flips = torch.rand(n, generator=gen) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
            top, left, flips = top.to(self.device), left.to(self.device), flips.to(self.device)
        return self._batches(first, order, top, left, flips) if augment else self._batches(first, order)

    def _batches(self, first, order, top=None, left=None, flips=None) -> Iterator[Tuple[Tensor, Tensor]]:
        spans = batch_spans(self.num_samples, self.batch_size, self.drop_last, self.rank, self.world_size)
        for start, stop in itertools.islice(spans, first, None):
            if order is None:
                xb, yb = self.x[start:stop], self.y[start:stop]
            else:
                idx = order[start:stop]
                xb, yb = self.x[idx], self.y[idx]
            if top is not None:
                # the random draws are per sample position in the epoch, so they do not depend on batch_size
                xb = random_crop_flip(
                    xb, top[start:stop], left[start:stop], flips[start:stop], self.crop_padding
                )
            yield xb.contiguous(memory_format=self.memory_format), yb
