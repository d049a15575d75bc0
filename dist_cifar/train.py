"""The training job: `accelerate launch dist_cifar/train.py --config configs/X.yaml [key.sub=value ...]`.

Also runs as `python dist_cifar/train.py`, `python -m dist_cifar.train`, `torchrun ... dist_cifar/train.py`
and the `dist-cifar-train` console script. One process on the CPU is the fallback; N processes
form one data-parallel group (gloo on CPUs, NCCL on GPUs). The checkpoint protocol lives in resume.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the package importable without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# torch's OpenMP threads sleep as soon as they wait instead of spinning first. On cores shared with
# other work (other ranks, other jobs, a test suite) a spinning thread holds a core its partner needs:
# configs/cpu_fast.yaml (2 threads, batch 128) trained at 897-1,040 images/s beside one busy process
# without this and at 2,089-2,310 with it, and at the same speed on idle cores (medians 2,908 and
# 2,911 images/s of four interleaved runs each; 2 cores, 2026-11-28). OpenMP reads it once, when torch
# loads it, so it is set before torch is imported; an OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import broadcast_object_list, set_seed

from dist_cifar import checkpoint as ckpt
from dist_cifar.bookkeeping import EpochClock, Plan, Run, add_curve_points, checkpoint_due, evaluate_now, finish_run
from dist_cifar.config import Config, ConfigError, batch_sizes, dump_yaml, load_config
from dist_cifar.data import DataError, Dataset, load_dataset
from dist_cifar.models import build_model
from dist_cifar.optim import build_average, build_optimizer, build_scheduler
from dist_cifar.pipeline import DeviceBatches, EpochSampler, LoaderImages, SampleLedger, normalize, steps_per_epoch
from dist_cifar.progress import progress_bar
from dist_cifar.resume import Progress, TrainState, check_resumable, find_resume_point, restore, save_checkpoint
from dist_cifar.rundir import RunLock, check_output_dir
from dist_cifar.runtime import (PHASE, PREEMPTED_EXIT_CODE, MainLog, NullLog, Preemption, RunError,
                                build_accelerator, collective_failure, collective_timeout, leave,
                                requeue_slurm_job, starve_collective_threads)
from dist_cifar.tracking import Tracker, accelerator_kwargs

CURVE_POINTS_PER_EPOCH = 20  # train-loss points for the training-curve picture


class Preempted(Exception):
    """Stopped on a signal after writing a checkpoint."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="dist-cifar-train", description="Train an image classifier, on one CPU or many processes.")
    parser.add_argument("--config", help="YAML run config (configs/*.yaml); defaults apply without one")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    group_usable = True
    try:
        cfg = load_config(args.config, args.overrides)
        return train(cfg, Path(args.config).stem if args.config else "run")
    except ConfigError as err:
        print(f"dist_cifar: config error: {err}", file=sys.stderr)
        return 2
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
    batch, _ = batch_sizes(cfg.train, int(os.environ.get("WORLD_SIZE", "1")))  # a bad batch: before any work
    main_rank = int(os.environ.get("RANK", "0")) == 0
    accelerator, info = build_accelerator(cfg, warn=lambda m: print(f"dist_cifar: warning: {m}", file=sys.stderr)
                                          if main_rank else None, batch_size=batch, **accelerator_kwargs(cfg))
    # ---- the run folder: usable, and this run's alone (the main process checks and locks; all ranks agree) ----
    run_dir = Path(broadcast_object_list([cfg.output_dir or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"])[0])
    lock = RunLock(run_dir)
    problem = (check_output_dir(run_dir) or lock.acquire()) if accelerator.is_main_process else None
    problem = broadcast_object_list([problem])[0]
    if problem:
        raise RunError(problem)
    try:
        run = setup(cfg, accelerator, info, run_dir)
        run.started = started
        return train_loop(run)
    finally:
        lock.release()


def setup(cfg: Config, accelerator, info: dict, run_dir: Path) -> Run:
    """(all ranks) Data, model, optimizer and batches; the checkpoint restored when resuming."""
    log = MainLog(run_dir) if accelerator.is_main_process else NullLog(run_dir)
    PHASE.set("loading data")
    resumed = find_resume_point(cfg, run_dir, log)
    # One process per machine decodes an image folder the first time while the others wait for it:
    # the next collective may wait that long, so this phase has its own limit.
    with collective_timeout(max(3600, cfg.dist.timeout_seconds), cfg.dist.timeout_seconds):
        data = load_dataset(cfg.data, seed=cfg.seed)
        accelerator.wait_for_everyone()
    PHASE.set("start-up")
    world = accelerator.num_processes
    batch, global_batch = batch_sizes(cfg.train, world)
    k = cfg.train.grad_accum_steps
    if resumed:
        check_resumable(resumed, cfg, data.classes, global_batch)
    micro = steps_per_epoch(len(data.train), batch, world) // k * k
    if micro == 0:
        raise RunError(f"{len(data.train)} training images cannot fill one optimizer step of {global_batch} images")
    total = cfg.train.epochs * (micro // k)
    plan = Plan(world, batch, k, global_batch, micro, micro // k, min(total, cfg.train.max_steps or total))

    set_seed(cfg.seed)  # identical initial weights on every rank
    net = build_model(cfg.model, len(data.classes), cfg.data.image_size)
    if hasattr(net, "init_whitening"):  # fastnet: its first layer is fitted to the training images
        net.init_whitening(normalize(torch.from_numpy(np.array(data.train.images[:5000])), cfg.data.mean, cfg.data.std))
    if cfg.model.sync_batchnorm:
        if accelerator.device.type == "cuda" and world > 1:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        else:
            log.warn("model.sync_batchnorm is a multi-GPU option: ignored here")
    if cfg.model.channels_last:
        net = net.to(memory_format=torch.channels_last)
    set_seed(cfg.seed + accelerator.process_index)  # anything random from here on differs per rank
    optimizer = build_optimizer(cfg, net, global_batch_size=global_batch)
    scheduler = build_scheduler(cfg, optimizer, plan.total_steps, plan.steps_per_epoch)
    model, optimizer, scheduler = accelerator.prepare(torch.compile(net) if cfg.model.compile else net,
                                                      optimizer, scheduler)
    state = TrainState(net, optimizer, scheduler, accelerator.scaler, build_average(cfg, net), Progress(), k, global_batch)
    run = Run(cfg, accelerator, info, run_dir, log, data, plan, state, model, make_batches(cfg, accelerator, data, plan))
    if resumed:
        loss_sum, seen, line = restore(resumed, state, accelerator, cfg)
        run.partial = (loss_sum, seen)
        log.print(line)
        # Records written after this checkpoint belong to lost work and will be written again.
        log.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state.progress.history))

    accelerator.wait_for_everyone()  # nobody writes before every rank has looked at the folder
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        log.write_text("config.yaml", dump_yaml(cfg))
    run.tracker = Tracker(cfg, accelerator, run_dir, log)  # does nothing off the main process or when disabled
    log.print(f"dist_cifar: world size {world}, backend {info['backend']}, device {info['device']}, "
              f"precision {info['mixed_precision']}, {info['threads_per_process']} threads/process")
    log.print(f"data: {data.source}: {len(data.train)} train / {len(data.test)} test images, "
              f"{len(data.classes)} classes, pipeline {cfg.data.pipeline}")
    log.print(f"model: {cfg.model.name}, {sum(p.numel() for p in net.parameters()):,} parameters; "
              f"{plan.total_steps} optimizer steps of {global_batch} images ({batch} x {world} process{'es' if world != 1 else ''} x {k}); "
              f"run folder {run_dir}")
    return run


def make_batches(cfg: Config, accelerator, data: Dataset, plan: Plan):
    """batches(epoch, start) for the configured pipeline; both give rank r the same shard."""
    if cfg.data.pipeline == "device":
        return DeviceBatches(data.train, batch_size=plan.batch, rank=accelerator.process_index, world_size=plan.world,
                             seed=cfg.seed, augment_cfg=cfg.data.augment, mean=cfg.data.mean, std=cfg.data.std,
                             device=accelerator.device, channels_last=cfg.model.channels_last).epoch
    images = LoaderImages(data.train, seed=cfg.seed, augment_cfg=cfg.data.augment, mean=cfg.data.mean, std=cfg.data.std)
    sampler = EpochSampler(len(data.train), seed=cfg.seed, global_batch_size=plan.batch * plan.world,
                           augment_cfg=cfg.data.augment)
    loader = accelerator.prepare(torch.utils.data.DataLoader(
        images, batch_size=plan.batch, sampler=sampler, drop_last=True, num_workers=cfg.data.num_workers,
        pin_memory=accelerator.device.type == "cuda"))

    def batches(epoch, start):
        # Accelerate's loader counts its passes and tells the sampler that count as the epoch when a
        # pass starts: set it (on the skipping loader of a resumed epoch too), or an epoch cut short
        # (the last step of a run) or a resume would replay another epoch's order.
        images.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, start) if start else loader
        epoch_loader.set_epoch(epoch)
        return epoch_loader
    return batches


def train_loop(run: Run) -> int:
    """(all ranks) Train to the end (or a stop signal), evaluating, logging and checkpointing."""
    cfg, accelerator, plan, log = run.cfg, run.accelerator, run.plan, run.log
    progress, average, optimizer, scheduler, model = (run.progress, run.state.average, run.state.optimizer,
                                                       run.state.scheduler, run.model)
    preemption = Preemption(cfg.preempt.signals)
    main_process = accelerator.is_main_process  # a property that builds Accelerate's state object: read it once
    bar = progress_bar(plan.total_steps, initial=progress.step, enabled=main_process)
    accumulate, autocast = step_contexts(accelerator, plan.accum)
    parameters = list(model.parameters())  # listed once: model.zero_grad() walks the module tree every step
    ledger = SampleLedger.from_env(accelerator.process_index)  # a test-only record of the samples trained on
    fault = os.environ.get("DIST_CIFAR_FAULT", "")  # test hooks
    curve_every = max(1, plan.steps_per_epoch // CURVE_POINTS_PER_EPOCH)
    summary, reached_target = None, None
    try:
        # An epoch ends with its bookkeeping (loss, evaluation, metrics record, checkpoint) even when a
        # resumed run has no step left in it: a checkpoint written at its last step still needs them.
        while progress.epoch < cfg.train.epochs:
            epoch = progress.epoch
            loss_sum = torch.tensor(run.partial[0], dtype=torch.float64, device=accelerator.device)
            seen, run.partial = run.partial[1], (0.0, 0)  # images this rank trained on this epoch
            curve = [(progress.step, loss_sum.clone(), seen)]  # loss sums queued on the device, read at the epoch's end
            last_postfix = time.perf_counter()
            bar.set_description(f"epoch {epoch + 1}/{cfg.train.epochs}")
            clock = EpochClock(progress)
            model.train()
            PHASE.set("training", progress)
            for x, y, index in run.batches(epoch, progress.micro_step):
                if progress.micro_step >= plan.micro_per_epoch or progress.step >= plan.total_steps:
                    break
                if ledger:
                    ledger.record(epoch, progress.step + 1, progress.micro_step, index)
                with accumulate(model):
                    with autocast():
                        loss = F.cross_entropy(model(x), y, label_smoothing=cfg.train.label_smoothing)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.train.grad_clip_norm:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                        for p in parameters:  # model.zero_grad(set_to_none=True)
                            p.grad = None
                n = len(y)
                loss_sum.add_(loss.detach(), alpha=n)  # one op, in float64, on the device: no sync per step
                seen += n
                clock.count(n * plan.world)
                progress.micro_step += 1
                if progress.micro_step % plan.accum:
                    continue
                # ---- an optimizer step is complete ----
                progress.step += 1
                average.update(progress.step, plan.total_steps)
                bar.update(1)
                if progress.step % curve_every == 0:
                    curve.append((progress.step, loss_sum.clone(), seen))
                if main_process and time.perf_counter() - last_postfix > 2.0:
                    last_postfix = time.perf_counter()  # .item() is a device sync: only now and then
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}",
                                    img_s=f"{clock.rate() or 0:.0f}")
                if fault and fault == f"sigterm_at:{progress.step}":  # test hook: a stop signal right after this step
                    os.kill(os.getpid(), signal.SIGTERM)
                if preemption.should_stop(accelerator, progress.step, cfg.preempt.check_every_steps):
                    clock.settle()
                    curve = add_curve_points(progress, curve)
                    stop_for_signal(run, loss_sum, seen, preemption.received)
                end_of_epoch = progress.micro_step >= plan.micro_per_epoch or progress.step >= plan.total_steps
                if checkpoint_due(cfg, progress.step, end_of_epoch=end_of_epoch):
                    with clock.paused():  # the checkpoint carries the counts and curve up to here
                        curve = add_curve_points(progress, curve)
                        PHASE.set(f"checkpoint at step {progress.step}")
                        save_checkpoint(accelerator, run.state, cfg, run.data.classes, run.run_dir, loss_sum, seen)
                        PHASE.set("training", progress)
                if end_of_epoch:
                    break
            average.end_epoch()
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()  # the steps were only queued: wait for them before reading the clock
            clock.settle()
            add_curve_points(progress, curve)

            # ---- end of epoch (all ranks): reduce the loss once, evaluate, log, checkpoint ----
            totals = accelerator.reduce(torch.stack([loss_sum, loss_sum.new_tensor(float(seen))]), reduction="sum")
            last_epoch = epoch + 1 >= cfg.train.epochs or progress.step >= plan.total_steps
            every = cfg.train.eval_every_epochs
            test_accuracy = None
            if last_epoch or (every and (epoch + 1) % every == 0):
                if fault == "starve_gloo" and last_epoch:
                    starve_collective_threads()  # test hook: the last collectives' threads lag, as under load
                PHASE.set(f"evaluation after epoch {epoch + 1}")
                summary = evaluate_now(run)
                test_accuracy = summary["accuracy"]
            rate = clock.rate()
            record = {"epoch": epoch + 1, "step": progress.step,
                      "train_loss": float(totals[0] / totals[1]) if totals[1] else None,
                      "test_accuracy": test_accuracy, "lr": optimizer.param_groups[0]["lr"],
                      "seconds": round(clock.seconds, 3), "images_per_second": round(rate, 1) if rate else None,
                      "train_seconds": round(progress.train_seconds, 3),
                      "wall_time": time.time(), "elapsed_seconds": round(time.time() - run.started, 3)}
            progress.history.append(record)
            log.append_jsonl("metrics.jsonl", record)
            run.tracker.log(record, step=progress.step)
            acc_text = "" if test_accuracy is None else f", test accuracy {100 * test_accuracy:.2f} %"
            rate_text = f", {rate:.0f} images/s" if rate else ""
            log.print(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}{acc_text}{rate_text}")
            progress.epoch += 1
            progress.micro_step = 0
            target = cfg.train.target_accuracy
            if target and test_accuracy is not None and test_accuracy >= target:
                reached_target = record
                log.print(f"reached the target accuracy {100 * target:.1f} % after epoch {epoch + 1}: stopping")
            final = last_epoch or reached_target is not None
            if checkpoint_due(cfg, progress.step, end_of_epoch=True, epoch=epoch + 1, final=final):
                save_checkpoint(accelerator, run.state, cfg, run.data.classes, run.run_dir, test_accuracy=test_accuracy)
            if final:
                break

        if summary is None:  # resumed after the last epoch had finished: evaluate again
            PHASE.set("final evaluation")
            summary = evaluate_now(run)
        bar.close()
        # ---- the end (all ranks): the main process writes, then every rank learns how that went ----
        # No rank leaves before the main process's files are on disk: a rank that exits first would
        # end the job (torchrun, srun --kill-on-bad-exit) and kill the main process mid-write.
        PHASE.set("final writes by the main process")
        error = finish_run(run, summary, reached_target) if accelerator.is_main_process else ""
        error = broadcast_object_list([error])[0]
        if error:
            raise RunError(error)
    except BaseException:
        run.tracker.close(exit_code=1)  # the W&B run ends as failed, never left open (a no-op when closed)
        raise
    finally:
        bar.close()
        preemption.restore()
        if ledger:
            ledger.close()
    return 0


def step_contexts(accelerator, accum: int):
    """accelerator.accumulate and accelerator.autocast for the loop's micro-steps, or a shared null context
    where one has nothing to do. Without accumulation every micro-step ends an optimizer step, and all
    accumulate() would do is set sync_gradients to True (set here once) and count steps nothing reads; in
    full precision autocast() is itself a null context. Entering the two costs about 15 us a micro-step
    on a CPU, 2 % of a batch-4 step of the tutorial's net."""
    def nothing(*models):
        return NO_CONTEXT

    if accum == 1:
        accelerator.sync_gradients = True
    return (accelerator.accumulate if accum > 1 else nothing,
            accelerator.autocast if accelerator.mixed_precision != "no" else nothing)


NO_CONTEXT = contextlib.nullcontext()  # reusable: entering it does nothing


def stop_for_signal(run: Run, loss_sum, seen: int, signal_name) -> None:
    """(all ranks) Checkpoint, requeue under SLURM (main process), and leave with the preemption code."""
    step = run.progress.step
    run.log.print(f"\nreceived {signal_name or 'a stop signal on another rank'}: saving a checkpoint at step {step}")
    PHASE.set(f"checkpoint at step {step} on a stop signal")
    save_checkpoint(run.accelerator, run.state, run.cfg, run.data.classes, run.run_dir, loss_sum, seen)
    if run.accelerator.is_main_process and run.cfg.preempt.requeue:
        requeue_slurm_job(run.log)
    run.accelerator.wait_for_everyone()
    run.tracker.close(exit_code=PREEMPTED_EXIT_CODE)
    raise Preempted()


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
