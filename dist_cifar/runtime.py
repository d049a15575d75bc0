"""The process's place in the run: the Accelerator, the main-process log seam, and preemption signals."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs
from tqdm.auto import tqdm

from dist_cifar import _accelerate_patches
from dist_cifar.config import Config

_accelerate_patches.apply()  # once, before any Accelerator exists

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on a signal, checkpoint written, resume to continue


class RunError(RuntimeError):
    """A problem with the run itself (launch, output folder): reported as one line."""


def resolve_mixed_precision(requested: str | None, warn) -> tuple[str, str]:
    """(precision to use, precision asked for). The config wins over the launch flag; default no."""
    asked = requested or os.environ.get("ACCELERATE_MIXED_PRECISION") or "no"
    if asked not in ("no", "fp16", "bf16"):
        raise RunError(f"mixed precision {asked!r} from the launch is not one of no, fp16, bf16")
    if asked == "fp16" and not torch.cuda.is_available():
        warn("mixed precision fp16 needs a CUDA GPU: falling back to fp32 (mixed_precision=no) on the CPU")
        return "no", asked
    if asked == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        warn("this GPU has no bf16 support: falling back to fp16")
        return "fp16", asked
    return asked, asked


def build_accelerator(cfg: Config, warn=print, batch_size: int | None = None, **kwargs) -> tuple[Accelerator, dict]:
    """(all ranks) One Accelerator for however the job was launched; returns it and a description.

    Launched as N processes on a machine without GPUs (torchrun, accelerate launch --multi_gpu),
    a plain Accelerator() would give N independent single-process runs; cpu=True makes them one
    gloo process group. With GPUs, Accelerate picks NCCL and one GPU per process. `batch_size`
    (images per process) picks the CPU threads per process when train.threads is 0.
    """
    check_accelerate_launch()
    launched_world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cpu = not torch.cuda.is_available()
    init_group_for_restarts(datetime.timedelta(seconds=cfg.dist.timeout_seconds), warn)
    precision, asked = resolve_mixed_precision(cfg.train.mixed_precision, warn)
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.train.grad_accum_steps, sync_with_dataloader=False),
        step_scheduler_with_optimizer=False,  # the lr comes from the global step count, stepped once per step
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.dist.timeout_seconds))],
        **kwargs,
    )
    note_process_group()
    if accelerator.num_processes != launched_world:
        raise RunError(f"launched {launched_world} processes (WORLD_SIZE) but the process group has "
                       f"{accelerator.num_processes}: check the launcher's flags")
    if use_cpu:
        threads = cfg.train.threads or default_threads(batch_size or cfg.train.per_device_batch_size or 4)
        torch.set_num_threads(threads)
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none (one process)"
    info = {
        "world_size": accelerator.num_processes,
        "backend": backend,
        "device": str(accelerator.device),
        "mixed_precision": precision,
        "mixed_precision_requested": asked,
        "threads_per_process": torch.get_num_threads(),
    }
    return accelerator, info


# Every launcher that starts more than one process tells each one the group's size in one of these.
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def check_accelerate_launch() -> None:
    """RunError when `accelerate launch` was asked for several processes but started this one alone.

    Without --multi_gpu (or a MULTI_GPU config file) Accelerate's plain launcher runs the script once,
    whatever --num_processes says: `--cpu --num_processes 2`, or `--num_processes 2` on a machine
    without GPUs. It exports MASTER_ADDR/MASTER_PORT only when it was asked for more than one process
    (or machine) and never WORLD_SIZE or RANK (accelerate/utils/launch.py,
    prepare_simple_launcher_cmd_env), while every launcher that really starts a group sets a world
    size. ACCELERATE_DYNAMO_BACKEND marks a child of `accelerate launch`; a MASTER_ADDR inherited
    from the launching shell (its own environment has it too) is not Accelerate's doing.
    """
    env = os.environ
    if "ACCELERATE_DYNAMO_BACKEND" not in env or "MASTER_ADDR" not in env or any(v in env for v in WORLD_SIZE_VARS):
        return
    try:
        launcher_env = Path(f"/proc/{os.getppid()}/environ").read_bytes().split(b"\0")
    except OSError:
        launcher_env = []
    if any(line.startswith(b"MASTER_ADDR=") for line in launcher_env):
        return
    raise RunError("accelerate launch was asked for several processes but started ONE (its --cpu flag, or no "
                   "--multi_gpu, runs a single process): use `accelerate launch --multi_gpu --num_processes N` "
                   "or `accelerate launch --config_file launch/cpu_multi.yaml --num_processes N`")


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


# Spins on core 0 until killed, or until the process that started it is gone (its parent id changes).
_SPIN = "import os\nos.sched_setaffinity(0, {0})\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass\n"
_starved: list[int] = []  # the threads the starve hook slowed
_spinner: subprocess.Popen | None = None  # its process spinning on core 0


def starve_collective_threads() -> None:
    """Test hook (DIST_CIFAR_FAULT=starve_gloo): the process group's worker threads get the lowest CPU
    priority on core 0, beside a process spinning there, so they lag behind the main thread as on a
    heavily loaded machine; leave() lets them run again as the process ends, where the race was."""
    global _spinner
    _spinner = subprocess.Popen([sys.executable, "-c", _SPIN], stdin=subprocess.DEVNULL)
    for tid in os.listdir("/proc/self/task"):
        try:
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
            if "gloo" in name:
                os.sched_setaffinity(int(tid), {0})
                os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
                _starved.append(int(tid))
        except OSError:
            pass


def _release_starved_threads() -> None:
    if _spinner is not None:
        _spinner.kill()
        _spinner.wait()
    cores = os.sched_getaffinity(0)
    for tid in _starved:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            os.sched_setaffinity(tid, cores)


def leave(code: int) -> None:
    """End a trainer process with `code`. After a process group has existed, skip interpreter shutdown.

    Why: a gloo worker thread drops its reference to a finished collective's work a moment after the
    caller has moved on. If that work holds tensors also seen from Python, freeing them takes the GIL;
    once the interpreter is finalising, taking the GIL ends the thread through a forced unwind across a
    noexcept destructor, and libstdc++ aborts the whole process ("terminate called without an active
    exception", exit -6), after the run itself succeeded. Seen on loaded machines; the core dump shows
    ProcessGroupGloo::runLoop -> ~AsyncAllreduceWork -> TensorImpl::decref_pyobject -> take_gil ->
    pthread_exit -> std::terminate. Everything the run writes is closed by now, so leaving with
    os._exit, after flushing, loses nothing and never starts the finalisation that races the thread.
    """
    _release_starved_threads()
    if not _had_process_group:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


_had_process_group = False


def note_process_group() -> None:
    global _had_process_group
    _had_process_group = _had_process_group or (torch.distributed.is_available() and torch.distributed.is_initialized())


def init_group_for_restarts(timeout: datetime.timedelta, warn) -> None:
    """(all ranks) Under `torchrun --max-restarts N`, a process group that a restarted generation can form.

    torchrun (c10d rendezvous) shares one TCPStore between its rendezvous and the workers and keeps it
    across restarts, so the keys that the dead generation's ranks wrote (their gloo/NCCL addresses)
    are still there: a new rank that reads a peer's key before the restarted peer rewrites it
    connects to a dead address and fails ("Connection refused", then connectFullMesh gives up), more
    often on a busy machine (pytorch/pytorch#135712). On one node all workers restart together with
    the same TORCHELASTIC_RESTART_COUNT, so a key prefix per restart isolates the generations. On
    several nodes the count is per agent and may differ: there torchrun needs
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store each round; our SLURM script sets it).
    """
    env = os.environ
    if not (env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
            and int(env.get("WORLD_SIZE", "1")) > 1) or torch.distributed.is_initialized():
        return
    if env.get("GROUP_WORLD_SIZE", "1") != "1":
        if int(env.get("RANK", "0")) == 0:
            warn("torchrun --max-restarts over several nodes: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before "
                 "torchrun, or a restarted group may read the dead workers' addresses and fail to connect")
        return
    store = torch.distributed.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timeout)
    store = torch.distributed.PrefixStore(f"dist_cifar/restart-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
        backend = "nccl"
    torch.distributed.init_process_group(backend, store=store, rank=int(env["RANK"]),
                                         world_size=int(env["WORLD_SIZE"]), timeout=timeout)


def default_threads(per_device_batch_size: int) -> int:
    """CPU threads per process: the cores shared among local ranks, but one for batches under 16,
    whose ops are too small to split (measured on 2 idle cores: batch 4 runs 3x faster on one thread
    than on two; batch 64 1.6x faster on two). On cores busy with other work two threads per process
    lose about a quarter of their speed (two thirds without train.py's OMP_WAIT_POLICY=PASSIVE);
    train.threads=1 avoids even that."""
    if per_device_batch_size < 16:
        return 1
    cores = len(os.sched_getaffinity(0))
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


class MainLog:
    """(only on the main process) Prints and writes the run's files; other ranks get a NullLog."""

    def __init__(self, run_dir: Path | None = None):
        self.run_dir = run_dir
        self._warned: set[str] = set()

    def print(self, *args) -> None:
        tqdm.write(" ".join(str(a) for a in args))  # above the progress bar, not through it

    def warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            print(f"dist_cifar: warning: {message}", file=sys.stderr, flush=True)

    def append_jsonl(self, name: str, record: dict) -> None:
        with open(self.run_dir / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_json(self, name: str, data: dict) -> None:
        tmp = self.run_dir / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.run_dir / name)

    def write_text(self, name: str, text: str) -> None:
        tmp = self.run_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.run_dir / name)


class NullLog(MainLog):
    """Does nothing: what non-main ranks log through."""

    def print(self, *args) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def append_jsonl(self, name: str, record: dict) -> None:
        pass

    def write_json(self, name: str, data: dict) -> None:
        pass

    def write_text(self, name: str, text: str) -> None:
        pass


class Preemption:
    """Turns SIGTERM/SIGUSR1 (configurable) into a flag that all ranks agree on at step boundaries."""

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

    def should_stop(self, accelerator, step: int, every: int) -> bool:
        """(all ranks) True on every rank once any rank got a signal; checked every `every` steps."""
        if accelerator.num_processes == 1:
            return self.received is not None
        if step % every:
            return False
        flag = torch.tensor([1 if self.received else 0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item())

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


def versions() -> dict:
    import importlib.metadata  # torchvision's version without importing it: ~0.4 s and ~170 MB a process

    import accelerate

    rev = None
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        rev = out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": importlib.metadata.version("torchvision"),
            "accelerate": accelerate.__version__, "git_revision": rev, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
