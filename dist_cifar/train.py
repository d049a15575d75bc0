"""The training job: `accelerate launch dist_cifar/train.py --config configs/X.yaml [key.sub=value ...]`.

Also runs as `python dist_cifar/train.py`, `python -m dist_cifar.train`, `torchrun ... dist_cifar/train.py`
and the `dist-cifar-train` console script. One process on the CPU is the fallback; N processes
form one data-parallel group (gloo on CPUs, NCCL on GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the package importable without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from tqdm.auto import tqdm

from dist_cifar import checkpoint as ckpt
from dist_cifar.config import Config, ConfigError, dump_yaml, load_config, to_dict
from dist_cifar.data import DataError, load_dataset
from dist_cifar.evaluate import confusion_matrix, per_class_table, summarize
from dist_cifar.models import build_model
from dist_cifar.optim import WeightAverage, build_optimizer, build_scheduler, freeze_groups
from dist_cifar.pipeline import DeviceBatches, EpochSampler, LoaderImages, normalize, steps_per_epoch
from dist_cifar.rundir import RunLock, check_output_dir
from dist_cifar.tracking import Tracker, accelerator_kwargs
from dist_cifar.runtime import (PHASE, PREEMPTED_EXIT_CODE, MainLog, NullLog, Preemption, RunError,
                                build_accelerator, collective_failure, collective_timeout, leave,
                                requeue_slurm_job, starve_collective_threads, versions)

# Config keys whose change makes a checkpoint's data order or state meaningless for this run.
RESUME_MUST_MATCH = ("seed", "model.name", "model.widths", "data.train_subset", "train.epochs",
                     "train.per_device_batch_size", "train.grad_accum_steps", "optim.name")


class Preempted(Exception):
    """Stopped on a signal after writing a checkpoint."""


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""
    epoch: int = 0  # current epoch (0-based)
    micro_step: int = 0  # micro-steps done in the current epoch
    step: int = 0  # optimizer steps done in the whole run
    train_seconds: float = 0.0  # time spent in training steps, all attempts together
    train_images: int = 0  # images trained on by all ranks in those seconds
    history: list = field(default_factory=list)  # the metrics.jsonl records so far


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="dist-cifar-train", description="Train an image classifier, on one CPU or many processes.")
    parser.add_argument("--config", help="YAML run config (configs/*.yaml); defaults apply without one")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    return parser.parse_args(argv)


def config_name(path) -> str:
    return Path(path).stem if path else "run"


def resolve_run_dir(cfg: Config, name: str) -> Path:
    """(all ranks) The run folder; the main process picks the default name so every rank agrees."""
    chosen = [cfg.output_dir or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"]
    chosen = broadcast_object_list(chosen)
    return Path(chosen[0])


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


def check_resumable(folder: Path, meta: dict, cfg: Config, classes: list[str], world_size: int) -> None:
    """Refuse, naming the file and the difference, a checkpoint that cannot continue this run."""
    saved = meta["config"]
    now = to_dict(cfg)
    for key in RESUME_MUST_MATCH:
        a, b = saved, now
        for part in key.split("."):
            a, b = a.get(part) if isinstance(a, dict) else None, b[part]
        if a != b:
            raise ckpt.CheckpointError(f"cannot resume from {folder}: {key} was {a!r}, now {b!r}")
    if meta["classes"] != classes:
        raise ckpt.CheckpointError(f"cannot resume from {folder}: it was trained on classes {meta['classes']}, "
                                   f"the data has {classes}")
    if meta["world_size"] != world_size:
        raise ckpt.CheckpointError(
            f"cannot resume from {folder}: it was written by {meta['world_size']} processes and this run has "
            f"{world_size}; the data order depends on the world size, so relaunch with {meta['world_size']}")


def find_resume_point(cfg: Config, run_dir: Path, log) -> Path | None:
    """(all ranks) The checkpoint to continue from, or None for a fresh run."""
    resume = cfg.train.resume
    if resume == "":
        if (run_dir / "config.yaml").exists() or ckpt.list_checkpoints(run_dir / "checkpoints"):
            raise RunError(f"output_dir {run_dir} already holds a run; pass train.resume=auto to continue it "
                           f"or choose another output_dir")
        return None
    if resume == "auto":
        found = ckpt.find_latest(run_dir / "checkpoints", warn=log.warn)
        if found is None:
            log.print(f"train.resume=auto: no checkpoint in {run_dir / 'checkpoints'}, starting fresh")
        return found
    return Path(resume)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"dist_cifar: config error: {err}", file=sys.stderr)
        return 2
    group_usable = True
    try:
        return train(cfg, config_name(args.config))
    except (DataError, ckpt.CheckpointError, RunError) as err:
        print(f"dist_cifar: error: {err}", file=sys.stderr)
        return 1
    except Preempted:
        return PREEMPTED_EXIT_CODE
    except Exception as err:
        failure = collective_failure(err)
        if failure is None:
            raise
        group_usable = False
        print(f"dist_cifar: error: {failure}", file=sys.stderr)
        return 1
    finally:
        # Closing the group is local to this rank; after a failed collective it could wait on the dead
        # peer's work instead, and the process ends without it.
        if group_usable and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train(cfg: Config, name: str = "run") -> int:
    started = time.time()
    accelerator, info = build_accelerator(cfg, warn=lambda m: print(f"dist_cifar: warning: {m}", file=sys.stderr)
                                          if int(os.environ.get("RANK", "0")) == 0 else None,
                                          **accelerator_kwargs(cfg))
    run_dir = resolve_run_dir(cfg, name)
    # ---- the run folder: usable, and this run's alone (the main process checks and locks; all ranks agree) ----
    lock = RunLock(run_dir)
    problem = (check_output_dir(run_dir) or lock.acquire()) if accelerator.is_main_process else None
    problem = broadcast_object_list([problem])[0]
    if problem:
        raise RunError(problem)
    try:
        return run(cfg, accelerator, info, run_dir, started)
    finally:
        lock.release()


def run(cfg: Config, accelerator, info: dict, run_dir: Path, started: float) -> int:
    """(all ranks) The run, in a folder this run holds."""
    main_process = accelerator.is_main_process
    log = MainLog(run_dir) if main_process else NullLog(run_dir)

    # ---- resume point and run folder (all ranks decide, then the main process writes) ----
    PHASE.set("loading data")
    resume_from = find_resume_point(cfg, run_dir, log)
    resumed = ckpt.read_checkpoint(resume_from) if resume_from else None
    # ---- data and model (all ranks; identical initial weights from the shared seed) ----
    # One process per machine decodes an image folder the first time while the others wait for it:
    # the next collective may wait that long, so this phase has its own limit.
    with collective_timeout(max(3600, cfg.dist.timeout_seconds), cfg.dist.timeout_seconds):
        data = load_dataset(cfg.data, seed=cfg.seed)
        accelerator.wait_for_everyone()
    PHASE.set("start-up")
    classes = data.classes
    if resumed:
        check_resumable(resume_from, resumed[2], cfg, classes, accelerator.num_processes)
    set_seed(cfg.seed)
    net = build_model(cfg.model, len(classes), cfg.data.image_size)
    if hasattr(net, "init_whitening"):
        net.init_whitening(normalize(torch.from_numpy(np.array(data.train.images[:5000])), cfg.data.mean, cfg.data.std))
    if cfg.model.sync_batchnorm:
        if accelerator.device.type == "cuda" and accelerator.num_processes > 1:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        else:
            log.warn("model.sync_batchnorm is a multi-GPU option: ignored here")
    if cfg.model.channels_last:
        net = net.to(memory_format=torch.channels_last)
    set_seed(cfg.seed + accelerator.process_index)  # anything random from here on differs per rank

    world = accelerator.num_processes
    B, k = cfg.train.per_device_batch_size, cfg.train.grad_accum_steps
    micro_per_epoch = steps_per_epoch(len(data.train), B, world) // k * k
    if micro_per_epoch == 0:
        raise RunError(f"{len(data.train)} training images cannot fill one optimizer step of "
                       f"{B} x {world} processes x {k} accumulation steps")
    steps_per_epoch_opt = micro_per_epoch // k
    total_steps = cfg.train.epochs * steps_per_epoch_opt
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)

    optimizer = build_optimizer(cfg, net, global_batch_size=B * world * k)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    forward_net = torch.compile(net) if cfg.model.compile else net
    model, optimizer, scheduler = accelerator.prepare(forward_net, optimizer, scheduler)
    average = None
    if cfg.train.ema_decay:
        average = WeightAverage(net, "ema", cfg.train.ema_decay)
    elif cfg.train.lookahead_every:
        average = WeightAverage(net, "lookahead", cfg.train.lookahead_decay, cfg.train.lookahead_every)

    if cfg.data.pipeline == "device":
        batches = DeviceBatches(data.train, batch_size=B, rank=accelerator.process_index, world_size=world,
                                seed=cfg.seed, augment_cfg=cfg.data.augment, mean=cfg.data.mean, std=cfg.data.std,
                                device=accelerator.device, channels_last=cfg.model.channels_last)
        epoch_batches = batches.epoch
    else:
        images = LoaderImages(data.train, seed=cfg.seed, augment_cfg=cfg.data.augment, mean=cfg.data.mean,
                              std=cfg.data.std)
        sampler = EpochSampler(len(data.train), seed=cfg.seed, global_batch_size=B * world,
                               augment_cfg=cfg.data.augment)
        loader = accelerator.prepare(torch.utils.data.DataLoader(
            images, batch_size=B, sampler=sampler, drop_last=True, num_workers=cfg.data.num_workers,
            pin_memory=accelerator.device.type == "cuda"))

        def epoch_batches(epoch, start):
            images.set_epoch(epoch)
            sampler.set_epoch(epoch)
            return accelerator.skip_first_batches(loader, start) if start else loader

    # ---- restore a checkpoint ----
    progress = Progress()
    partial_loss = 0.0
    partial_seen = 0
    if resumed:
        model_state, state, meta = resumed
        try:
            net.load_state_dict(model_state)
        except RuntimeError as err:
            raise ckpt.CheckpointError(f"{resume_from} does not fit this model ({cfg.model.name}, "
                                       f"{len(classes)} classes): {str(err).splitlines()[0]}") from None
        ckpt.load_optimizer_state(optimizer, state["optimizer"], resume_from)
        scheduler.load_state_dict(state["scheduler"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        if average is not None and state.get("average"):
            average.load_state_dict(state["average"])
        progress = Progress(**state["progress"])
        rank_state = state["ranks"][accelerator.process_index]
        set_rng_state(rank_state["rng"])
        partial_loss, partial_seen = rank_state["loss_sum"], rank_state["seen"]
        log.print(f"resumed from {resume_from} at epoch {progress.epoch + 1}, step {progress.step}")
        # Records written after this checkpoint belong to lost work and will be written again.
        log.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in progress.history))

    accelerator.wait_for_everyone()  # nobody writes before every rank has looked at the folder
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        log.write_text("config.yaml", dump_yaml(cfg))
    tracker = Tracker(cfg, accelerator, run_dir, log)  # does nothing off the main process or when disabled
    log.print(f"dist_cifar: world size {world}, backend {info['backend']}, device {info['device']}, "
              f"precision {info['mixed_precision']}, {info['threads_per_process']} threads/process")
    log.print(f"data: {data.source}: {len(data.train)} train / {len(data.test)} test images, {len(classes)} classes, "
              f"pipeline {cfg.data.pipeline}")
    log.print(f"model: {cfg.model.name}, {sum(p.numel() for p in net.parameters()):,} parameters; "
              f"{total_steps} optimizer steps of {B} x {world} x {k} images; run folder {run_dir}")
    ctx = dict(accelerator=accelerator, cfg=cfg, net=net, optimizer=optimizer, scheduler=scheduler,
               average=average, classes=classes, run_dir=run_dir, log=log, info=info, tracker=tracker, test=data.test)

    # ---- train (all ranks) ----
    preemption = Preemption(cfg.preempt.signals)
    bar = tqdm(total=total_steps, initial=progress.step, disable=not main_process, unit="step",
               dynamic_ncols=True, mininterval=1.0)
    label_smoothing = cfg.train.label_smoothing
    summary = None
    reached_target = None
    try:
        # An epoch ends with its bookkeeping (loss, evaluation, metrics record, checkpoint) even when a
        # resumed run has no step left in it: a checkpoint written at its last step still needs them.
        while progress.epoch < cfg.train.epochs:
            epoch = progress.epoch
            loss_sum = torch.tensor(partial_loss, dtype=torch.float64, device=accelerator.device)
            seen = partial_seen  # images this rank trained on this epoch: known on the host, no device op
            partial_loss, partial_seen = 0.0, 0
            bar.set_description(f"epoch {epoch + 1}/{cfg.train.epochs}")
            images_this_attempt = 0  # this epoch, in this process's life
            epoch_seconds = 0.0  # training time of this epoch so far, checkpoint saves left out
            saved_images = 0  # of images_this_attempt, those already added to progress.train_images
            tick = time.perf_counter()
            last_postfix = tick
            freeze_groups(optimizer, epoch)
            model.train()
            PHASE.set("training", progress)
            for x, y in epoch_batches(epoch, progress.micro_step):
                if progress.micro_step >= micro_per_epoch or progress.step >= total_steps:
                    break
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.train.grad_clip_norm:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                        freeze_groups(optimizer, epoch)
                        # the wrapped optimizer directly: Accelerate's zero_grad looks up its signature every call
                        optimizer.optimizer.zero_grad(set_to_none=True)
                loss_sum.add_(loss.detach(), alpha=len(y))  # one op, in float64, on the device: no sync per step
                seen += len(y)
                images_this_attempt += len(y) * world
                progress.micro_step += 1
                if progress.micro_step % k:
                    continue
                # ---- an optimizer step is complete ----
                progress.step += 1
                if average is not None:
                    average.update(progress.step, total_steps)
                bar.update(1)
                now = time.perf_counter()
                if main_process and now - last_postfix > 2.0:  # .item() is a device sync: only now and then
                    last_postfix = now
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}",
                                    img_s=f"{images_this_attempt / (epoch_seconds + now - tick):.0f}")
                if preemption.should_stop(accelerator, progress.step, cfg.preempt.check_every_steps):
                    progress.train_seconds += time.perf_counter() - tick
                    progress.train_images += images_this_attempt - saved_images
                    stop_for_signal(ctx, progress, loss_sum, seen, preemption.received)
                if cfg.checkpoint.every_steps and progress.step % cfg.checkpoint.every_steps == 0:
                    # The stopwatch pauses for the save; the checkpoint carries the counts up to here.
                    lap = time.perf_counter() - tick
                    progress.train_seconds += lap
                    progress.train_images += images_this_attempt - saved_images
                    epoch_seconds += lap
                    saved_images = images_this_attempt
                    PHASE.set(f"checkpoint at step {progress.step}")
                    save_checkpoint(ctx, progress, loss_sum, seen)
                    PHASE.set("training", progress)
                    tick = time.perf_counter()
                if progress.step >= total_steps:
                    break
            if average is not None:
                average.finish()
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()  # the steps were only queued: wait for them before reading the clock
            lap = time.perf_counter() - tick
            progress.train_seconds += lap
            progress.train_images += images_this_attempt - saved_images
            seconds = epoch_seconds + lap

            # ---- end of epoch (all ranks): reduce the loss once, evaluate, log, checkpoint ----
            totals = accelerator.reduce(torch.stack([loss_sum, loss_sum.new_tensor(float(seen))]), reduction="sum")
            last_epoch = progress.epoch + 1 >= cfg.train.epochs or progress.step >= total_steps
            every = cfg.train.eval_every_epochs
            test_accuracy = None
            if last_epoch or (every and (epoch + 1) % every == 0):
                if os.environ.get("DIST_CIFAR_FAULT") == "starve_gloo" and last_epoch:
                    starve_collective_threads()  # test hook: the last collectives' threads lag, as under load
                PHASE.set(f"evaluation after epoch {epoch + 1}")
                summary = evaluate_now(ctx, data.test)
                test_accuracy = summary["accuracy"]
            record = {"epoch": epoch + 1, "step": progress.step,
                      "train_loss": float(totals[0] / totals[1]) if totals[1] else None,
                      "test_accuracy": test_accuracy, "lr": optimizer.param_groups[0]["lr"],
                      "seconds": round(seconds, 3), "images_per_second": round(images_this_attempt / max(seconds, 1e-9), 1) if images_this_attempt else None,
                      "train_seconds": round(progress.train_seconds, 3),
                      "wall_time": time.time(), "elapsed_seconds": round(time.time() - started, 3)}
            progress.history.append(record)
            log.append_jsonl("metrics.jsonl", record)
            tracker.log(record, step=progress.step)
            acc_text = "" if test_accuracy is None else f", test accuracy {100 * test_accuracy:.2f} %"
            rate_text = f", {record['images_per_second']:.0f} images/s" if images_this_attempt else ""
            log.print(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}{acc_text}{rate_text}")
            progress.epoch += 1
            progress.micro_step = 0
            target = cfg.train.target_accuracy
            if target and test_accuracy is not None and test_accuracy >= target and reached_target is None:
                reached_target = record
                log.print(f"reached the target accuracy {100 * target:.1f} % after epoch {epoch + 1}: stopping")
            if (cfg.checkpoint.every_epochs and (epoch + 1) % cfg.checkpoint.every_epochs == 0) or last_epoch \
                    or reached_target:
                save_checkpoint(ctx, progress, None, None, test_accuracy)
            if reached_target or last_epoch:
                break

        if summary is None:  # resumed after the last epoch had finished: evaluate again
            PHASE.set("final evaluation")
            summary = evaluate_now(ctx, data.test)
        bar.close()
        # ---- the end (all ranks): the main process writes, then every rank learns how that went ----
        # No rank leaves before the main process's files are on disk: a rank that exits first would
        # end the job (torchrun, srun --kill-on-bad-exit) and kill the main process mid-write.
        PHASE.set("final writes by the main process")
        error = finish_run(ctx, progress, summary, reached_target, started) if main_process else ""
        error = broadcast_object_list([error])[0]
        if error:
            raise RunError(error)
    except BaseException:
        tracker.close(exit_code=1)  # the W&B run ends as failed, never left open (a no-op when closed)
        raise
    finally:
        bar.close()
        preemption.restore()
    return 0


def evaluate_now(ctx, split) -> dict:
    """(all ranks) Exact accuracy on `split`, with the averaged weights when EMA is on."""
    cfg, average = ctx["cfg"], ctx["average"]
    swap = average is not None and average.mode == "ema"
    if swap:
        average.swap()
    try:
        cm = confusion_matrix(ctx["net"], split, len(ctx["classes"]), accelerator=ctx["accelerator"],
                              batch_size=cfg.train.eval_batch_size, mean=cfg.data.mean, std=cfg.data.std,
                              tta_level=cfg.train.tta_level, channels_last=cfg.model.channels_last)
    finally:
        if swap:
            average.swap()
    return summarize(cm, ctx["classes"])


def save_checkpoint(ctx, progress: Progress, loss_sum, seen, test_accuracy=None) -> None:
    """(all ranks) Gather every rank's RNG state and partial sums; the main process writes; all agree on failure."""
    accelerator, cfg = ctx["accelerator"], ctx["cfg"]
    mine = {"rng": rng_state(), "loss_sum": float(loss_sum) if loss_sum is not None else 0.0,
            "seen": int(seen) if seen is not None else 0}
    ranks = gather_object([mine])
    error = ""
    if accelerator.is_main_process:
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        state = {"optimizer": ctx["optimizer"].state_dict(), "scheduler": ctx["scheduler"].state_dict(),
                 "scaler": scaler, "average": ctx["average"].state_dict() if ctx["average"] else None,
                 "progress": vars(progress), "ranks": ranks}
        meta = {"step": progress.step, "epoch": progress.epoch, "micro_step": progress.micro_step,
                "test_accuracy": test_accuracy, "world_size": accelerator.num_processes,
                "classes": ctx["classes"], "config": to_dict(cfg), "versions": versions()}
        try:
            ckpt.write_checkpoint(ctx["run_dir"] / "checkpoints", progress.step, model_state=ctx["net"].state_dict(),
                                  state=state, meta=meta, config=to_dict(cfg), classes=ctx["classes"])
            ckpt.prune(ctx["run_dir"] / "checkpoints", cfg.checkpoint.keep_last)
        except ckpt.CheckpointError as err:
            previous = ckpt.find_latest(ctx["run_dir"] / "checkpoints", warn=lambda m: None)
            error = f"{err}; the previous checkpoint {'is ' + str(previous) if previous else 'does not exist'}"
    error = broadcast_object_list([error])[0]
    if error:
        raise ckpt.CheckpointError(error)


def stop_for_signal(ctx, progress, loss_sum, seen, signal_name) -> None:
    """(all ranks) Checkpoint, requeue under SLURM (main process), and leave with the preemption code."""
    log = ctx["log"]
    log.print(f"\nreceived {signal_name or 'a stop signal on another rank'}: saving a checkpoint at step {progress.step}")
    PHASE.set(f"checkpoint at step {progress.step} on a stop signal")
    save_checkpoint(ctx, progress, loss_sum, seen)
    if ctx["accelerator"].is_main_process and ctx["cfg"].preempt.requeue:
        requeue_slurm_job(log)
    ctx["accelerator"].wait_for_everyone()
    ctx["tracker"].close(exit_code=PREEMPTED_EXIT_CODE)
    raise Preempted()


def finish_run(ctx, progress: Progress, summary: dict, reached_target, started: float) -> str:
    """(only on the main process) Final weights, results.json, the per-class table, pictures.
    Returns "" when all is written, else one line saying what could not be."""
    try:
        write_results(ctx, progress, summary, reached_target, started)
    except (OSError, ckpt.CheckpointError) as err:
        what = f"{err.strerror} ({err.filename})" if isinstance(err, OSError) and err.strerror else str(err)
        return f"the run finished but its results could not be written to {ctx['run_dir']}: {what}"
    return ""


def write_results(ctx, progress: Progress, summary: dict, reached_target, started: float) -> None:
    accelerator, cfg, log, info = ctx["accelerator"], ctx["cfg"], ctx["log"], ctx["info"]
    run_dir = ctx["run_dir"]
    average = ctx["average"]
    if average is not None and average.mode == "ema":
        average.swap()
    ckpt.save_weights(run_dir / "model.safetensors", ctx["net"].state_dict(), to_dict(cfg), ctx["classes"])
    if cfg.tracking.plots:
        from dist_cifar.plots import sample_predictions, write_run_pictures  # matplotlib: only when drawing
    sample = (sample_predictions(ctx["net"], ctx["test"], ctx["classes"], mean=cfg.data.mean, std=cfg.data.std)
              if cfg.tracking.plots else None)  # with the saved weights, before the EMA swap back
    if average is not None and average.mode == "ema":
        average.swap()
    results = dict(summary)
    results.update(
        world_size=info["world_size"], backend=info["backend"], device=info["device"],
        mixed_precision=info["mixed_precision"], mixed_precision_requested=info["mixed_precision_requested"],
        epochs=progress.epoch, steps=progress.step, seed=cfg.seed, model=cfg.model.name, classes=ctx["classes"],
        train_seconds=round(progress.train_seconds, 3), train_images=progress.train_images,
        train_images_per_second=round(progress.train_images / progress.train_seconds, 1) if progress.train_seconds else None,
        wall_seconds=round(time.time() - started, 3),
        target_accuracy=cfg.train.target_accuracy or None,
        target_reached_at_epoch=reached_target["epoch"] if reached_target else None,
        target_reached_elapsed_seconds=reached_target["elapsed_seconds"] if reached_target else None,
        target_reached_train_seconds=reached_target["train_seconds"] if reached_target else None,
        versions=versions())
    log.write_json("results.json", results)
    log.print(per_class_table(summary))
    pictures = write_run_pictures(run_dir, results, progress.history, sample) if cfg.tracking.plots else []
    ctx["tracker"].finish(results, pictures)
    log.print(f"results in {run_dir}")


def cli() -> None:
    try:
        code = main()
    except SystemExit as err:  # argparse: --help, usage errors
        code = err.code if isinstance(err.code, int) else 2
    except KeyboardInterrupt:
        print("dist_cifar: interrupted", file=sys.stderr)
        code = 130
    except BaseException:  # a bug: show it, then leave the same way as every other exit
        traceback.print_exc()
        code = 1
    leave(code)


if __name__ == "__main__":
    cli()
