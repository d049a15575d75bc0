"""dist_cifar.observe.progress in-process: tqdm on a terminal, plain timed lines anywhere else."""

from __future__ import annotations

import io

import pytest
from tqdm import tqdm

from dist_cifar.observe.progress import SECONDS_VAR, LineProgress, duration, progress_bar


class FakeStream(io.StringIO):
    """A text stream that says whether it is a terminal."""

    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def drive(bar, clock, steps: int, seconds_per_step: float) -> None:
    """What train.py does with a bar: a description per epoch, postfix now and then, one update per step."""
    bar.set_description("epoch 1/2")
    for step in range(steps):
        clock.now += seconds_per_step
        bar.update(1)
        bar.set_postfix(loss=f"{2.0 - step / 1000:.3f}", lr="0.01", img_s="1234")


def test_a_terminal_gets_tqdm():
    stream = FakeStream(tty=True)
    bar = progress_bar(100, initial=10, stream=stream)
    assert isinstance(bar, tqdm) and bar.n == 10 and bar.total == 100
    bar.set_description("epoch 1/2")
    bar.update(1)
    bar.set_postfix(loss="1.000")
    bar.close()
    bar.close()
    assert "\r" in stream.getvalue()  # a terminal gets the redrawn bar


@pytest.mark.parametrize("stream", [FakeStream(tty=False), io.StringIO(), object()])
def test_anything_but_a_terminal_gets_lines(stream):
    assert isinstance(progress_bar(100, stream=stream), LineProgress)


def test_lines_come_every_interval_without_carriage_returns():
    stream, clock = FakeStream(tty=False), Clock()
    bar = progress_bar(400, stream=stream, interval=30, clock=clock)
    drive(bar, clock, steps=400, seconds_per_step=0.5)  # 200 s: a line at 30, 60, ... 180 s
    bar.close()
    bar.close()  # twice is fine, and writes nothing more
    text = stream.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n")
    assert len(lines) == 6 + 1  # six timed lines and the closing one
    assert lines[0] == "epoch 1/2  step 60/400 (15%)  loss 1.942  lr 0.01  1234 img/s  elapsed 30s  eta 2m50s"
    assert lines[-1].startswith("epoch 1/2  step 400/400 (100%)  loss 1.601") and "elapsed 3m20s  eta 0s" in lines[-1]


def test_a_resumed_run_counts_from_its_initial_step():
    stream, clock = FakeStream(tty=False), Clock()
    bar = progress_bar(1000, initial=900, stream=stream, interval=10, clock=clock)
    clock.now += 10
    bar.update(10)  # 10 steps in 10 s this attempt: 90 left at 1 step/s
    assert stream.getvalue() == "step 910/1000 (91%)  elapsed 10s  eta 1m30s\n"
    bar.close()
    assert stream.getvalue().count("\n") == 1  # nothing new since the last line: no closing line


def test_the_interval_comes_from_the_environment(monkeypatch):
    stream, clock = FakeStream(tty=False), Clock()
    monkeypatch.setenv(SECONDS_VAR, "2")
    bar = progress_bar(100, stream=stream, clock=clock)
    drive(bar, clock, steps=10, seconds_per_step=1.0)
    assert len(stream.getvalue().splitlines()) == 5

    monkeypatch.setenv(SECONDS_VAR, "soon")
    with pytest.raises(ValueError, match=SECONDS_VAR):
        progress_bar(100, stream=stream)


def test_the_default_interval_keeps_a_long_log_small(monkeypatch):
    """Ten hours of training: 1,200 lines of under 100 characters, ~110 KB."""
    monkeypatch.delenv(SECONDS_VAR, raising=False)
    stream, clock = FakeStream(tty=False), Clock()
    bar = progress_bar(100_000, stream=stream, clock=clock)
    drive(bar, clock, steps=100_000, seconds_per_step=0.36)  # 10 hours
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) in (1200, 1201) and max(map(len, lines)) < 100


def test_a_disabled_bar_writes_nothing():
    for tty in (True, False):
        stream, clock = FakeStream(tty=tty), Clock()
        bar = progress_bar(10, stream=stream, enabled=False, interval=0, clock=clock)
        drive(bar, clock, steps=10, seconds_per_step=1)
        bar.close()
        bar.close()
        assert stream.getvalue() == ""


def test_a_closed_log_does_not_stop_training():
    stream, clock = FakeStream(tty=False), Clock()
    bar = progress_bar(10, stream=stream, interval=0, clock=clock)
    stream.close()
    drive(bar, clock, steps=3, seconds_per_step=1)
    bar.close()


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (44.6, "45s"), (62, "1m02s"), (3599, "59m59s"),
                                           (7500, "2h05m")])
def test_durations(seconds, text):
    assert duration(seconds) == text
