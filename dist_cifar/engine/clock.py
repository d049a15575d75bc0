"""The epoch's one stopwatch and one image counter, and its running sums (loss, images, curve marks)."""

from __future__ import annotations

import contextlib
import math
import time

import torch

from dist_cifar.state.resume import Progress

CURVE_POINTS_PER_EPOCH = 20  # train-loss points for the training-curve picture


class EpochClock:
    """The one stopwatch and image counter of an epoch; it pauses for saves and evaluation and keeps
    the run totals (progress.train_seconds / train_images) up to date at every pause."""

    def __init__(self, progress: Progress):
        self.progress, self.seconds, self.images, self._counted = progress, 0.0, 0, 0
        self._tick = time.perf_counter()

    def count(self, images: int) -> None:
        self.images += images

    def settle(self) -> None:
        """Bring the epoch's and the run's totals up to now (before a checkpoint, at the epoch's end)."""
        now = time.perf_counter()
        lap, self._tick = now - self._tick, now
        self.seconds += lap
        self.progress.train_seconds += lap
        self.progress.train_images += self.images - self._counted
        self._counted = self.images

    @contextlib.contextmanager
    def paused(self):
        self.settle()
        try:
            yield
        finally:
            self._tick = time.perf_counter()

    def rate(self) -> float | None:
        """Images per second of training in this epoch, in this process's life; None without steps."""
        running = self.seconds + time.perf_counter() - self._tick
        return self.images / running if self.images and running > 0 else None


class EpochSums:
    """(all ranks) This rank's loss sum and image count of one epoch, kept on the device (no host sync per
    step), and the marks the training-curve picture is made from.

    The loss sum doubles as the divergence check: a NaN or inf loss (or gradient norm, see `watch`)
    makes it non-finite for good, and the loop reads it only where it synchronises anyway."""

    def __init__(self, progress: Progress, device, steps_per_epoch: int, loss_sum: float = 0.0, seen: int = 0):
        self.progress = progress
        self.loss_sum = torch.tensor(loss_sum, dtype=torch.float64, device=device)
        self.seen = seen  # images this rank trained on in this epoch
        self.start = (loss_sum, seen)  # where this process took the epoch up
        self.curve_every = max(1, steps_per_epoch // CURVE_POINTS_PER_EPOCH)
        self.marks = [(progress.step, self.loss_sum.clone(), seen)]  # read at the epoch's end

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss_sum.add_(loss.detach(), alpha=images)  # one op, in float64, on the device
        self.seen += images

    def watch(self, value: torch.Tensor) -> None:
        """Fold a value into the divergence check only: adds 0 when finite, NaN otherwise."""
        self.loss_sum.add_(value.detach(), alpha=0)

    def step_done(self, step: int) -> None:
        if step % self.curve_every == 0:
            self.marks.append((step, self.loss_sum.clone(), self.seen))

    def finite(self) -> bool:
        """Whether every loss so far was finite (one device sync)."""
        return math.isfinite(float(self.loss_sum))

    def flush_curve(self) -> None:
        """Turn the marks into [step, mean loss since the previous mark] points of progress.curve (one
        device sync); the last mark stays open."""
        for (_, before, n0), (step, after, n1) in zip(self.marks, self.marks[1:]):
            if n1 > n0:
                self.progress.curve.append([step, round((float(after) - float(before)) / (n1 - n0), 5)])
        self.marks = self.marks[-1:]
