"""The loop's bookkeeping: the run's plan and state on one rank, the one stopwatch and image counter,
the one "checkpoint now?" decision, evaluation, and the run's end (model file, results.json, pictures)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_cifar import checkpoint as ckpt
from dist_cifar.config import Config, to_dict
from dist_cifar.data import Dataset
from dist_cifar.evaluate import confusion_matrix, per_class_table, summarize
from dist_cifar.resume import Progress, TrainState
from dist_cifar.runtime import MainLog, versions
from dist_cifar.tracking import Tracker


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


class EpochClock:
    """The one stopwatch and image counter of an epoch; it pauses for saves and evaluation and keeps
    the run totals (progress.train_seconds / train_images) up to date at every pause."""

    def __init__(self, progress: Progress):
        self.progress, self.seconds, self.images, self._counted = progress, 0.0, 0, 0
        self._tick = time.perf_counter()

    def count(self, images: int) -> None:
        self.images += images

    def settle(self) -> None:
        """Bring the epoch's and the run's totals up to now (before a checkpoint, at the epoch's end)."""
        now = time.perf_counter()
        lap, self._tick = now - self._tick, now
        self.seconds += lap
        self.progress.train_seconds += lap
        self.progress.train_images += self.images - self._counted
        self._counted = self.images

    @contextlib.contextmanager
    def paused(self):
        self.settle()
        try:
            yield
        finally:
            self._tick = time.perf_counter()

    def rate(self) -> float | None:
        """Images per second of training in this epoch, in this process's life; None without steps."""
        running = self.seconds + time.perf_counter() - self._tick
        return self.images / running if self.images and running > 0 else None


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


def add_curve_points(progress: Progress, marks: list) -> list:
    """Turn (step, loss sum, images) marks into [step, mean loss since the previous mark] points of
    progress.curve (one device sync); returns the marks still open: the last one."""
    for (_, before, n0), (step, after, n1) in zip(marks, marks[1:]):
        if n1 > n0:
            progress.curve.append([step, round((float(after) - float(before)) / (n1 - n0), 5)])
    return marks[-1:]


def evaluate_now(run: Run) -> dict:
    """(all ranks) Exact accuracy on the test split, with the averaged weights when EMA is on."""
    cfg = run.cfg
    with run.state.average.evaluation_weights():
        cm = confusion_matrix(run.state.net, run.data.test, len(run.data.classes), accelerator=run.accelerator,
                              batch_size=cfg.train.eval_batch_size, mean=cfg.data.mean, std=cfg.data.std,
                              tta_level=cfg.train.tta_level, channels_last=cfg.model.channels_last)
    return summarize(cm, run.data.classes)


def finish_run(run: Run, summary: dict, reached_target) -> str:
    """(only on the main process) Final weights, results.json, the per-class table, pictures.
    Returns "" when all is written, else one line saying what could not be."""
    try:
        write_results(run, summary, reached_target)
    except (OSError, ckpt.CheckpointError) as err:
        what = f"{err.strerror} ({err.filename})" if isinstance(err, OSError) and err.strerror else str(err)
        return f"the run finished but its results could not be written to {run.run_dir}: {what}"
    return ""


def write_results(run: Run, summary: dict, reached_target) -> None:
    cfg, info, progress = run.cfg, run.info, run.progress
    results = dict(summary)
    results.update(
        world_size=info["world_size"], backend=info["backend"], device=info["device"],
        mixed_precision=info["mixed_precision"], mixed_precision_requested=info["mixed_precision_requested"],
        global_batch_size=run.plan.global_batch, per_device_batch_size=run.plan.batch,
        epochs=progress.epoch, steps=progress.step, seed=cfg.seed, model=cfg.model.name, classes=run.data.classes,
        train_seconds=round(progress.train_seconds, 3), train_images=progress.train_images,
        train_images_per_second=round(progress.train_images / progress.train_seconds, 1) if progress.train_seconds else None,
        wall_seconds=round(time.time() - run.started, 3),
        target_accuracy=cfg.train.target_accuracy or None,
        target_reached_at_epoch=reached_target["epoch"] if reached_target else None,
        target_reached_elapsed_seconds=reached_target["elapsed_seconds"] if reached_target else None,
        target_reached_train_seconds=reached_target["train_seconds"] if reached_target else None,
        versions=versions())
    pictures = []
    with run.state.average.evaluation_weights():  # the model file and the sample pictures use the averaged weights
        ckpt.save_weights(run.run_dir / "model.safetensors", run.state.net.state_dict(), to_dict(cfg), run.data.classes)
        run.log.write_json("results.json", results)
        if cfg.tracking.plots:
            from dist_cifar.plots import sample_predictions, write_run_pictures  # matplotlib: only when drawing
            sample = sample_predictions(run.state.net, run.data.test, run.data.classes, mean=cfg.data.mean,
                                        std=cfg.data.std)
            pictures = write_run_pictures(run.run_dir, results, progress.history, sample, curve=progress.curve)
    run.log.print(per_class_table(summary))
    run.tracker.finish(results, pictures)
    run.log.print(f"results in {run.run_dir}")
