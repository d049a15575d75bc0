"""One training run on one rank: its plan (batches and step counts), its live objects, and the cadence
rules that decide when a checkpoint is written and when the run is finished."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dist_cifar.config import Config, TrainConfig
from dist_cifar.data.sources import Dataset
from dist_cifar.errors import ConfigError
from dist_cifar.observe.log import MainLog
from dist_cifar.observe.tracking import Tracker
from dist_cifar.state.resume import Progress, TrainState


@dataclass
class Plan:
    """How the global batch is split, and how many steps the run has."""
    world: int  # processes
    batch: int  # images per process per micro-step
    accum: int  # micro-steps per optimizer step
    global_batch: int  # images per optimizer step
    micro_per_epoch: int
    steps_per_epoch: int
    total_steps: int


DEFAULT_PER_DEVICE_BATCH = 4


def batch_sizes(train: TrainConfig, world_size: int) -> tuple[int, int]:
    """(images per process per micro-step, images per optimizer step) on `world_size` processes."""
    k = train.grad_accum_steps
    procs = f"{world_size} process{'es' if world_size != 1 else ''}"
    if not train.global_batch_size:
        per_device = train.per_device_batch_size or DEFAULT_PER_DEVICE_BATCH
        return per_device, per_device * world_size * k
    total = train.global_batch_size
    if total % (world_size * k):
        raise ConfigError(f"train.global_batch_size={total} does not split evenly over {procs} x "
                          f"train.grad_accum_steps={k}: use a multiple of {world_size * k}")
    per_device = total // (world_size * k)
    if train.per_device_batch_size is not None and train.per_device_batch_size != per_device:
        raise ConfigError(f"train.global_batch_size={total} means {per_device} images per process on {procs} "
                          f"x train.grad_accum_steps={k}, but train.per_device_batch_size="
                          f"{train.per_device_batch_size}: set one of them (the other to null)")
    return per_device, total


@dataclass
class Run:
    """One training run on this rank: what the loop and the save points need."""
    cfg: Config
    accelerator: object
    info: dict
    run_dir: Path
    log: MainLog
    data: Dataset
    plan: Plan
    state: TrainState  # what a checkpoint carries
    model: torch.nn.Module  # the prepared (wrapped) model that trains
    batches: object  # batches(epoch, start_micro_step) -> iterator of (images, labels, sample indices)
    tracker: Tracker | None = None
    started: float = 0.0
    partial: tuple = (0.0, 0)  # this rank's loss sum and image count of the epoch a checkpoint was written in

    @property
    def progress(self) -> Progress:
        return self.state.progress


def checkpoint_due(cfg: Config, step: int, *, end_of_epoch: bool, epoch: int | None = None, final: bool = False) -> bool:
    """The one decision "write a checkpoint now?". Inside an epoch (`epoch` None): every
    checkpoint.every_steps steps, but not at the epoch's last step, which the epoch's end decides
    (with its metrics record) so no step is written twice. At the end of epoch `epoch` (1-based):
    every checkpoint.every_epochs epochs, a due step save, and the end of the run (`final`)."""
    by_steps = bool(cfg.checkpoint.every_steps) and step % cfg.checkpoint.every_steps == 0
    if epoch is None:
        return by_steps and not end_of_epoch
    by_epochs = bool(cfg.checkpoint.every_epochs) and epoch % cfg.checkpoint.every_epochs == 0
    return final or by_epochs or by_steps


def finish_reason(cfg: Config, progress: Progress, total_steps: int, test_accuracy: float | None) -> str | None:
    """Why the run is finished after the epoch just recorded, or None while it goes on."""
    target = cfg.train.target_accuracy
    if target and test_accuracy is not None and test_accuracy >= target:
        return "target"
    if progress.step >= total_steps and cfg.train.max_steps and total_steps == cfg.train.max_steps:
        return "max_steps"
    if progress.epoch >= cfg.train.epochs or progress.step >= total_steps:
        return "epochs"
    return None


FINISHED_BECAUSE = {"epochs": "trained all its epochs", "max_steps": "reached train.max_steps",
                    "target": "reached train.target_accuracy"}
