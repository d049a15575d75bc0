"""The loop's two bookkeeping rules, in-process: when a checkpoint is written, and how one stopwatch
and one image counter feed every rate."""

from __future__ import annotations

import time

import pytest

from dist_cifar.config import load_config
from dist_cifar.state.resume import Progress
from dist_cifar.engine.clock import EpochClock
from dist_cifar.engine.run import checkpoint_due

STEPS_PER_EPOCH = 10


def saved_steps(overrides: list[str], epochs: int = 3) -> list[tuple[int, str]]:
    """(step, where) of every save a 3-epoch run of 10 steps an epoch makes: the loop's two call sites."""
    cfg = load_config(None, overrides)
    saves, step = [], 0
    for epoch in range(1, epochs + 1):
        for _ in range(STEPS_PER_EPOCH):
            step += 1
            if checkpoint_due(cfg, step, end_of_epoch=step % STEPS_PER_EPOCH == 0):
                saves.append((step, "step"))
        if checkpoint_due(cfg, step, end_of_epoch=True, epoch=epoch, final=epoch == epochs):
            saves.append((step, "epoch"))
    return saves


def test_every_steps_dividing_the_epoch_writes_each_step_once():
    saves = saved_steps(["checkpoint.every_steps=5", "checkpoint.every_epochs=0"])
    steps = [s for s, _ in saves]
    assert steps == [5, 10, 15, 20, 25, 30], saves
    # the epoch's last step is saved by the epoch's end (with its metrics record), not by the step trigger
    assert [where for s, where in saves if s % STEPS_PER_EPOCH == 0] == ["epoch"] * 3


def test_every_epochs_and_the_end():
    assert saved_steps(["checkpoint.every_steps=0", "checkpoint.every_epochs=2"]) == [(20, "epoch"), (30, "epoch")]
    assert saved_steps(["checkpoint.every_steps=0", "checkpoint.every_epochs=0"]) == [(30, "epoch")]


def test_every_steps_not_dividing_the_epoch():
    saves = saved_steps(["checkpoint.every_steps=4", "checkpoint.every_epochs=0"])
    assert saves == [(4, "step"), (8, "step"), (12, "step"), (16, "step"), (20, "epoch"), (24, "step"),
                     (28, "step"), (30, "epoch")]


def test_clock_pauses_for_saves_and_counts_every_image_once():
    progress = Progress(train_seconds=10.0, train_images=1000)  # an earlier attempt's totals
    clock = EpochClock(progress)
    clock.count(64)
    time.sleep(0.05)
    with clock.paused():  # a checkpoint: its time is not training time
        assert progress.train_images == 1064
        time.sleep(0.2)
    clock.count(64)
    time.sleep(0.05)
    clock.settle()
    assert progress.train_images == 1128 and clock.images == 128
    assert 0.09 <= clock.seconds < 0.2, clock.seconds  # the 0.2 s pause is left out
    assert progress.train_seconds == pytest.approx(10.0 + clock.seconds)
    assert clock.rate() == pytest.approx(128 / clock.seconds, rel=0.2)


def test_clock_without_steps_has_no_rate():
    assert EpochClock(Progress()).rate() is None


WATCH_TORCH_IMPORT = """
import os, sys
seen = []
class Watch:  # records OMP_WAIT_POLICY at the moment torch is first imported
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))
sys.meta_path.insert(0, Watch())
import runpy
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
import torch  # --help itself loads no torch (nor does --print-config): what would a run's import have seen
print(seen[0])
"""


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_trainer_sets_openmps_wait_policy_before_torch_loads(given, expected):
    """train.py, run as a file (as torchrun and accelerate launch run it), sets OMP_WAIT_POLICY=PASSIVE
    before torch (and its OpenMP) load, unless the environment already says otherwise."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    script = Path(__file__).resolve().parents[2] / "dist_cifar" / "train.py"
    out = subprocess.run([sys.executable, "-c", WATCH_TORCH_IMPORT, str(script)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == expected
