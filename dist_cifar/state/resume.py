"""The resume protocol: what a checkpoint carries, which one a run continues from, what must match,
and restoring it on any number of processes that keeps the global batch.

The data order does not depend on the world size: optimizer step t of an epoch trains on positions
[t * G, (t + 1) * G) of the epoch's seeded permutation (G = the global batch), however those G images
are split into processes, per-process batches and accumulation steps. So a checkpoint written by W
processes continues on W' from the same sample, with the same optimizer, schedule and averages.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object, set_seed

from dist_cifar.config import RESUME_KEYS, Config, to_dict
from dist_cifar.errors import CheckpointError, RunError
from dist_cifar.state import checkpoint as ckpt
from dist_cifar.versions import versions


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""
    epoch: int = 0  # current epoch (0-based)
    micro_step: int = 0  # micro-steps done in the current epoch (on the world size that runs it)
    step: int = 0  # optimizer steps done in the whole run
    train_seconds: float = 0.0  # time spent in training steps, all attempts together
    train_images: int = 0  # images trained on by all ranks in those seconds
    history: list = field(default_factory=list)  # the metrics.jsonl records so far
    curve: list = field(default_factory=list)  # (step, smoothed train loss) every few steps, for the pictures
    finished: str | None = None  # why the run ended: epochs | max_steps | target; None while it goes on


@dataclass
class TrainState:
    """Everything a checkpoint carries besides the config: the live objects of one rank."""
    net: torch.nn.Module  # the unwrapped model
    optimizer: torch.optim.Optimizer  # as prepared by Accelerate
    scheduler: object
    scaler: object  # the fp16 GradScaler, or None
    average: object  # optim.NoAverage / EMA / Lookahead
    progress: Progress
    grad_accum_steps: int  # of this run: converts the micro-step position across world sizes
    global_batch_size: int


@dataclass
class Checkpoint:
    folder: Path
    model_state: dict
    state: dict
    meta: dict

    @property
    def world_size(self) -> int:
        return self.meta["world_size"]

    @property
    def progress(self) -> Progress:
        return Progress(**self.state["progress"])

    @property
    def global_batch_size(self) -> int:
        """Images per optimizer step of the run that wrote it (older checkpoints: from their config)."""
        if "global_batch_size" in self.meta:
            return self.meta["global_batch_size"]
        train = self.meta["config"]["train"]
        return train["per_device_batch_size"] * self.world_size * train["grad_accum_steps"]


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def find_resume_point(cfg: Config, run_dir: Path, log) -> Checkpoint | None:
    """(all ranks) The checkpoint to continue from, read, or None for a fresh run."""
    resume = cfg.train.resume
    if resume == "":
        if (run_dir / "config.yaml").exists() or ckpt.list_checkpoints(run_dir / "checkpoints"):
            raise RunError(f"output_dir {run_dir} already holds a run; pass train.resume=auto to continue it "
                           f"or choose another output_dir")
        return None
    folder = Path(resume)
    if resume == "auto":
        folder = ckpt.find_latest(run_dir / "checkpoints", warn=log.warn)
        if folder is None:
            log.print(f"train.resume=auto: no checkpoint in {run_dir / 'checkpoints'}, starting fresh")
            return None
    return Checkpoint(folder, *ckpt.read_checkpoint(folder))


def finished_reason(found: Checkpoint, cfg: Config) -> str | None:
    """Why the run that wrote `found` is finished, if it is and stays so under `cfg`; None when there is
    training left. CheckpointError when `cfg` asks a finished run for more epochs or steps: its learning-rate
    schedule has ended, so that would not be the run it claims to be."""
    progress, saved = found.progress, found.meta["config"]["train"]
    reason = progress.finished
    if reason is None and progress.micro_step == 0:  # written before runs recorded why they ended
        if progress.epoch >= saved["epochs"]:
            reason = "epochs"
        elif saved.get("max_steps") and progress.step >= saved["max_steps"]:
            reason = "max_steps"
    if reason is None:
        return None
    holds = {"epochs": progress.epoch >= cfg.train.epochs,
             "max_steps": bool(cfg.train.max_steps) and progress.step >= cfg.train.max_steps}
    if reason in holds and not holds[reason]:
        key = f"train.{reason}"
        raise CheckpointError(
            f"the run in {found.folder.parent.parent} finished at epoch {progress.epoch}, step {progress.step}, "
            f"with {key}={saved.get(reason, 0)}, and its learning-rate schedule ended there: it cannot go on to "
            f"{key}={getattr(cfg.train, reason)}; train a new run in another output_dir (or keep "
            f"{key}={saved.get(reason, 0)} to see this one's results)")
    if reason == "target":
        reached = progress.history[-1]["test_accuracy"] if progress.history else None
        target = cfg.train.target_accuracy
        if not (target and reached is not None and reached >= target):
            return None  # a higher target (or none): the run goes on exactly where it stopped
    return reason


def check_resumable(found: Checkpoint, cfg: Config, classes: list[str], global_batch_size: int) -> None:
    """Refuse, naming the file and the difference, a checkpoint that cannot continue this run."""
    saved, now = found.meta["config"], to_dict(cfg)
    for key in RESUME_KEYS:
        a, b = saved, now
        for part in key.split("."):
            a, b = a.get(part) if isinstance(a, dict) else None, b[part]
        if a != b:
            raise CheckpointError(f"cannot resume from {found.folder}: {key} was {a!r}, now {b!r}")
    if found.meta["classes"] != classes:
        raise CheckpointError(f"cannot resume from {found.folder}: it was trained on classes "
                                   f"{found.meta['classes']}, the data has {classes}")
    if found.global_batch_size != global_batch_size:
        raise CheckpointError(
            f"cannot resume from {found.folder}: its optimizer steps were {found.global_batch_size} images, now "
            f"{global_batch_size} (train.per_device_batch_size x processes x train.grad_accum_steps); to continue "
            f"it on any number of processes, set train.global_batch_size={found.global_batch_size} "
            f"train.per_device_batch_size=null")


def save_checkpoint(accelerator, train: TrainState, cfg: Config, classes: list[str], run_dir: Path,
                    loss_sum=None, seen: int = 0, test_accuracy=None) -> None:
    """(all ranks) Gather every rank's RNG state and partial sums; the main process writes; all agree on failure.
    Checkpoints are only written between optimizer steps."""
    mine = {"rng": rng_state(), "loss_sum": float(loss_sum) if loss_sum is not None else 0.0, "seen": int(seen)}
    ranks = gather_object([mine])
    error = ""
    if accelerator.is_main_process:
        progress = train.progress
        state = {"optimizer": train.optimizer.state_dict(), "scheduler": train.scheduler.state_dict(),
                 "scaler": train.scaler.state_dict() if train.scaler is not None else None,
                 "average": train.average.state_dict(), "progress": vars(progress), "ranks": ranks}
        meta = {"step": progress.step, "epoch": progress.epoch, "micro_step": progress.micro_step,
                "test_accuracy": test_accuracy, "world_size": accelerator.num_processes,
                "grad_accum_steps": train.grad_accum_steps, "global_batch_size": train.global_batch_size,
                "classes": classes, "config": to_dict(cfg), "versions": versions()}
        folder = run_dir / "checkpoints"
        try:
            ckpt.write_checkpoint(folder, progress.step, model_state=train.net.state_dict(), state=state, meta=meta,
                                  config=to_dict(cfg), classes=classes)
            ckpt.prune(folder, cfg.checkpoint.keep_last)
        except CheckpointError as err:
            previous = ckpt.find_latest(folder, warn=lambda m: None)
            error = f"{err}; the previous checkpoint {'is ' + str(previous) if previous else 'does not exist'}"
    error = broadcast_object_list([error])[0]
    if error:
        raise CheckpointError(error)


def restore(found: Checkpoint, train: TrainState, accelerator, cfg: Config) -> tuple[float, int, str]:
    """(all ranks) Load the checkpoint into `train`; returns this rank's share of the epoch's partial
    loss sum and image count, and the line to log.

    On another world size: the position in the epoch is kept in optimizer steps; rank r continues old
    rank r's random streams when there was one (else a stream seeded by seed, rank and step), and the
    old ranks' partial sums are dealt out so that their total is unchanged."""
    try:
        train.net.load_state_dict(found.model_state)
    except RuntimeError as err:
        raise CheckpointError(f"{found.folder} does not fit this model ({cfg.model.name}): "
                                   f"{str(err).splitlines()[0]}") from None
    state = found.state
    ckpt.load_optimizer_state(train.optimizer, state["optimizer"], found.folder)
    train.scheduler.load_state_dict(state["scheduler"])
    if train.scaler is not None and state.get("scaler"):
        train.scaler.load_state_dict(state["scaler"])
    train.average.load_state_dict(state.get("average"))
    progress = found.progress
    progress.finished = finished_reason(found, cfg)
    old_k = found.meta.get("grad_accum_steps", found.meta["config"]["train"]["grad_accum_steps"])
    progress.micro_step = progress.micro_step // old_k * train.grad_accum_steps
    train.progress.__dict__.update(vars(progress))

    rank, world, old_world = accelerator.process_index, accelerator.num_processes, found.world_size
    ranks = state["ranks"]
    if rank < old_world:
        set_rng_state(ranks[rank]["rng"])
    else:
        set_seed(cfg.seed + rank + 1_000_003 * progress.step)
    mine = ranks[rank::world]  # old ranks rank, rank + world, ...: every old rank's sums go to exactly one rank
    loss_sum, seen = sum(r["loss_sum"] for r in mine), sum(r["seen"] for r in mine)
    where = f"at epoch {progress.epoch + 1}, step {progress.step}"
    line = f"resumed from {found.folder} {where}"
    if old_world != world:
        line += f"; resumed on {world} process{'es' if world != 1 else ''} from a checkpoint written by {old_world}"
    return loss_sum, seen, line
