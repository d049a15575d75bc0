"""(all ranks) The end of an epoch: the loss reduced once, evaluation when due, the metrics record, the
finish decision and the epoch's checkpoint."""

from __future__ import annotations

import math
import time

import torch

from dist_cifar.dist.failures import PHASE
from dist_cifar.engine.clock import EpochClock, EpochSums
from dist_cifar.engine.evaluation import evaluate_now
from dist_cifar.engine.run import Run, checkpoint_due, finish_reason
from dist_cifar.errors import RunError
from dist_cifar.state import checkpoint as ckpt
from dist_cifar.state.resume import save_checkpoint


def end_epoch(run: Run, sums: EpochSums, clock: EpochClock, waits=None) -> dict | None:
    """(all ranks) Close the current epoch; returns its evaluation summary, None when none was due.
    `waits` (observe/stragglers.py) gathers every rank's busy time per step and names a slow rank."""
    cfg, accelerator, progress = run.cfg, run.accelerator, run.progress
    totals = accelerator.reduce(torch.stack([sums.loss_sum, sums.loss_sum.new_tensor(float(sums.seen))]),
                                reduction="sum")
    if waits is not None:
        run.info["step_times"] = waits.end_epoch(run, clock.seconds)
    train_loss = float(totals[0] / totals[1]) if totals[1] else None
    if cfg.train.stop_on_nonfinite and train_loss is not None and not math.isfinite(train_loss):
        raise diverged(run, f"in epoch {progress.epoch + 1} (by step {progress.step})")
    epoch = progress.epoch + 1
    last_epoch = epoch >= cfg.train.epochs or progress.step >= run.plan.total_steps
    every = cfg.train.eval_every_epochs
    summary = None
    if last_epoch or (every and epoch % every == 0):
        PHASE.set(f"evaluation after epoch {epoch}")
        summary = evaluate_now(run)
    record = epoch_record(run, epoch, train_loss, summary, clock)
    progress.history.append(record)
    run.log.append_jsonl("metrics.jsonl", record)
    run.tracker.log(record, step=progress.step)
    run.log.print(epoch_line(record))
    progress.epoch, progress.micro_step = epoch, 0
    progress.finished = finish_reason(cfg, progress, run.plan.total_steps, record["test_accuracy"])
    if progress.finished == "target":
        run.log.print(f"reached the target accuracy {100 * cfg.train.target_accuracy:.1f} % after epoch {epoch}: "
                      f"stopping")
    if checkpoint_due(cfg, progress.step, end_of_epoch=True, epoch=epoch, final=progress.finished is not None):
        check_weights(run)
        save_checkpoint(accelerator, run.state, cfg, run.data.classes, run.run_dir,
                        test_accuracy=record["test_accuracy"])
    return summary


def epoch_record(run: Run, epoch: int, train_loss, summary: dict | None, clock: EpochClock) -> dict:
    """The metrics.jsonl line of an epoch (also what the trackers log)."""
    progress, rate = run.progress, clock.rate()
    return {"epoch": epoch, "step": progress.step, "train_loss": train_loss,
            "test_accuracy": summary["accuracy"] if summary else None,
            "test_loss": summary["test_loss"] if summary else None,
            "lr": run.state.optimizer.param_groups[0]["lr"], "seconds": round(clock.seconds, 3),
            "images_per_second": round(rate, 1) if rate else None,
            "flops_per_second": round(rate * run.info["flops_per_image"]) if rate and run.info.get("flops_per_image") else None,
            "train_seconds": round(progress.train_seconds, 3), "wall_time": time.time(),
            "elapsed_seconds": round(time.time() - run.started, 3)}


def epoch_line(record: dict) -> str:
    loss = "n/a (no step in this process's part of it)" if record["train_loss"] is None else f"{record['train_loss']:.4f}"
    acc = "" if record["test_accuracy"] is None else f", test accuracy {100 * record['test_accuracy']:.2f} %"
    rate = f", {record['images_per_second']:.0f} images/s" if record["images_per_second"] else ""
    if record.get("flops_per_second"):
        rate += f" ({record['flops_per_second'] / 1e9:.2f} GFLOP/s)"
    return f"epoch {record['epoch']}: train loss {loss}{acc}{rate}"


def weights_finite(net: torch.nn.Module) -> bool:
    """Whether every parameter and buffer is finite (one device sync). Identical on every rank."""
    total = sum(t.detach().float().abs().sum() for t in [*net.parameters(), *net.buffers()] if t.is_floating_point())
    return bool(torch.isfinite(torch.as_tensor(total)))


def check_weights(run: Run) -> None:
    """(all ranks) Before anything is written from the weights: refuse non-finite ones (a gradient that
    was inf or NaN in the last step, while the loss still looked fine)."""
    if run.cfg.train.stop_on_nonfinite and not weights_finite(run.state.net):
        raise diverged(run, f"by step {run.progress.step} (the weights)")


def diverged(run: Run, where: str) -> RunError:
    """The one line of a run stopped on a non-finite loss, gradient or weight."""
    good = ckpt.find_latest(run.run_dir / "checkpoints", warn=lambda m: None)
    last = f"the last good checkpoint is {good}" if good else "there is no earlier checkpoint"
    return RunError(f"training diverged: the loss or gradients became non-finite (NaN or inf) {where}; nothing "
                    f"was saved from that state and {last} (try a lower optim.lr; train.stop_on_nonfinite=false "
                    f"trains on regardless)")
