"""The one test seam: named fault points and the sample ledger, inert unless a test turns them on.

A test sets DIST_CIFAR_FAULT=POINT:ARG to make the process act at that point:
  sigterm_at:STEP        a SIGTERM to this process right after optimizer step STEP
  during_save:STEP       SIGKILL half-way through writing the checkpoint of step STEP
  after_save:STEP        SIGKILL right after that checkpoint is in place
  during_prune:FOLDER    SIGKILL while deleting checkpoint FOLDER (step-0000000N)
  nonfinite_at:STEP      the loss of optimizer step STEP (1-based) is made NaN on the last rank
  slow_rank:RANK:MS      rank RANK sleeps MS milliseconds in every step
and DIST_CIFAR_LEDGER=DIR makes every rank append the sample indices of each micro-step to
DIR/rank{R}-pid{PID}.jsonl. The environment is read here and nowhere else, once per process.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

FAULT_ENV = "DIST_CIFAR_FAULT"
LEDGER_ENV = "DIST_CIFAR_LEDGER"

_fault: str | None = None  # the armed point, read from the environment on first use


def armed() -> str:
    """The fault this process was started with ("" for none)."""
    global _fault
    if _fault is None:
        _fault = os.environ.get(FAULT_ENV, "")
    return _fault


def wants(point: str, arg) -> bool:
    """True when the test armed `point` with this argument."""
    return bool(armed()) and armed() == f"{point}:{arg}"


def hit(point: str, arg) -> None:
    """Act at a named point when a test armed it: a kill (`during_*`, `after_save`) or a stop signal."""
    if not wants(point, arg):
        return
    if point == "sigterm_at":
        os.kill(os.getpid(), signal.SIGTERM)
    else:
        os.kill(os.getpid(), signal.SIGKILL)


def step_of(point: str) -> int | None:
    """The step a test armed `point` for (`point:STEP`), or None: read once, compared per step."""
    fault = armed()
    if not fault.startswith(point + ":"):
        return None
    return int(fault.split(":", 1)[1])


def slow_rank_seconds(rank: int) -> float:
    """Seconds rank `rank` is to sleep in every step under `slow_rank:RANK:MS`, else 0."""
    fault = armed()
    if not fault.startswith("slow_rank:"):
        return 0.0
    _, who, ms = fault.split(":")
    return float(ms) / 1000 if int(who) == rank else 0.0


class SampleLedger:
    """Every micro-step's sample indices on one rank, one JSON line each: tests compare what runs on
    different world sizes trained on."""

    def __init__(self, path: Path, rank: int):
        self.rank = rank
        self.file = open(path, "a")

    def record(self, epoch: int, step: int, micro_step: int, index) -> None:
        line = {"epoch": epoch, "step": step, "micro_step": micro_step, "rank": self.rank,
                "indices": [int(i) for i in index.tolist()]}
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def ledger(rank: int) -> SampleLedger | None:
    """The sample ledger of this rank when a test asked for one ($DIST_CIFAR_LEDGER), else None."""
    folder = os.environ.get(LEDGER_ENV)
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return SampleLedger(Path(folder) / f"rank{rank}-pid{os.getpid()}.jsonl", rank)
