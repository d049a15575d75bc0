"""Failed collectives: what this rank was doing, and the one line that says which rank left or stuck."""

from __future__ import annotations

import contextlib
import datetime
import os

import torch


@contextlib.contextmanager
def collective_timeout(seconds: float, restore_seconds: float):
    """(all ranks) Another collective timeout for one phase (loading data while one node decodes it)."""
    dist = torch.distributed
    set_timeout = getattr(dist, "set_timeout", None)  # public since torch 2.8; older ones keep one timeout
    if not (dist.is_initialized() and set_timeout):
        yield
        return
    set_timeout(datetime.timedelta(seconds=seconds))
    try:
        yield
    finally:
        set_timeout(datetime.timedelta(seconds=restore_seconds))


class Phase:
    """What this rank is doing, for the one line that reports a failed collective."""

    def __init__(self):
        self.name, self.progress = "start-up", None

    def set(self, name: str, progress=None) -> None:
        self.name, self.progress = name, progress

    def __str__(self) -> str:
        if self.name == "training" and self.progress is not None:
            return f"training step {self.progress.step + 1}"
        return self.name


PHASE = Phase()


def collective_failure(err: BaseException) -> str | None:
    """One line for a collective that failed (a rank gone or stuck), or None for any other error."""
    dist = torch.distributed
    text = str(err)
    if not (isinstance(err, getattr(dist, "DistError", ())) or "gloo" in text.lower() or "NCCL" in text):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    if first.startswith("[") and "] " in first:  # gloo's "[/path/to/pair.cc:561] message": drop the source path
        first = first.split("] ", 1)[1]
    first = first.split(" This is typically", 1)[0]
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "Timed out" in first or "timed out" in first or "Timeout" in first:
        why = "a collective timed out waiting for another rank (stuck or gone; limit dist.timeout_seconds)"
    else:
        why = "another rank left the process group (crashed or killed: see its log)"
    return f"rank {rank} of {world}: {why}, during {PHASE}: {first}"

