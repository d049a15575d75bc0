"""dist_cifar.optim in-process: schedule values at chosen steps, lr scaling, parameter groups and
decoupled weight decay, EMA and lookahead arithmetic. Every expected number is worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dist_cifar.config import load_config
from dist_cifar.models import CpuNet, FastNet
from dist_cifar.optim import build_average, build_optimizer, build_scheduler, lr_factor, peak_lr


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    monkeypatch.delenv("DIST_CIFAR_DATA", raising=False)


def config(*overrides: str):
    return load_config(None, list(overrides))


def lrs_after_each_step(cfg, total_steps: int, lr: float) -> list[float]:
    """The lr of the first group before step 0 and after each of `total_steps` optimizer steps."""
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = build_scheduler(cfg, optimizer, total_steps, steps_per_epoch=total_steps)
    seen = [optimizer.param_groups[0]["lr"]]
    for _ in range(total_steps):
        optimizer.step()
        scheduler.step()
        seen.append(optimizer.param_groups[0]["lr"])
    return seen


def test_constant_schedule_keeps_the_peak():
    assert lrs_after_each_step(config("schedule.name=constant"), 5, 0.3) == pytest.approx([0.3] * 6)


def test_constant_with_warmup_rises_linearly_then_stays():
    cfg = config("schedule.name=constant", "schedule.warmup_fraction=0.5", "schedule.initial_lr_fraction=0.2")
    # 8 steps, warmup over the first 4: 0.2, 0.4, 0.6, 0.8, then the peak
    assert lrs_after_each_step(cfg, 8, 2.0) == pytest.approx([0.4, 0.8, 1.2, 1.6, 2.0, 2.0, 2.0, 2.0, 2.0])


def test_linear_schedule_values():
    cfg = config("schedule.name=linear", "schedule.final_lr_fraction=0.0")
    assert lrs_after_each_step(cfg, 4, 1.0) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_cosine_schedule_values():
    cfg = config("schedule.name=cosine", "schedule.final_lr_fraction=0.1")
    half_way = 0.1 + 0.9 * 0.5  # cos(pi / 2) = 0
    quarter = 0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2  # cos(pi / 4) = sqrt(1/2)
    three_quarters = 0.1 + 0.9 * (1 - math.sqrt(0.5)) / 2
    assert lrs_after_each_step(cfg, 4, 1.0) == pytest.approx([1.0, quarter, half_way, three_quarters, 0.1])


def test_onecycle_warmup_then_linear_down_to_the_final_fraction():
    cfg = config("schedule.name=onecycle", "schedule.warmup_fraction=0.2", "schedule.initial_lr_fraction=0.2",
                 "schedule.final_lr_fraction=0.07")
    # 10 steps: up from 0.2 to 1 over steps 0..2, then down to 0.07 at step 10 (0.93 / 8 per step)
    expected = [0.2, 0.6, 1.0] + [1.0 - 0.93 * i / 8 for i in range(1, 9)]
    assert [lr_factor(cfg, step, 10) for step in range(11)] == pytest.approx(expected)
    assert lr_factor(cfg, 6, 10) == pytest.approx(0.535)


def test_lr_reference_batch_scales_linearly_with_the_global_batch():
    cfg = config("optim.lr=1.5", "optim.lr_reference_batch=1024")
    assert peak_lr(cfg, 256) == pytest.approx(0.375)
    assert peak_lr(cfg, 2048) == pytest.approx(3.0)
    assert peak_lr(config("optim.lr=1.5"), 256) == 1.5  # 0 = the lr as given, whatever the batch
    optimizer = build_optimizer(cfg, nn.Linear(3, 2), global_batch_size=512)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.75])


def is_batchnorm(name: str) -> bool:
    """CpuNet's features are (conv, pool, BatchNorm, ReLU) x 3: the BatchNorms are features.2, .6 and .10."""
    return name.split(".")[:2] in (["features", "2"], ["features", "6"], ["features", "10"])


def _one_plain_step(cfg, model, grad: float, global_batch_size: int = 64):
    """One optimizer step with every gradient set to `grad`; returns {name: (before, after)}."""
    optimizer = build_optimizer(cfg, model, global_batch_size)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, grad)
    optimizer.step()
    return {n: (before[n], p.detach()) for n, p in model.named_parameters()}


def test_norm_lr_scale_moves_batchnorm_parameters_further():
    torch.manual_seed(0)
    cfg = config("optim.name=sgd", "optim.momentum=0", "optim.lr=0.01", "optim.norm_lr_scale=8")
    moved = _one_plain_step(cfg, CpuNet(widths=(4, 4, 4)), grad=1.0)
    for name, (before, after) in moved.items():
        step = 0.08 if is_batchnorm(name) else 0.01
        assert torch.allclose(before - after, torch.full_like(before, step), atol=1e-6), name


@pytest.mark.parametrize("decay_norm", [False, True])
def test_sgd_weight_decay_is_decoupled_from_the_group_lr(decay_norm):
    """With zero gradients, one step shrinks each decayed weight by exactly weight_decay, whatever its
    group's lr (here 0.375 for weights, 64 x that for BatchNorm); undecayed BatchNorm parameters stay."""
    torch.manual_seed(0)
    cfg = config("optim.name=sgd", "optim.momentum=0", "optim.lr=1.5", "optim.lr_reference_batch=1024",
                 "optim.weight_decay=0.002", "optim.norm_lr_scale=64", f"optim.decay_norm={str(decay_norm).lower()}")
    model = CpuNet(widths=(4, 4, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5)
    moved = _one_plain_step(cfg, model, grad=0.0, global_batch_size=256)
    for name, (before, after) in moved.items():
        factor = 0.998 if (decay_norm or not is_batchnorm(name)) else 1.0
        assert torch.allclose(after, before * factor, rtol=1e-6), name


def test_whitening_bias_stops_learning_after_whiten_bias_epochs():
    """fastnet's whitening bias has its own group; from epoch 2 (3 steps per epoch) its lr is 0, the rest go on."""
    cfg = config("model.name=fastnet", "model.widths=[4, 4, 4]", "model.whiten_bias_epochs=2",
                 "optim.name=sgd", "optim.lr=0.1")
    model = FastNet(widths=(4, 4, 4))
    optimizer = build_optimizer(cfg, model, global_batch_size=8)
    scheduler = build_scheduler(cfg, optimizer, total_steps=12, steps_per_epoch=3)
    bias_group = [g for g in optimizer.param_groups if any(p is model.whiten.bias for p in g["params"])]
    assert len(bias_group) == 1 and len(bias_group[0]["params"]) == 1
    assert all(p is not model.whiten.weight for g in optimizer.param_groups for p in g["params"])  # fixed
    history = []
    for _ in range(8):
        optimizer.step()
        scheduler.step()
        history.append((bias_group[0]["lr"], optimizer.param_groups[0]["lr"]))
    # after steps 1..5 (epochs 0 and 1) the bias trains at 0.1; from step 6 (epoch 2 starts) at 0
    assert [b for b, _ in history] == pytest.approx([0.1] * 5 + [0.0] * 3)
    assert [w for _, w in history] == pytest.approx([0.1] * 8)


class Scalar(nn.Module):
    """One weight and one buffer, both set by hand."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.register_buffer("running", torch.zeros(1))
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))  # not floating: never averaged

    def set(self, value: float) -> None:
        with torch.no_grad():
            self.w.fill_(value)
            self.running.fill_(2 * value)
            self.count.fill_(int(value))


def test_ema_of_a_constant_target_approaches_it_geometrically():
    model = Scalar()
    average = build_average(config("train.ema_decay=0.9"), model)
    model.set(1.0)
    for step in range(1, 4):
        average.update(step, 10)
    # avg = 1 - 0.9^3 = 0.271 for w (started at 0); buffers averaged too: 2 x that
    with average.evaluation_weights():
        assert model.w.item() == pytest.approx(0.271) and model.running.item() == pytest.approx(0.542)
        assert model.count.item() == 1  # integers are not averaged
    assert model.w.item() == 1.0 and model.running.item() == 2.0  # live weights back after evaluation
    assert average.state_dict()["avg"][0].item() == pytest.approx(0.271)


def test_ema_follows_a_changing_weight():
    model = Scalar()
    average = build_average(config("train.ema_decay=0.5"), model)
    for step, value in enumerate([4.0, 0.0, 8.0], start=1):
        model.set(value)
        average.update(step, 3)
    # 0 -> 2 -> 1 -> 4.5
    with average.evaluation_weights():
        assert model.w.item() == pytest.approx(4.5)


def test_lookahead_pulls_every_k_steps_with_a_rising_decay():
    """every=2, decay=0.5, 4 steps: at step 2 d = 0.25 (2/4)^3 = 1/32, at step 4 d = 0.25."""
    model = Scalar()
    average = build_average(config("train.lookahead_every=2", "train.lookahead_decay=0.5"), model)
    model.set(1.0)
    average.update(1, 4)
    assert model.w.item() == 1.0  # step 1: nothing happens
    average.update(2, 4)
    slow = 31 / 32  # 0 + (1 - 1/32) (1 - 0)
    assert model.w.item() == pytest.approx(slow)  # the fast weights are reset to the slow ones
    model.set(2.0)
    average.update(3, 4)
    assert model.w.item() == 2.0
    average.update(4, 4)
    slow = slow + 0.75 * (2.0 - slow)
    assert model.w.item() == pytest.approx(slow) and model.running.item() == pytest.approx(2 * slow)
    model.set(5.0)
    average.end_epoch()  # the epoch ends on the slow weights
    assert model.w.item() == pytest.approx(slow)


def test_no_average_leaves_the_weights_alone():
    model = Scalar()
    average = build_average(config(), model)
    model.set(3.0)
    average.update(1, 1)
    average.end_epoch()
    with average.evaluation_weights():
        assert model.w.item() == 3.0
    assert average.state_dict() is None


EAGER_VS_TORCH = r'''
import sys
import torch
from torch import nn
from dist_cifar.config import load_config
from dist_cifar.optim import build_optimizer

def train(overrides, steps, resume_at=None):
    """`steps` optimizer steps on fixed data; with resume_at, a fresh model and optimizer take over there
    from the state dicts (as a resumed run does). Returns the weights and the optimizer's state dict."""
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    make = lambda: nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    model = make()
    optimizer = build_optimizer(cfg, model, 16)
    for step in range(steps):
        if step == resume_at:
            state, weights = optimizer.state_dict(), model.state_dict()
            model = make()
            model.load_state_dict(weights)
            optimizer = build_optimizer(cfg, model, 16)
            optimizer.load_state_dict(state)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()], optimizer.state_dict()

RECIPES = [["optim.name=sgd", "optim.lr=0.1", "optim.nesterov=true", "optim.weight_decay=0.01", "optim.norm_lr_scale=4"],
           ["optim.name=adamw", "optim.lr=0.01", "optim.weight_decay=0.05"]]
bare = [(train(r, 5), train(r, 5, resume_at=2)) for r in RECIPES]
print("compiler loaded while bare:", "torch._dynamo" in sys.modules)
import torch._dynamo
wrapped = [train(r, 5) for r in RECIPES]

def same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
    return a == b

for recipe, (straight, resumed), torch_path in zip(RECIPES, bare, wrapped):
    print(recipe[0], "bare == torch's wrapped path:", same(straight, torch_path),
          "resumed == straight:", same(resumed, straight))
'''


def test_optimizers_skip_the_compiler_import_and_match_torchs_own_steps_bit_for_bit():
    """In a fresh process: SGD and AdamW from build_optimizer train, save, load and resume without importing
    torch._dynamo (2-3 CPU-s of start-up), and their weights and state equal those of torch's wrapped
    methods (used once torch._dynamo is loaded) bit for bit, straight and resumed."""
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", EAGER_VS_TORCH], cwd=Path(__file__).resolve().parents[2],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == [
        "compiler loaded while bare: False",
        "optim.name=sgd bare == torch's wrapped path: True resumed == straight: True",
        "optim.name=adamw bare == torch's wrapped path: True resumed == straight: True"], out.stdout


STILL_NEEDED = r'''
import sys
import torch
from torch import nn
assert "torch._dynamo" not in sys.modules
model = nn.Linear(2, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model(torch.ones(1, 2)).sum().backward()
optimizer.step()
print("torch's own step loads the compiler:", "torch._dynamo" in sys.modules)
'''


def test_the_eager_start_workaround_is_still_needed_and_skips_only_torchs_known_wrappers():
    """The day torch's optimizers stop importing torch._dynamo on a plain step, EagerStart (dist_cifar/compat/
    torch_optim.py) is dead weight: this fails then. And the function it calls is the one torch's wrapper
    calls (its __wrapped__), behind exactly one wrapper of a known kind; an unknown decorator is never
    skipped."""
    import subprocess
    import sys
    from pathlib import Path

    from dist_cifar.compat import torch_optim

    out = subprocess.run([sys.executable, "-c", STILL_NEEDED], cwd=Path(__file__).resolve().parents[2],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("True"), (
        "torch's optimizer step no longer imports torch._dynamo: delete dist_cifar/compat/torch_optim.py "
        "and EagerStart from dist_cifar/optim.py")
    import inspect

    for cls, name in [(torch.optim.SGD, "step"), (torch.optim.AdamW, "step"), (torch.optim.SGD, "zero_grad"),
                      (torch.optim.AdamW, "state_dict"), (torch.optim.SGD, "load_state_dict"),
                      (torch.optim.SGD, "add_param_group")]:
        wrapped = inspect.getattr_static(cls, name)
        if getattr(wrapped, "hooked", False):  # torch's profiler hook, put on a class the first time it is built
            wrapped = wrapped.__wrapped__
        assert torch_optim.wrapper_of(wrapped) in torch_optim.KNOWN_WRAPPERS, (cls, name, torch_optim.wrapper_of(wrapped))
        assert torch_optim.bare_function(wrapped) is wrapped.__wrapped__
        assert not hasattr(wrapped.__wrapped__, "__wrapped__")

    def does_real_work(function):
        def counting(*args, **kwargs):
            return function(*args, **kwargs)
        counting.__wrapped__ = function
        return counting

    assert torch_optim.bare_function(does_real_work(torch.optim.SGD.step)) is None  # an unknown layer on top
