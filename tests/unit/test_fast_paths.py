"""The per-step fast paths give what the plain ones give: DeviceBatches' chunked batches against one
gather and normalisation per step, the in-place Normalizer, and the loop's step contexts against
accelerator.accumulate + accelerator.autocast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from dist_cifar.config import AugmentConfig
from dist_cifar.data.sources import Split
from dist_cifar.data.batches import CHUNK_IMAGES, DeviceBatches, Normalizer, augment, epoch_plan
from dist_cifar.engine.step import NO_CONTEXT, step_contexts

CPU = torch.device("cpu")
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def split_of(n: int, size: int = 8) -> Split:
    rng = np.random.default_rng(n)
    return Split(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, 10, n))


def reference_batch(split: Split, index: torch.Tensor, aug: AugmentConfig, plan) -> torch.Tensor:
    """One step's batch the plain way: gather, (x - mean) * 1/std in float32, augment."""
    images = torch.from_numpy(split.images)[index].permute(0, 3, 1, 2).float()
    shift = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    scale = 1.0 / (torch.tensor(STD).view(1, 3, 1, 1) * 255)
    x = (images - shift) * scale
    flip = None if plan.flip is None else plan.flip[index]
    return augment(x, flip, None if plan.shift is None else plan.shift[index], aug.crop_padding)


@pytest.mark.parametrize("world, batch, start", [(1, 4, 0), (1, 4, 70), (3, 2, 5), (2, 300, 0)])
@pytest.mark.parametrize("aug", [AugmentConfig(), AugmentConfig(crop_padding=2, flip=True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_chunked_batches_equal_one_gather_per_step(world, batch, start, aug, channels_last):
    split = split_of(max(CHUNK_IMAGES, 3 * batch) * world + 37)  # more than one chunk per rank
    plan = epoch_plan(len(split), 3, 1, aug)
    for rank in range(world):
        batches = DeviceBatches(split, batch_size=batch, rank=rank, world_size=world, seed=3, augment_cfg=aug,
                                mean=MEAN, std=STD, device=CPU, channels_last=channels_last)
        got = list(batches.epoch(1, start))
        assert len(got) == len(batches) - start
        for step, (x, y, index) in enumerate(got, start):
            lo = (step * world + rank) * batch
            assert torch.equal(index, plan.order[lo : lo + batch])
            assert torch.equal(y, torch.as_tensor(split.labels)[index])
            reference = reference_batch(split, index, aug, plan)
            if channels_last:
                reference = reference.contiguous(memory_format=torch.channels_last)
            assert torch.equal(x, reference)  # bitwise, not merely close
            assert x.stride() == reference.stride()  # the same layout: the convolutions take the same path


def test_normalizer_matches_the_plain_formula_and_leaves_the_input_alone():
    images = torch.from_numpy(split_of(6).images)
    before = images.clone()
    x = Normalizer(MEAN, STD)(images)
    plain = (images.permute(0, 3, 1, 2).float() - torch.tensor(MEAN).view(1, 3, 1, 1) * 255) * (
        1.0 / (torch.tensor(STD).view(1, 3, 1, 1) * 255))
    assert torch.equal(x, plain) and x.stride() == plain.stride() and torch.equal(images, before)


def train_steps(accelerator, accumulate, autocast, steps: int = 6) -> dict:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10))
    model, optimizer = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 8, 8, generator=data), torch.randint(0, 10, (4,), generator=data)
        with accumulate(model):
            with autocast():
                loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            if accelerator.sync_gradients:
                model.zero_grad(set_to_none=True)
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_step_contexts_without_accumulation_in_full_precision_train_as_accelerates_contexts():
    accelerator = Accelerator(cpu=True)  # one process, mixed precision "no", gradient_accumulation_steps 1
    accumulate, autocast = step_contexts(accelerator, 1)
    assert accumulate(object()) is NO_CONTEXT and autocast() is NO_CONTEXT and accelerator.sync_gradients
    with autocast():
        assert not torch.is_autocast_enabled("cpu")
    fast = train_steps(accelerator, accumulate, autocast)
    plain = train_steps(accelerator, accelerator.accumulate, accelerator.autocast)
    assert all(torch.equal(fast[k], plain[k]) for k in plain)


def test_step_contexts_keep_accelerates_accumulate_with_accumulation():
    accelerator = Accelerator(cpu=True)
    accumulate, autocast = step_contexts(accelerator, 2)
    assert accumulate == accelerator.accumulate and autocast() is NO_CONTEXT
