"""Preemption: stop signals turned into a flag, and the SLURM requeue."""

from __future__ import annotations

import os
import signal
import subprocess

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on a signal, checkpoint written, resume to continue


class Preemption:
    """Turns SIGTERM/SIGUSR1 (configurable) into a flag; the loop's Watch (engine/loop.py) has the ranks agree
    on it at step boundaries, in the same all-reduce as the divergence check."""

    def __init__(self, signal_names: list[str]):
        self.received: str | None = None
        self._previous = {}
        for name in signal_names:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        # Only set a flag: the step finishes and the save runs outside the handler, so a second
        # signal arriving during the save cannot interrupt it.
        if self.received is None:
            self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def requeue_slurm_job(log) -> bool:
    """(only on the main process) Ask SLURM to run this job again; it resumes from its checkpoint."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:
        out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warn(f"could not requeue SLURM job {job}: {err}")
        return False
    if out.returncode != 0:
        log.warn(f"scontrol requeue {job} failed: {out.stderr.strip()}")
        return False
    log.print(f"requeued SLURM job {job}")
    return True
