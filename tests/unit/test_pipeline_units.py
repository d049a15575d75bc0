"""dist_cifar.data.batches in-process: seeded epoch plans, shards over ranks and accumulation steps, the test
split's shards, and the crop and flip augmentation against an independent numpy version."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_cifar.config import AugmentConfig
from dist_cifar.data.sources import Split
from dist_cifar.data.batches import DeviceBatches, augment, epoch_plan, eval_batches

CPU = torch.device("cpu")


def numbered_split(n: int, size: int = 4) -> Split:
    """n images whose label is their own index, and whose pixels are all different from each other."""
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return Split(images, np.arange(n, dtype=np.int64))


def test_epoch_plan_is_a_function_of_seed_and_epoch():
    aug = AugmentConfig(crop_padding=2, flip=True)
    a, b = epoch_plan(50, 7, 3, aug), epoch_plan(50, 7, 3, aug)
    assert torch.equal(a.order, b.order) and torch.equal(a.flip, b.flip) and torch.equal(a.shift, b.shift)
    assert sorted(a.order.tolist()) == list(range(50))
    for other in (epoch_plan(50, 7, 4, aug), epoch_plan(50, 8, 3, aug)):
        assert not torch.equal(a.order, other.order)
        assert not torch.equal(a.flip, other.flip) and not torch.equal(a.shift, other.shift)


def test_epoch_plan_without_shuffle_or_augmentation():
    plan = epoch_plan(6, 0, 0, AugmentConfig(), shuffle=False)
    assert plan.order.tolist() == [0, 1, 2, 3, 4, 5] and plan.flip is None and plan.shift is None


def test_crop_offsets_cover_zero_to_twice_the_padding():
    shift = epoch_plan(2000, 1, 0, AugmentConfig(crop_padding=2)).shift
    assert shift.shape == (2000, 2) and set(shift.flatten().tolist()) == {0, 1, 2, 3, 4}


def test_flip_alternate_mirrors_each_image_every_other_epoch():
    aug = AugmentConfig(flip=True, flip_alternate=True)
    flips = [epoch_plan(1000, 5, e, aug).flip for e in range(4)]
    assert torch.equal(flips[1], ~flips[0]) and torch.equal(flips[2], flips[0]) and torch.equal(flips[3], flips[1])
    assert 400 < int(flips[0].sum()) < 600  # a random half, not all or none
    random_flips = [epoch_plan(1000, 5, e, AugmentConfig(flip=True)).flip for e in range(2)]
    assert not torch.equal(random_flips[1], ~random_flips[0])  # plain flips are drawn afresh


def micro_steps(split: Split, world: int, batch: int, accum: int, epoch: int, aug: AugmentConfig):
    """{(rank, micro_step): (labels, images)} of one epoch, for the micro-steps that make whole optimizer steps."""
    out = {}
    for rank in range(world):
        batches = DeviceBatches(split, batch_size=batch, rank=rank, world_size=world, seed=11, augment_cfg=aug,
                                mean=[0.5] * 3, std=[0.25] * 3, device=CPU)
        usable = len(batches) // accum * accum
        for m, item in enumerate(batches.epoch(epoch)):
            if m < usable:
                out[rank, m] = (item[1].tolist(), item[0])
    return out


def per_optimizer_step(steps: dict, accum: int) -> list[set]:
    grouped: dict[int, set] = {}
    for (rank, m), (labels, _) in steps.items():
        grouped.setdefault(m // accum, set()).update(labels)
    return [grouped[t] for t in sorted(grouped)]


# global batch 12 split as world x per-device batch x accumulation steps
SPLITS = [(1, 12, 1), (1, 4, 3), (1, 1, 12), (2, 6, 1), (2, 2, 3), (3, 4, 1), (3, 2, 2), (3, 1, 4)]


@pytest.mark.parametrize("n", [96, 101])
def test_every_split_of_a_global_batch_trains_on_the_same_samples_per_optimizer_step(n):
    split = numbered_split(n)
    aug = AugmentConfig()
    reference = per_optimizer_step(micro_steps(split, 1, 12, 1, 2, aug), 1)
    assert len(reference) == n // 12 and all(len(s) == 12 for s in reference)
    for world, batch, accum in SPLITS:
        steps = micro_steps(split, world, batch, accum, 2, aug)
        labels = [i for labels, _ in steps.values() for i in labels]
        assert len(labels) == len(set(labels)) == 12 * (n // 12), (world, batch, accum)  # disjoint, none dropped
        assert per_optimizer_step(steps, accum) == reference, (world, batch, accum)


def test_a_sample_gets_the_same_augmentation_whatever_the_split():
    split = numbered_split(48)
    aug = AugmentConfig(crop_padding=1, flip=True)
    by_sample = {}
    for world, batch, accum in [(1, 12, 1), (2, 2, 3), (3, 4, 1)]:
        for labels, images in micro_steps(split, world, batch, accum, 1, aug).values():
            for label, image in zip(labels, images):
                if label in by_sample:
                    assert torch.equal(by_sample[label], image), (label, world, batch, accum)
                else:
                    by_sample[label] = image
    assert len(by_sample) == 48


def test_device_batches_refuse_a_split_smaller_than_one_global_batch():
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        DeviceBatches(numbered_split(5), batch_size=3, rank=0, world_size=2, seed=0, augment_cfg=AugmentConfig(),
                      mean=[0.5] * 3, std=[0.5] * 3, device=CPU)


@pytest.mark.parametrize("n, world, batch", [(10, 1, 3), (10, 3, 2), (10, 4, 500), (7, 3, 1), (2, 3, 4)])
def test_eval_shards_cover_the_test_split_exactly_once_in_order(n, world, batch):
    split = numbered_split(n)
    seen = []
    for rank in range(world):
        for x, y in eval_batches(split, batch_size=batch, rank=rank, world_size=world, mean=[0.0] * 3,
                                 std=[1 / 255] * 3, device=CPU):
            assert len(y) <= batch
            # mean 0, std 1/255: the normalised image is the uint8 image itself, channels first
            expected = torch.from_numpy(split.images[y.numpy()]).permute(0, 3, 1, 2).float()
            assert torch.allclose(x, expected)
            seen += y.tolist()
    assert seen == list(range(n))


def reflect_crop(image: np.ndarray, dy: int, dx: int, padding: int) -> np.ndarray:
    """C x H x W: pad by mirroring without repeating the edge (numpy's 'reflect'), cut H x W at (dy, dx)."""
    padded = np.pad(image, ((0, 0), (padding, padding), (padding, padding)), mode="reflect")
    return padded[:, dy:dy + image.shape[1], dx:dx + image.shape[2]]


def test_flip_mirrors_left_to_right():
    x = torch.arange(2 * 3 * 2 * 3, dtype=torch.float32).view(2, 3, 2, 3)
    out = augment(x, torch.tensor([True, False]), None, 0)
    # image 0, channel 1 holds rows 6 7 8 and 9 10 11
    assert out[0, 1, 0].tolist() == [8.0, 7.0, 6.0] and out[0, 1, 1].tolist() == [11.0, 10.0, 9.0]
    assert torch.equal(out[1], x[1])


def test_crop_equals_an_independent_reflect_padded_crop():
    rng = np.random.default_rng(0)
    padding = 2
    offsets = [(dy, dx) for dy in range(5) for dx in range(5)]  # every offset in [0, 2 x padding]
    x = torch.from_numpy(rng.standard_normal((len(offsets), 3, 6, 5)).astype(np.float32))
    shift = torch.tensor(offsets)
    out = augment(x, None, shift, padding)
    for i, (dy, dx) in enumerate(offsets):
        assert np.array_equal(out[i].numpy(), reflect_crop(x[i].numpy(), dy, dx, padding)), (dy, dx)
    assert torch.equal(out[12], x[12])  # offset (2, 2): the image itself


def test_crop_then_flip():
    x = torch.arange(1 * 1 * 4 * 4, dtype=torch.float32).view(1, 1, 4, 4)
    out = augment(x, torch.tensor([True]), torch.tensor([[0, 2]]), 1)
    # pad 1, rows -1..2, columns 1..4 (column 4 mirrors column 2), then mirror left-right
    expected = np.flip(reflect_crop(x[0].numpy(), 0, 2, 1), axis=2)
    assert np.array_equal(out[0].numpy(), expected)
    assert out[0, 0, 0].tolist() == [6.0, 7.0, 6.0, 5.0]  # row -1 is row 1: 4 5 6 7, columns 1..4 = 5 6 7 6
