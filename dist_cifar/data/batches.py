"""Batches from the uint8 dataset: a seeded order and augmentation per epoch, sharded over ranks.

Two pipelines give the same batches: `DeviceBatches` slices a tensor held on the training device
(the fast path) and `LoaderImages` + `EpochSampler` feed a standard torch DataLoader.
Everything random is drawn from generators seeded by (seed, epoch), so any step of any epoch can
be reproduced after a restart without replaying the ones before it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dist_cifar.config import AugmentConfig
from dist_cifar.data.sources import Split


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor view of a (possibly read-only, memory-mapped) array; it is never written."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.from_numpy(array)


@dataclass
class EpochPlan:
    order: torch.Tensor  # permutation of sample indices
    flip: torch.Tensor | None  # per sample index: mirror it this epoch
    shift: torch.Tensor | None  # per sample index: (dy, dx) crop offset in [0, 2 * padding]


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 7 + stream) % (2**63))


def epoch_plan(num_samples: int, seed: int, epoch: int, augment: AugmentConfig, shuffle: bool = True) -> EpochPlan:
    """The order and augmentation of one epoch: identical on every rank and after any restart."""
    order = torch.randperm(num_samples, generator=_generator(seed, epoch, 0)) if shuffle else torch.arange(num_samples)
    flip = shift = None
    if augment.flip:
        if augment.flip_alternate:  # a fixed random half mirrored on even epochs, the other half on odd ones
            flip = torch.rand(num_samples, generator=_generator(seed, -1, 1)) < 0.5
            flip = flip ^ bool(epoch % 2)
        else:
            flip = torch.rand(num_samples, generator=_generator(seed, epoch, 1)) < 0.5
    if augment.crop_padding:
        shift = torch.randint(0, 2 * augment.crop_padding + 1, (num_samples, 2), generator=_generator(seed, epoch, 2))
    return EpochPlan(order, flip, shift)


class Normalizer:
    """uint8 N x H x W x C (on any device) -> normalised float N x C x H x W; constants built once.

    The result keeps the channels-last strides of the input (a channels-first view): the convolutions then
    take their channels-last path, which for cpu_net is 1.5x faster at batch 128 on a CPU core than on
    contiguous batches, and as fast for the tutorial's net at batch 4.
    """

    def __init__(self, mean, std, device=None, dtype=torch.float32):
        self.dtype = dtype
        self.shift = torch.tensor(mean, dtype=dtype, device=device).view(1, -1, 1, 1) * 255
        self.scale = 1.0 / (torch.tensor(std, dtype=dtype, device=device).view(1, -1, 1, 1) * 255)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # A fresh tensor (copy=True), then in place: the same float ops as (x - shift) * scale with one
        # allocation instead of three (a batch of 4 costs more to dispatch than to compute).
        x = images.permute(0, 3, 1, 2).to(self.dtype, copy=True)
        if self.shift.device != x.device:
            self.shift, self.scale = self.shift.to(x.device), self.scale.to(x.device)
        return x.sub_(self.shift).mul_(self.scale)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """One-off normalisation (see Normalizer for the per-batch path)."""
    return Normalizer(mean, std, images.device)(images)


def augment(x: torch.Tensor, flip: torch.Tensor | None, shift: torch.Tensor | None, padding: int) -> torch.Tensor:
    """Random crops (reflect padding) and mirror images of a float N x C x H x W batch."""
    if shift is not None and padding:
        n, c, h, w = x.shape
        padded = F.pad(x, (padding,) * 4, mode="reflect")
        shift = shift.to(x.device)
        rows = (shift[:, 0:1] + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = (shift[:, 1:2] + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        x = padded[torch.arange(n, device=x.device).view(n, 1, 1, 1), torch.arange(c, device=x.device).view(1, c, 1, 1), rows, cols]
    if flip is not None:
        x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)
    return x


CHUNK_IMAGES = 256  # DeviceBatches prepares this many training images at once (3 MB as float32 at 32 x 32)


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Micro-steps per epoch: only whole global batches (batch_size x world_size) are used."""
    return num_samples // (batch_size * world_size)


class DeviceBatches:
    """The training split held once on the device (or memory-mapped on the CPU), sliced into batches.

    Micro-step s of an epoch gives rank r the images order[(s * world + r) * B : ... + B]:
    ranks get disjoint shards of one seeded permutation.
    """

    def __init__(self, split: Split, *, batch_size: int, rank: int, world_size: int, seed: int,
                 augment_cfg: AugmentConfig, mean, std, device: torch.device, channels_last: bool = False):
        # On the CPU the array stays a memory map: every local rank shares one copy in the page cache.
        self.images = as_tensor(split.images)
        self.labels = torch.as_tensor(split.labels)
        if device.type != "cpu":
            self.images = self.images.to(device)
            self.labels = self.labels.to(device)
        self.device, self.batch_size, self.rank, self.world_size = device, batch_size, rank, world_size
        self.seed, self.augment_cfg = seed, augment_cfg
        self.normalize = Normalizer(mean, std, device)
        self.channels_last = channels_last
        self.steps = steps_per_epoch(len(split), batch_size, world_size)
        if self.steps == 0:
            raise ValueError(f"{len(split)} training images cannot fill one global batch of {batch_size} x {world_size}")

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start_step: int = 0):
        """Yield (images, labels, sample indices) for micro-steps start_step.. of `epoch`.

        The images of up to CHUNK_IMAGES // B micro-steps are gathered, normalised and augmented at once
        and each step gets its slice: every op is per sample, so the batches are the same as one at a time,
        for far fewer ops per step (small batches cost more to dispatch than to compute).
        """
        plan = epoch_plan(len(self.labels), self.seed, epoch, self.augment_cfg)
        where = self.images.device
        b, w, r = self.batch_size, self.world_size, self.rank
        # row s: this rank's sample indices at micro-step s, order[(s * w + r) * b : ... + b]
        mine = plan.order.to(where)[: self.steps * w * b].view(self.steps, w, b)[:, r]
        flip = None if plan.flip is None else plan.flip.to(where)  # indexed on the device: no sync per step
        shift = None if plan.shift is None else plan.shift.to(where)
        on_cpu = self.device.type == "cpu"
        per_chunk = max(1, CHUNK_IMAGES // b)
        for first in range(start_step, self.steps, per_chunk):
            rows = mine[first : first + per_chunk]
            index = rows.reshape(-1)
            images, labels = self.images.index_select(0, index), self.labels.index_select(0, index)
            if not on_cpu:
                images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            x = self.normalize(images)
            if flip is not None or shift is not None:
                x = augment(x, None if flip is None else flip[index], None if shift is None else shift[index],
                            self.augment_cfg.crop_padding)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
            x, labels = x.view(len(rows), b, *x.shape[1:]), labels.view(len(rows), b)
            for i in range(len(rows)):
                yield x[i], labels[i], rows[i]


class LoaderImages(torch.utils.data.Dataset):
    """(normalised augmented image, label, sample index) per item, for a standard DataLoader (set_epoch
    before each epoch)."""

    def __init__(self, split: Split, *, seed: int, augment_cfg: AugmentConfig, mean, std):
        self.split, self.seed, self.augment_cfg = split, seed, augment_cfg
        self.normalize = Normalizer(mean, std)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.plan = epoch_plan(len(self.split), self.seed, epoch, self.augment_cfg)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        x = self.normalize(as_tensor(self.split.images[i : i + 1]))
        flip = None if self.plan.flip is None else self.plan.flip[i : i + 1]
        shift = None if self.plan.shift is None else self.plan.shift[i : i + 1]
        return augment(x, flip, shift, self.augment_cfg.crop_padding)[0], int(self.split.labels[i]), i


class EpochSampler(torch.utils.data.Sampler):
    """The epoch's seeded permutation, cut to whole global batches; Accelerate shards its batches."""

    def __init__(self, num_samples: int, *, seed: int, global_batch_size: int, augment_cfg: AugmentConfig):
        self.num_samples, self.seed, self.augment_cfg = num_samples, seed, augment_cfg
        self.length = num_samples // global_batch_size * global_batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        order = epoch_plan(self.num_samples, self.seed, self.epoch, self.augment_cfg).order
        return iter(order[: self.length].tolist())


def eval_shard(num_samples: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of the test split that rank r evaluates: a contiguous run of whole batches of the split
    cut into batches of `batch_size` from its start. The shards cover the split exactly once, in rank
    order, and differ in length by up to one batch.

    Whole batches of one grid, rather than an even slice per rank: every batch holds the same images
    whatever the world size, so each image's logits (a forward of the same batch) are the same from 1,
    2 or 3 processes, and so are the predictions written from them."""
    batches = -(-num_samples // batch_size)
    first, last = rank * batches // world_size, (rank + 1) * batches // world_size
    return min(first * batch_size, num_samples), min(last * batch_size, num_samples)


def eval_batches(split: Split, *, batch_size: int, rank: int, world_size: int, mean, std,
                 device: torch.device, channels_last: bool = False):
    """(images, labels) of rank r's shard of the test split (eval_shard), in order, no padding."""
    lo, hi = eval_shard(len(split), batch_size, rank, world_size)
    images, labels = as_tensor(split.images), torch.as_tensor(split.labels)
    normalize = Normalizer(mean, std, device)
    for start in range(lo, hi, batch_size):
        stop = min(start + batch_size, hi)
        x = normalize(images[start:stop].to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, labels[start:stop].to(device, non_blocking=True)
