"""dist_cifar.models in-process: output shapes of every model, and fastnet's patch whitening."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_cifar.config import ModelConfig
from dist_cifar.models import FastNet, build_model, norm_parameters


@pytest.mark.parametrize("name, widths, image_size", [
    ("tutorial_net", [64, 256, 256], 32),
    ("cpu_net", [8, 16, 32], 32),
    ("cpu_net", [4, 4, 4], 16),
    ("resnet18", [64, 256, 256], 32),
    ("fastnet", [8, 16, 16], 32),
])
def test_every_model_gives_one_logit_per_class(name, widths, image_size):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, widths=widths), num_classes=7, image_size=image_size).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, image_size, image_size))
    assert out.shape == (3, 7) and torch.isfinite(out).all()


def test_norm_parameters_are_the_batchnorm_ones():
    model = build_model(ModelConfig(name="cpu_net", widths=[4, 4, 4]), num_classes=10)
    ids = norm_parameters(model)
    named = {name for name, p in model.named_parameters() if id(p) in ids}
    assert named == {f"features.{i}.{w}" for i in (2, 6, 10) for w in ("weight", "bias")}
    assert norm_parameters(build_model(ModelConfig(name="tutorial_net"), num_classes=10)) == set()


def smooth_images(n: int = 64, size: int = 12) -> torch.Tensor:
    """Correlated pixels and channels (neighbours share most of their value), so 2x2 patches are far from white."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, 1, size + 1, size + 1, generator=g)
    smooth = (base[:, :, 1:, 1:] + base[:, :, :-1, 1:] + base[:, :, 1:, :-1] + base[:, :, :-1, :-1]) / 2
    colour = torch.tensor([1.0, 0.8, 0.5]).view(1, 3, 1, 1)
    return smooth * colour + 0.3 * torch.randn(n, 3, size, size, generator=g) + 0.2


def patch_second_moment(features: torch.Tensor) -> torch.Tensor:
    """N x C x H x W -> C x C mean of outer products over every position (not centred, as the code promises)."""
    flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    return flat.T @ flat / len(flat)


def test_whitening_gives_patches_an_identity_second_moment():
    images = smooth_images()
    net = FastNet(widths=(8, 8, 8))
    raw = F.unfold(images, 2).transpose(1, 2).reshape(-1, 12)  # every 2x2x3 patch as a row
    raw_moment = raw.T @ raw / len(raw)
    assert (raw_moment - torch.eye(12)).abs().max() > 0.5  # far from white before
    net.init_whitening(images, eps=1e-6)
    out = F.conv2d(images, net.whiten.weight)  # no bias: the code zeroes it
    first, second = out[:, :12], out[:, 12:]
    assert torch.allclose(second, -first)  # the 24 filters are 12 and their negatives
    assert torch.allclose(patch_second_moment(first), torch.eye(12), atol=2e-3)
    assert torch.count_nonzero(net.whiten.bias) == 0 and not net.whiten.weight.requires_grad


def test_whitening_eps_damps_the_weakest_directions():
    images = smooth_images()
    net = FastNet(widths=(8, 8, 8))
    net.init_whitening(images, eps=1.0)
    moment = patch_second_moment(F.conv2d(images, net.whiten.weight)[:, :12])
    eigenvalues = torch.linalg.eigvalsh(moment)
    # each direction of variance v comes out with v / (v + 1) < 1: damped, most of all the small ones
    assert eigenvalues.max() < 1.0 and eigenvalues.min() < 0.2
