"""Training progress a person can read: tqdm's bar on a terminal, a plain line every N seconds in a log.

A redrawn bar is right on a terminal and wrong in a SLURM log, a file or a pipe, where every redraw
is kept (a carriage return is not a new line to `less` or `tail`). Off a terminal, progress is one
line every DIST_CIFAR_PROGRESS_SECONDS (default 30) seconds, and one more when the bar closes:
    epoch 3/10  step 1200/4000 (30%)  loss 1.234  lr 0.01  1234 img/s  elapsed 1m02s  eta 2m10s
"""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

DEFAULT_SECONDS = 30.0  # between two progress lines off a terminal: ~120 lines an hour, ~12 KB
SECONDS_VAR = "DIST_CIFAR_PROGRESS_SECONDS"


def progress_bar(total: int, initial: int = 0, enabled: bool = True, stream=None, interval: float | None = None,
                 clock=time.monotonic):
    """A progress display of optimizer steps with tqdm's methods (set_description, set_postfix, update, close).

    stream: where it writes (sys.stderr, as tqdm, when None); a terminal gets tqdm, anything else plain
    lines every `interval` seconds ($DIST_CIFAR_PROGRESS_SECONDS, else 30, when None). Disabled: nothing.
    """
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return _Silent()
    if _is_terminal(stream):
        return tqdm(total=total, initial=initial, file=stream, unit="step", dynamic_ncols=True, mininterval=1.0)
    return LineProgress(total, initial, stream, _interval(interval), clock)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def _interval(interval: float | None) -> float:
    if interval is not None:
        return float(interval)
    text = os.environ.get(SECONDS_VAR, "").strip()
    if not text:
        return DEFAULT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also refuses nan
        raise ValueError(f"{SECONDS_VAR}={text!r}: expected a number of seconds >= 0")
    return seconds


def duration(seconds: float) -> str:
    """45s, 1m02s, 2h05m: short, and exact enough for a log."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# tqdm postfix names the trainer uses, and how a line reads them
_POSTFIX_FORMATS = {"loss": "loss {}", "lr": "lr {}", "img_s": "{} img/s"}


class LineProgress:
    """(off a terminal) One plain line every `interval` seconds, and a last one on close; never a carriage return."""

    def __init__(self, total: int, initial: int, stream, interval: float, clock=time.monotonic):
        self.total, self.n, self.initial = total, initial, initial
        self.stream, self.interval, self.clock = stream, interval, clock
        self.description = ""
        self.postfix: dict[str, object] = {}
        self.started = clock()
        self.next_line = self.started + interval  # on a fixed schedule: slow steps do not make lines drift
        self.printed_n = initial  # the step of the last line written
        self.closed = False

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.description = desc or ""

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        self.postfix = {**dict(ordered_dict or {}), **kwargs}

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now >= self.next_line and not self.closed:
            self._write(now)
            if self.interval > 0:  # the next time on the schedule after now; one slow step skips lines
                self.next_line += (int((now - self.next_line) // self.interval) + 1) * self.interval

    def close(self) -> None:
        """Write a last line if steps were taken since the previous one; closing again does nothing."""
        if self.closed:
            return
        self.closed = True
        if self.n != self.printed_n:
            self._write(self.clock())

    def line(self, now: float) -> str:
        elapsed = now - self.started
        parts = [self.description] if self.description else []
        step = f"step {self.n}/{self.total}"
        if self.total:
            step += f" ({100 * self.n // self.total}%)"
        parts.append(step)
        parts += [_POSTFIX_FORMATS.get(k, k + " {}").format(v) for k, v in self.postfix.items()]
        parts.append(f"elapsed {duration(elapsed)}")
        done = self.n - self.initial  # steps of this process's life: a resumed run's rate starts over
        if self.total and done > 0 and elapsed > 0:
            parts.append(f"eta {duration(max(0, self.total - self.n) * elapsed / done)}")
        return "  ".join(parts)

    def _write(self, now: float) -> None:
        self.printed_n = self.n
        try:
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken log must not stop training
            pass


class _Silent:
    """(off the main process, or disabled) The same methods, doing nothing."""

    def set_description(self, *args, **kwargs) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class StepDisplay:
    """(only on the main process) The bar's postfix: the mean training loss since the last refresh, the lr
    and images/s, refreshed at most every `seconds` (reading the loss is a device sync)."""

    def __init__(self, bar, enabled: bool, seconds: float = 2.0, clock=time.perf_counter):
        self.bar, self.enabled, self.seconds, self.clock = bar, enabled, seconds, clock
        self.last, self.sums, self.loss_sum, self.seen = clock(), None, 0.0, 0

    def show(self, sums, optimizer, epoch_clock, force: bool = False) -> None:
        if not self.enabled or not (force or self.clock() - self.last > self.seconds):
            return
        self.last = self.clock()
        if sums is not self.sums:  # a new epoch: measure from its start (a resumed epoch's partial sums)
            self.sums, (self.loss_sum, self.seen) = sums, sums.start
        loss_sum, seen = float(sums.loss_sum), sums.seen
        if seen > self.seen:
            self.bar.set_postfix(loss=f"{(loss_sum - self.loss_sum) / (seen - self.seen):.3f}",
                                 lr=f"{optimizer.param_groups[0]['lr']:.3g}", img_s=f"{epoch_clock.rate() or 0:.0f}")
        self.loss_sum, self.seen = loss_sum, seen
