"""The networks: the tutorial's CNN, a small BatchNorm net for CPUs, a ResNet-18 for 32x32 inputs, and a fast
BatchNorm net for GPUs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_cifar.config import ModelConfig


class TutorialNet(nn.Module):
    """Exactly the network of PyTorch's "Training a classifier" tutorial, with N outputs."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class CpuNet(nn.Module):
    """Three (3x3 conv, 2x2 max-pool, BatchNorm, ReLU) stages and one linear layer: about as cheap per image as
    TutorialNet on a CPU (widths 8/16/32: 0.8 M multiply-adds against 0.65 M), but BatchNorm lets it pass the
    tutorial's 56 % after about half an epoch instead of two.

    Pooling comes before BatchNorm and ReLU (as in the CIFAR-10 speed records' conv groups), so those two run
    on a quarter of the pixels: a training step at batch 128 on 2 CPU cores took 0.6-0.7 of the time of the
    conv-BatchNorm-ReLU-pool order, and cpu_fast's accuracy went from 57.58 % to 58.15 % (seed 0)."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (8, 16, 32), image_size: int = 32):
        super().__init__()
        layers, channels = [], 3
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.MaxPool2d(2),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            channels = width
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** len(widths)  # >= 1: the config allows 3 widths and images of 8+ pixels
        self.head = nn.Linear(channels * side * side, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images: a 3x3 stem without max-pooling, four stages of two blocks."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class FrozenScaleBatchNorm(nn.BatchNorm2d):
    """BatchNorm with its scale fixed at 1 (only the bias learns), as in the fast CIFAR-10 nets."""

    def __init__(self, channels: int, momentum: float = 0.4, eps: float = 1e-12):
        super().__init__(channels, eps=eps, momentum=momentum)
        self.weight.requires_grad_(False)


class ConvGroup(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = FrozenScaleBatchNorm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = FrozenScaleBatchNorm(cout)

    def forward(self, x):
        x = F.gelu(self.bn1(self.pool(self.conv1(x))))
        return F.gelu(self.bn2(self.conv2(x)))


class FastNet(nn.Module):
    """A small BatchNorm net in the spirit of the CIFAR-10 speed records.

    A 2x2 patch-whitening convolution (initialised from the training data), three conv groups
    (widths 64/256/256 by default), global max-pooling and a scaled linear head.
    """

    def __init__(self, num_classes: int = 10, widths=(64, 256, 256), scaling: float = 1 / 9):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # fixed at the data's whitening transform; only its bias learns
        self.groups = nn.Sequential(
            ConvGroup(24, widths[0]), ConvGroup(widths[0], widths[1]), ConvGroup(widths[1], widths[2])
        )
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.scaling = scaling
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d) and mod is not self.whiten:
                # Dirac (identity) init of the first in-channels, as the speed-record nets do.
                w = mod.weight.data
                torch.nn.init.dirac_(w[: w.size(1)])

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the first conv to whiten 2x2 patches of `images` (normalised, N x 3 x H x W)."""
        # Second moments of the (already normalised) patches, in float64, 512 images at a time. In float32
        # (one product over all the patches, or float32 products of 64 images summed in float64) the
        # whitened training patches kept correlations of up to 1.2e-3 (9e-5), by amounts that changed
        # with the BLAS's thread count; in float64 1e-6 whatever the threads, for about 0.5 CPU-s.
        cov = torch.zeros(12, 12, dtype=torch.float64, device=images.device)
        count = 0
        for chunk in images.split(512):
            patches = chunk.double().unfold(2, 2, 1).unfold(3, 2, 1)  # n, C, H-1, W-1, 2, 2
            patches = patches.transpose(1, 3).reshape(-1, 3 * 2 * 2)
            cov += patches.T @ patches
            count += len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov / count)
        # each patch row is ordered (c, h, w), so every eigenvector reshapes straight into a filter
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(12, 3, 2, 2)
        weight = torch.cat([filters, -filters]).to(self.whiten.weight)
        self.whiten.weight.copy_(weight)
        self.whiten.bias.zero_()

    def forward(self, x):
        x = F.gelu(self.whiten(x))
        x = self.groups(x)
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) * self.scaling


def build_model(cfg: ModelConfig, num_classes: int, image_size: int = 32) -> nn.Module:
    if cfg.name == "tutorial_net":
        return TutorialNet(num_classes)
    if cfg.name == "cpu_net":
        return CpuNet(num_classes, widths=tuple(cfg.widths), image_size=image_size)
    if cfg.name == "resnet18":
        return ResNet18(num_classes)
    if cfg.name == "fastnet":
        return FastNet(num_classes, widths=tuple(cfg.widths))
    raise ValueError(f"unknown model {cfg.name!r}")


def norm_parameters(model: nn.Module) -> set[int]:
    """ids of normalisation-layer parameters: trained at optim.norm_lr_scale x lr."""
    ids = set()
    for mod in model.modules():
        if isinstance(mod, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            ids |= {id(p) for p in mod.parameters(recurse=False)}
    return ids
