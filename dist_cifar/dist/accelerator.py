"""The Accelerator for however the job was launched: launcher checks, precision, CPU threads, restarts."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs

from dist_cifar.compat.accelerate import apply_accelerate_workarounds
from dist_cifar.config import Config
from dist_cifar.dist.exit import note_process_group
from dist_cifar.errors import RunError


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
    apply_accelerate_workarounds()  # before the first Accelerator: prepare() and step() call them
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
    lose about a quarter of their speed (two thirds without the entry point's OMP_WAIT_POLICY=PASSIVE);
    train.threads=1 avoids even that."""
    if per_device_batch_size < 16:
        return 1
    cores = len(os.sched_getaffinity(0))
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
