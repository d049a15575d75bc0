"""Shared test fixtures and helpers: the real CIFAR-10 images, a per-session data cache, and real
training processes (one process, a torchrun gloo group, or ranks started one by one).

Fixtures
  data_root   the CIFAR-10 JPEG image folder (train/<class>/, test/<class>/), session-wide
  cache_dir   a per-session decoded-data cache ($DIST_CIFAR_TEST_CACHE if set); $DIST_CIFAR_CACHE points
              at it for every child process
  data_args   config overrides that train on data_root, with the cache already decoded (session)

Helpers (import them: `from conftest import run_train, start_train, free_port`)
  run_train(args, nprocs=1, env=None, timeout=300)  run to the end; a CompletedProcess
  start_train(args, nprocs=1, env=None, launcher=)  start in the background; a TrainJob to signal,
                                                    kill, poll and wait on
  free_port()                                       a TCP port free on 127.0.0.1 right now
Every child runs with cwd = the repository and the interpreter running the tests. A plain trainer
command (one process, or a rank of launcher="ranks") is forked from this worker's prefork server, a
Python with torch and Accelerate already imported (tests/prefork.py: about 6 CPU-s less per process);
torchrun, accelerate launch, SLURM and the console scripts start as they would anywhere.
DIST_CIFAR_TEST_PREFORK=0 starts every trainer as a fresh interpreter.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import prefork

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DIST_CIFAR_TEST_DATA", REPO.parent / "shared" / "data" / "cifar10-jpeg")).resolve()
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Inherited launcher variables would make a one-process child think it is part of a group.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
               "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "ACCELERATE_MIXED_PRECISION")
_LOG_ROOT: Path | None = None  # the jobs' output files: under pytest's session tmp folder once it exists


# Under pytest-xdist (tests/run.sh starts two workers) each test file is one unit of work, handed to
# whichever worker is free, longest first so the two end together: FILE_SECONDS are each file's
# seconds in a two-worker run (the 2-core dev machine, 2026-11-29 and -12-02; only their order matters). So a
# file's module fixtures (reference runs) are built once, and the two SLURM files are one unit: the
# test clusters live in one worker. Unit tests are handed out one by one, last.
FILE_SECONDS = {"test_slurm": 158, "test_slurm_multinode": 320, "test_never_lose_work": 200, "test_bench": 155,
                "test_distributed": 148, "test_commands": 84, "test_features": 69, "test_end_states": 70,
                "test_observe": 60, "test_resume": 50, "test_damaged_files": 40, "test_elastic": 39,
                "test_predictions": 30, "test_startup": 30, "test_tracking": 45, "test_config": 16, "test_prefork": 13,
                "test_plots": 11, "test_logs": 8, "test_readme": 1}
UNITS = {"test_slurm": "slurm", "test_slurm_multinode": "slurm"}


def work_unit(nodeid: str) -> str:
    """The work unit of a test: its file's (the SLURM files share one), or the test itself in tests/unit/."""
    path = nodeid.split("::", 1)[0]
    if path.startswith("tests/unit/"):
        return nodeid
    stem = Path(path).stem
    return UNITS.get(stem, stem)


PHASE = os.environ.get("DIST_CIFAR_TEST_PHASE", "")  # tests/run.sh: "shared", then "alone"


def pytest_collection_modifyitems(config, items):
    """Every test outside tests/unit/ is `slow` (real processes, real images): `-m "not slow"` is the
    fast tier. `alone` tests (timed comparisons) are left out of tests/run.sh's parallel phase and are
    all its second phase runs; under xdist outside that script they are skipped, since other tests
    would run beside them. Under xdist, the longest work units come first (collection happens in each worker)."""
    for item in items:
        if not item.nodeid.startswith("tests/unit/"):
            item.add_marker(pytest.mark.slow)
    def alone(item) -> bool:
        return item.get_closest_marker("alone") is not None

    if PHASE in ("shared", "alone"):
        config.hook.pytest_deselected(items=[item for item in items if alone(item) != (PHASE == "alone")])
        items[:] = [item for item in items if alone(item) == (PHASE == "alone")]
    elif os.environ.get("PYTEST_XDIST_WORKER"):
        beside = pytest.mark.skip(reason="timed: needs the machine to itself; tests/run.sh runs it after the rest, "
                                         "or run it without xdist (-p no:xdist)")
        for item in filter(alone, items):
            item.add_marker(beside)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        files: dict[str, set[str]] = {}
        for item in items:
            files.setdefault(work_unit(item.nodeid), set()).add(Path(item.path).stem)
        seconds = {unit: 0 if unit.startswith("tests/unit/") else sum(FILE_SECONDS.get(stem, 30) for stem in stems)
                   for unit, stems in files.items()}
        items.sort(key=lambda item: -seconds[work_unit(item.nodeid)])  # stable: a file keeps its order


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # optional: `-p no:xdist` runs without xdist
def pytest_xdist_make_scheduler(config, log):
    """xdist's scheduler by scope, with work_unit as the scope and the collection's order kept."""
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False
    return ByWorkUnit(config, log)


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA / "train").is_dir() or not (DATA / "test").is_dir():
        message = f"no CIFAR-10 image folder at {DATA} (set DIST_CIFAR_TEST_DATA)"
        pytest.fail(message) if IN_CI else pytest.skip(message)
    return DATA


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    """(autouse) $DIST_CIFAR_CACHE -> a fresh folder for this session, so no test reads a stale cache.
    xdist's workers share one (the lock in dist_cifar/data/sources.py lets one of them decode while the other waits), and
    $DIST_CIFAR_TEST_CACHE names one to share with the caller (.ci/run's quick start decodes into it)."""
    global _LOG_ROOT
    _LOG_ROOT = tmp_path_factory.mktemp("train-logs")
    if os.environ.get("DIST_CIFAR_TEST_CACHE"):
        path = Path(os.environ["DIST_CIFAR_TEST_CACHE"])
        path.mkdir(parents=True, exist_ok=True)
    elif os.environ.get("PYTEST_XDIST_WORKER"):
        path = tmp_path_factory.getbasetemp().parent / "data-cache"  # the run's folder, above the workers'
        path.mkdir(exist_ok=True)
    else:
        path = tmp_path_factory.mktemp("data-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIST_CIFAR_CACHE", str(path))
        # Two workers share the cores: every child's OpenMP threads sleep when they wait, as the
        # trainer's do (train.py), so other children (the benchmark's tutorial loop) don't crawl.
        # Results are unchanged: the wait policy does not touch the arithmetic.
        mp.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
        yield path


@pytest.fixture(scope="session")
def data_args(data_root, cache_dir) -> list[str]:
    """Overrides that point a run at data_root; decodes the images into the cache once (about a
    minute on 2 cores), here rather than inside the first test's time limit."""
    from dist_cifar.config import DataConfig
    from dist_cifar.data.sources import load_dataset

    load_dataset(DataConfig(name="imagefolder", root=str(data_root)))
    return ["data.name=imagefolder", f"data.root={data_root}"]


_PREFORK: prefork.Server | None = None
PREFORK = os.environ.get("DIST_CIFAR_TEST_PREFORK", "1") != "0"


def prefork_server() -> prefork.Server | None:
    """This worker's prefork server (tests/prefork.py), started on first use; None when switched off."""
    global _PREFORK
    if PREFORK and _PREFORK is None:
        _PREFORK = prefork.Server(REPO, child_env())
    return _PREFORK


@pytest.fixture(scope="session", autouse=True)
def _stop_prefork_server():
    yield
    if _PREFORK is not None:
        _PREFORK.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(env: dict | None = None) -> dict:
    """os.environ without launcher variables, unbuffered, plus `env` (a value of None removes the key)."""
    out = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    out["PYTHONUNBUFFERED"] = "1"
    for key, value in (env or {}).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = str(value)
    return out


def train_command(args, nprocs: int = 1, port: int | None = None) -> list[str]:
    """The trainer's command line: `python -m dist_cifar.train` for one process, torchrun for several."""
    args = [str(a) for a in args]
    if nprocs == 1:
        return [sys.executable, "-m", "dist_cifar.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs),
            "--master_port", str(port or free_port()), "--master_addr", "127.0.0.1", "dist_cifar/train.py", *args]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class TrainJob:
    """A training run in the background: one process, torchrun and its workers, or directly started ranks.

    Output goes to files (one per process), so a test can poll it while the job runs. Every process
    is started in its own session; kill() reaches torchrun's workers too, which torchrun starts in
    sessions of their own (killing only the launcher's process group would leave them running).
    """

    def __init__(self, args, nprocs: int = 1, env: dict | None = None, launcher: str = "torchrun"):
        self.logdir = Path(tempfile.mkdtemp(prefix="train-job-", dir=_LOG_ROOT))
        self.started = time.monotonic()
        if nprocs == 1 or launcher == "torchrun":
            commands = [(train_command(args, nprocs), child_env(env))]
        elif launcher == "ranks":  # the variables torchrun would set, one process per rank
            port = free_port()
            commands = [([sys.executable, "dist_cifar/train.py", *map(str, args)], child_env({
                **(env or {}), "RANK": r, "LOCAL_RANK": r, "WORLD_SIZE": nprocs, "LOCAL_WORLD_SIZE": nprocs,
                "GROUP_RANK": 0, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})) for r in range(nprocs)]
        else:
            raise ValueError(f"launcher must be torchrun or ranks, got {launcher!r}")
        self.launcher = launcher
        self.logs = [self.logdir / f"{i}.log" for i in range(len(commands))]
        self.procs = []
        server = prefork_server()
        for (cmd, cmd_env), log in zip(commands, self.logs):
            if server is not None and prefork.forkable(cmd, cmd_env, server.env):
                self.procs.append(server.spawn(cmd, cmd_env, REPO, log))
                continue
            with open(log, "wb") as out:
                self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=cmd_env, stdout=out, stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL, start_new_session=True))

    def output(self) -> str:
        """Everything printed so far (tqdm's carriage returns as newlines), process after process."""
        return "\n".join(log.read_text(errors="replace").replace("\r", "\n") for log in self.logs)

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def rank_pids(self) -> dict[int, int]:
        """{rank: pid} of the training processes (torchrun's workers found through their RANK variable)."""
        if self.launcher == "ranks":  # started here, in rank order
            return {rank: p.pid for rank, p in enumerate(self.procs)}
        ranks = {}
        for pid in [p.pid for p in self.procs] + [d for p in self.procs for d in _descendants(p.pid)]:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if Path(f"/proc/{pid}/cmdline").exists() else b""
            if b"torch.distributed.run" in cmdline:
                continue
            rank = next((int(e[5:]) for e in environ if e.startswith(b"RANK=")), 0)
            ranks[rank] = pid
        return ranks

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to every process of the job at once (launcher, workers, their children)."""
        pids = [p.pid for p in self.procs if p.poll() is None]
        pids += [d for pid in pids for d in _descendants(pid)]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float = 300) -> list[int]:
        """Return codes, one per started process; on timeout kill everything and fail with the output."""
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            for p in self.procs:
                p.wait()
            pytest.fail(f"training did not finish within {timeout:.0f} s (killed):\n{tail(self.output())}")

    def wait_for(self, condition, timeout: float = 120, what: str = "the condition") -> None:
        """Poll `condition()` every 20 ms; fail (killing the job) if the job ends first or time runs out."""
        deadline = time.monotonic() + timeout
        while not condition():
            if not self.running():
                pytest.fail(f"training ended before {what}:\n{tail(self.output())}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no {what} within {timeout:.0f} s:\n{tail(self.output())}")
            time.sleep(0.02)

    def result(self, timeout: float = 300) -> subprocess.CompletedProcess:
        """The job as one CompletedProcess: the first non-zero exit code of its processes, or 0."""
        codes = self.wait(timeout)
        code = next((c for c in codes if c != 0), 0)
        return subprocess.CompletedProcess(self.procs[0].args, code, self.output(), "")


def start_train(args, nprocs: int = 1, env: dict | None = None, launcher: str = "torchrun") -> TrainJob:
    """Start a run in the background. launcher="ranks" starts each rank itself (no torchrun), so
    every rank's exit code is seen (torchrun terminates the others once one rank exits non-zero)."""
    return TrainJob(args, nprocs, env, launcher)


def run_train(args, nprocs: int = 1, env: dict | None = None, timeout: float = 300,
              launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """Run the trainer to the end. stdout holds stdout and stderr together; fails the test on timeout."""
    return start_train(args, nprocs, env, launcher).result(timeout)


def tail(text: str, lines: int = 40) -> str:
    """The last `lines` non-blank lines (progress-bar redraws dropped), for failure messages."""
    kept = [line for line in text.splitlines() if line.strip() and "it/s]" not in line and "step/s" not in line]
    return "\n".join(kept[-lines:])
