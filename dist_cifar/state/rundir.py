"""The run folder: checked before any work, and held by one run at a time (an flock on a file in it)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from pathlib import Path

LOCK_NAME = ".dist_cifar.lock"
MIN_FREE_BYTES = 64 << 20  # a run writes checkpoints and pictures: less than this free is a full disk


def check_output_dir(run_dir: Path) -> str | None:
    """Why `run_dir` cannot hold a run, as one line naming the path, or None. Leaves nothing behind."""
    if run_dir.exists() and not run_dir.is_dir():
        return f"output_dir {run_dir} exists and is not a folder"
    existing = run_dir
    while not existing.exists():  # the folder is created later: its nearest existing parent must take it
        existing = existing.parent
    if not existing.is_dir():
        return f"output_dir {run_dir} cannot be created: {existing} is a file"
    # A real write, not os.access: root passes every permission check, yet a read-only mount or a
    # full disk still refuses the file.
    try:
        fd, probe = tempfile.mkstemp(prefix=".dist_cifar-probe-", dir=existing)
    except OSError as err:
        return f"output_dir {run_dir} is not writable: {err.strerror} ({existing})"
    try:
        os.write(fd, b"\0" * 4096)
        os.fsync(fd)
    except OSError as err:
        return f"output_dir {run_dir} is not writable: {err.strerror} ({existing})"
    finally:
        os.close(fd)
        os.unlink(probe)
    stat = os.statvfs(existing)
    free = stat.f_bavail * stat.f_frsize
    if free < MIN_FREE_BYTES:
        return (f"output_dir {run_dir}: only {free / 2**20:.1f} MiB free on its disk, "
                f"at least {MIN_FREE_BYTES >> 20} MiB needed")
    return None


class RunLock:
    """(main process) An exclusive flock on `run_dir/.dist_cifar.lock` for the life of the run.

    The kernel drops an flock when its holder dies (SIGKILL, a node's crash), so a lock left by a dead
    run is simply taken over; the file's text (host, pid, SLURM job) only names the holder in the
    error a second run gets. A folder this run created and left holding nothing but the lock is
    removed again on release.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> str | None:
        """Take the lock; None, or why not (one line naming the folder and the holder)."""
        try:
            self._created = not self.run_dir.exists()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as err:
                    os.close(fd)
                    if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                    return (f"output_dir {self.run_dir} is in use by another run ({self._holder()}); "
                            f"wait for it to end or choose another output_dir")
                # The previous holder may have removed the file between our open and flock: then this
                # lock is on a dead inode, and the path is free for anyone. Open the path again.
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            self._fd = fd
            holder = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
                      "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
        except OSError as err:
            return f"cannot lock output_dir {self.run_dir}: {err.strerror or err}"
        return None

    def _holder(self) -> str:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return "holder unknown"
        job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
        return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')}"

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if self._created and [p.name for p in self.run_dir.iterdir()] == [LOCK_NAME]:
                self.path.unlink()  # still locked: a run opening it now sees another inode and retries
                self.run_dir.rmdir()
        os.close(self._fd)
        self._fd = None
