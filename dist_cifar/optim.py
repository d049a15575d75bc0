"""Optimizers, the learning-rate schedule over global optimizer steps, and weight averaging (EMA, lookahead)."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from dist_cifar.compat.torch_optim import EagerStart
from dist_cifar.config import Config
from dist_cifar.models import norm_parameters


def peak_lr(cfg: Config, global_batch_size: int) -> float:
    """optim.lr, scaled linearly from optim.lr_reference_batch images to the real global batch."""
    if cfg.optim.lr_reference_batch:
        return cfg.optim.lr * global_batch_size / cfg.optim.lr_reference_batch
    return cfg.optim.lr


def build_optimizer(cfg: Config, model: nn.Module, global_batch_size: int) -> torch.optim.Optimizer:
    """Parameter groups: weights (and biases), normalisation layers (at norm_lr_scale x lr).

    SGD weight decay is decoupled from the learning rate: each step removes `weight_decay` x the
    schedule's factor of every weight, whatever its group's lr (torch's coupled term is set to
    weight_decay / peak group lr, so the decay follows the schedule but not the lr scale).
    """
    o = cfg.optim
    lr = peak_lr(cfg, global_batch_size)
    special = norm_parameters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = [p for p in trainable if id(p) not in special]
    norms = [p for p in trainable if id(p) in special]
    frozen_later = []  # fastnet's whitening bias: trained for model.whiten_bias_epochs, then lr 0
    if cfg.model.whiten_bias_epochs and hasattr(model, "whiten"):
        frozen_later = [model.whiten.bias]
        weights = [p for p in weights if p is not model.whiten.bias]
    norm_decay = o.weight_decay if o.decay_norm else 0.0
    groups = [dict(params=weights, lr=lr, decay=o.weight_decay),
              dict(params=norms, lr=lr * o.norm_lr_scale, decay=norm_decay),
              dict(params=frozen_later, lr=lr, decay=o.weight_decay, freeze_epoch=cfg.model.whiten_bias_epochs)]
    if o.norm_lr_scale == 1.0 and o.weight_decay == 0.0 and not frozen_later:
        groups = [dict(params=weights + norms, lr=lr, decay=0.0)]  # one group: less work per step
    groups = [g for g in groups if g["params"]]
    if o.name == "sgd":
        for g in groups:
            g["weight_decay"] = g["decay"] / g["lr"] if g["lr"] > 0 else 0.0
        return SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov)
    for g in groups:
        g["weight_decay"] = g["decay"]
    return AdamW(groups, lr=lr, betas=tuple(o.betas))


class SGD(EagerStart, torch.optim.SGD):
    pass


class AdamW(EagerStart, torch.optim.AdamW):
    pass


def lr_factor(cfg: Config, step: int, total_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based) of `total_steps`."""
    s = cfg.schedule
    if s.name == "constant" and s.warmup_fraction == 0:
        return 1.0
    progress = step / max(1, total_steps)
    warm = s.warmup_fraction
    if warm > 0 and progress < warm:
        start = s.initial_lr_fraction
        return start + (1 - start) * progress / warm
    rest = (progress - warm) / max(1e-12, 1 - warm)
    end = s.final_lr_fraction
    if s.name == "constant":
        return 1.0
    if s.name in ("linear", "onecycle"):
        return 1 + (end - 1) * rest
    return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * rest))  # cosine


def build_scheduler(cfg: Config, optimizer, total_steps: int, steps_per_epoch: int):
    """A LambdaLR stepped once per optimizer step (never once per process). A group with a
    `freeze_epoch` (fastnet's whitening bias) follows the schedule until that epoch, then has lr 0."""
    def factor(freeze_epoch):
        end = freeze_epoch * steps_per_epoch if freeze_epoch else None
        return lambda step: 0.0 if end is not None and step >= end else lr_factor(cfg, step, total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(g.get("freeze_epoch")) for g in optimizer.param_groups])


class NoAverage:
    """No weight averaging: the loop calls the same hooks and nothing happens."""

    def update(self, step: int, total_steps: int) -> None:
        pass

    def end_epoch(self) -> None:
        pass

    @contextlib.contextmanager
    def evaluation_weights(self):
        yield

    def state_dict(self):
        return None

    def load_state_dict(self, state) -> None:
        pass


class WeightAverage(NoAverage):
    """A second copy of every floating-point weight and buffer of `model`, saved in checkpoints."""

    def __init__(self, model: nn.Module):
        self.live = [v for v in model.state_dict().values() if v.dtype.is_floating_point]
        self.avg = [v.detach().clone() for v in self.live]

    def state_dict(self) -> dict:
        return {"avg": [a.cpu() for a in self.avg]}

    def load_state_dict(self, state) -> None:
        if state:
            for a, s in zip(self.avg, state["avg"]):
                a.copy_(s)


class EMA(WeightAverage):
    """Exponential moving average: after every optimizer step avg <- avg + (1 - decay) (w - avg);
    evaluation and the final model use avg, training goes on with w."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__(model)
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int, total_steps: int) -> None:
        torch._foreach_lerp_(self.avg, self.live, 1 - self.decay)

    @contextlib.contextmanager
    def evaluation_weights(self):
        """The averaged weights in the model for the duration (evaluation, the final model file)."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        for live, avg in zip(self.live, self.avg):
            tmp = live.clone()
            live.copy_(avg)
            avg.copy_(tmp)


class Lookahead(WeightAverage):
    """Every k steps, slow <- slow + (1 - d_t) (w - slow) and w <- slow, with d_t = decay^k (t/T)^3
    rising from 0, as in the CIFAR-10 speed records; every epoch, and so the run, ends on the slow weights."""

    def __init__(self, model: nn.Module, decay: float, every: int):
        super().__init__(model)
        self.decay, self.every = decay, every

    @torch.no_grad()
    def update(self, step: int, total_steps: int) -> None:
        """Call after optimizer step number `step` (1-based)."""
        if step % self.every == 0:
            d = self.decay ** self.every * (step / total_steps) ** 3
            torch._foreach_lerp_(self.avg, self.live, 1 - d)
            torch._foreach_copy_(self.live, self.avg)

    @torch.no_grad()
    def end_epoch(self) -> None:
        torch._foreach_copy_(self.live, self.avg)


def build_average(cfg: Config, model: nn.Module) -> NoAverage:
    """train.ema_decay, else train.lookahead_every, else no averaging."""
    if cfg.train.ema_decay:
        return EMA(model, cfg.train.ema_decay)
    if cfg.train.lookahead_every:
        return Lookahead(model, cfg.train.lookahead_decay, cfg.train.lookahead_every)
    return NoAverage()
