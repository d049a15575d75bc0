"""Trainer processes forked from one Python that has already imported torch and Accelerate.

Why: every trainer process spends 4-6 CPU-s importing torch and Accelerate before its first step
(2-core dev machine, 2026-11-29), and the suite starts a few hundred of them: on 2 cores that start-up
was most of the suite's time. The server imports what a fresh single-process trainer imports (PRELOAD)
and nothing more: not torch._dynamo nor torchvision, which such a run never loads (tests/test_startup.py),
so a forked child takes the same code paths as a fresh one; ranks of a gloo group load the compiler
themselves, when DDP imports it, as real ranks do. A child
forked from this server starts in a fraction of a second and is otherwise an ordinary process: its
own pid and session, its own environment, working directory, stdin, stdout and stderr, the real
signals and exit codes; it runs `python -m dist_cifar.train ARGS` or `python dist_cifar/train.py ARGS`
through runpy exactly as the interpreter would, and dist_cifar itself is imported fresh in each child.

What differs from a fresh interpreter, and why it does not matter here:
- modules imported by the server read their import-time environment variables once, in the server:
  the server runs with the tests' own environment, and requests that change a variable torch, OpenMP
  or Python read at start-up (PYTHON*, OMP_*, MKL_*, LD_*, CUDA*, TORCH*) are started the normal way;
- /proc/PID/environ of a child shows the server's environment, not the child's (TrainJob knows the
  ranks it started, so it never needs to read it for them);
- Python's and numpy's global random states are reseeded from the OS in each child, as a fresh
  interpreter's are.

Commands that are the subject of a test (torchrun, accelerate launch, sbatch, the console scripts)
never come here: conftest only sends the plain trainer command lines. DIST_CIFAR_TEST_PREFORK=0 starts
every trainer as a fresh interpreter instead.

Protocol: the client writes one JSON request a line to the server's stdin ({argv, env, cwd, log,
status}); the server answers each with the child's pid, one line on its stdout, and writes the child's
exit code (negative: the signal that ended it) into the `status` file, atomically, once it has reaped it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PRELOAD = ("numpy", "torch", "torch.distributed", "accelerate", "yaml", "tqdm", "safetensors.torch")
# A request whose environment sets or changes one of these goes to a fresh interpreter: they are read
# when Python, OpenMP or torch start, so a forked child would silently keep the server's values.
STARTUP_VARIABLES = ("PYTHON", "OMP_", "MKL_", "LD_", "CUDA", "TORCH", "KMP_", "GOMP_")
# ...but these are read when used, in the child: PYTHONUNBUFFERED (the server runs with it, and a child's
# streams are the server's), and TORCHINDUCTOR_CACHE_DIR (torch writes its default into os.environ the
# first time anything asks for the compile cache, so a test worker's environment gains it mid-session).
ALLOWED = {"PYTHONUNBUFFERED", "TORCHINDUCTOR_CACHE_DIR"}


def forkable(argv: list[str], env: dict, server_env: dict) -> bool:
    """True when `argv` is a plain trainer command line that a forked child runs exactly as Python would."""
    if len(argv) < 2 or argv[0] != sys.executable:
        return False
    if not (argv[1:3] == ["-m", "dist_cifar.train"] or argv[1] == "dist_cifar/train.py"):
        return False
    return not startup_differences(env, server_env)


def startup_differences(env: dict, server_env: dict) -> list[str]:
    """The start-up variables (STARTUP_VARIABLES) whose values differ between the two environments."""
    return sorted(key for key in set(env) | set(server_env)
                  if key.startswith(STARTUP_VARIABLES) and key not in ALLOWED and env.get(key) != server_env.get(key))


class ForkedProcess:
    """The part of subprocess.Popen that TrainJob uses, for a child of the server."""

    def __init__(self, pid: int, args: list[str], status: Path):
        self.pid, self.args, self._status, self.returncode = pid, args, status, None

    def poll(self) -> int | None:
        if self.returncode is None and self._status.exists():
            self.returncode = int(self._status.read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Server:
    """The client side: starts the server on first use; `spawn` returns a ForkedProcess."""

    def __init__(self, cwd: Path, env: dict):
        self.env = dict(env)
        self.proc = subprocess.Popen([sys.executable, __file__], cwd=cwd, env=self.env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=None, start_new_session=True)
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"the prefork server did not start (it said {line!r})")

    def spawn(self, argv: list[str], env: dict, cwd: Path, log: Path) -> ForkedProcess:
        status = log.with_suffix(".status")
        request = {"argv": argv, "env": env, "cwd": str(cwd), "log": str(log), "status": str(status)}
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the prefork server could not start {argv} (it said {line!r})")
        return ForkedProcess(int(line), argv, status)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------- the server (this file run as a script)

def _child(request: dict) -> None:
    """In the forked child: become the requested process, run the trainer, and never return."""
    import atexit
    import random
    import runpy
    import threading
    import traceback

    code = 1
    try:
        os.setsid()
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        random.seed()
        import numpy as np

        np.random.seed()
        argv = request["argv"]
        if argv[1] == "-m":
            sys.argv = [argv[2], *argv[3:]]  # runpy sets argv[0] to the module's file
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        else:
            script = os.path.abspath(argv[1])
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = os.path.dirname(script)
            runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as err:
        if err.code is None:
            code = 0
        elif isinstance(err.code, int):
            code = err.code
        else:
            print(err.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:  # what the interpreter does on its way out: join threads, run atexit, flush
            threading._shutdown()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF)


def _serve() -> None:
    import importlib
    import select

    for name in PRELOAD:
        importlib.import_module(name)
    replies = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing a child prints reaches the protocol pipe
    replies.write(b"ready\n")
    children: dict[int, str] = {}
    pending, stdin_open = b"", True
    while stdin_open or children:
        if stdin_open and select.select([0], [], [], 0.01)[0]:
            chunk = os.read(0, 65536)
            stdin_open = bool(chunk)
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    replies.close()
                    _child(request)
                children[pid] = request["status"]
                replies.write(f"{pid}\n".encode())
        elif not stdin_open:
            time.sleep(0.01)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            path = children.pop(pid, None)
            if path is not None:
                tmp = f"{path}.tmp"
                Path(tmp).write_text(str(os.waitstatus_to_exitcode(status)))
                os.replace(tmp, path)


if __name__ == "__main__":
    _serve()
