"""FLOPs per image of every shipped model: the hook count of dist_cifar/observe/flops.py against
torch.utils.flop_counter.FlopCounterMode, and tutorial_net against a hand count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_cifar.config import ModelConfig
from dist_cifar.models import build_model
from dist_cifar.observe.flops import describe, flops_per_image, throughput


def shipped_models() -> list[str]:
    return list(ModelConfig.__dataclass_fields__["name"].metadata["choices"])


def flop_counter(net, image_size: int = 32) -> tuple[int, int]:
    """(forward, backward) FLOPs per image by FlopCounterMode, on a batch of 2 (BatchNorm needs > 1 in training)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, y = torch.randn(2, 3, image_size, image_size), torch.tensor([0, 1])
    with FlopCounterMode(display=False) as forward:
        loss = F.cross_entropy(net(x), y)
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    return forward.get_total_flops() // 2, backward.get_total_flops() // 2


def test_tutorial_net_against_a_hand_count():
    # Multiply-adds of one 32x32 RGB image forward, layer by layer (output elements x inputs per output):
    conv1 = 6 * 28 * 28 * (3 * 5 * 5)      # 352,800: 6 maps of 28x28, each a 3x5x5 window
    conv2 = 16 * 10 * 10 * (6 * 5 * 5)     # 240,000: 16 maps of 10x10 (after 2x2 pooling to 14x14), 6x5x5 windows
    fc1, fc2, fc3 = 400 * 120, 120 * 84, 84 * 10  # 48,000 + 10,080 + 840
    macs = conv1 + conv2 + fc1 + fc2 + fc3
    assert macs == 651_720  # "about 0.65 M multiply-adds", as the tutorial's net is known
    # Backward: each layer's weight gradient costs its forward again, and its input gradient too, except
    # conv1's, whose input is the image (no gradient wanted).
    counted = flops_per_image(build_model(ModelConfig(name="tutorial_net"), 10), 32)
    assert counted == {"forward": 2 * macs, "backward": 2 * (2 * macs - conv1), "total": 2 * (3 * macs - conv1)}
    assert describe(counted) == "1.30 + 1.90 MFLOP per training image (forward + backward)"


@pytest.mark.parametrize("name", ["tutorial_net", "cpu_net", "resnet18", "fastnet"])
def test_every_shipped_model_counts_as_flop_counter_does(name):
    assert name in shipped_models()
    cfg = ModelConfig(name=name, widths=[8, 16, 32] if name == "cpu_net" else [64, 256, 256])
    torch.manual_seed(0)
    net = build_model(cfg, 10, 32)
    counted = flops_per_image(net, 32)
    forward, backward = flop_counter(net)
    assert (counted["forward"], counted["backward"]) == (forward, backward)
    assert counted["forward"] > 0 and counted["total"] == forward + backward


def test_the_list_of_models_is_the_one_tested():
    assert sorted(shipped_models()) == sorted(["tutorial_net", "cpu_net", "resnet18", "fastnet"])


def test_counting_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    net = build_model(ModelConfig(name="cpu_net", widths=[8, 16, 32]), 10, 32)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flops_per_image(net, 32)
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(m._forward_hooks for m in net.modules())


def test_throughput_on_a_cpu_has_no_mfu():
    out = throughput(3_205_000, 1000.0, world=2, peak=None)
    assert out["achieved_flops_per_second"] == 3_205_000_000
    assert out["achieved_flops_per_second_per_process"] == 1_602_500_000
    assert out["train_images_per_second_per_process"] == 500.0 and "mfu" not in out
    with_peak = throughput(3_205_000, 1000.0, world=2, peak=(1e12, "a test GPU"))
    assert with_peak["mfu"] == round(1_602_500_000 / 1e12, 5) and with_peak["peak_source"] == "a test GPU"
    assert throughput(None, 1000.0, 1, None) == {} and throughput(1, None, 1, None) == {}
