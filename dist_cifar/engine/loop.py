"""(all ranks) The training loop: epochs of steps until the run is finished, stopped or diverged."""

from __future__ import annotations

import torch

from dist_cifar import faults
from dist_cifar.dist.failures import PHASE
from dist_cifar.dist.preempt import PREEMPTED_EXIT_CODE, Preemption, requeue_slurm_job
from dist_cifar.engine.clock import EpochClock, EpochSums
from dist_cifar.engine.epoch import check_weights, diverged, end_epoch
from dist_cifar.engine.evaluation import evaluate_now
from dist_cifar.engine.results import finish
from dist_cifar.engine.run import Run, checkpoint_due
from dist_cifar.engine.step import TrainStep
from dist_cifar.observe.profiler import step_profiler
from dist_cifar.observe.stragglers import step_times
from dist_cifar.observe.progress import StepDisplay, progress_bar
from dist_cifar.state.resume import save_checkpoint


class Preempted(Exception):
    """Stopped on a signal after writing a checkpoint."""


def train_loop(run: Run) -> int:
    """(all ranks) Train until the run is finished, then evaluate and write its results."""
    progress, main_process = run.progress, run.accelerator.is_main_process  # read once: a property that builds state
    preemption = Preemption(run.cfg.preempt.signals)
    bar = progress_bar(run.plan.total_steps, initial=progress.step, enabled=main_process)
    display = StepDisplay(bar, enabled=main_process)
    train_step = TrainStep(run)
    ledger = faults.ledger(run.accelerator.process_index)  # None unless a test asked for one
    profiler, waits = step_profiler(run), step_times(run)  # do-nothing objects when off / on one process
    summary = None
    try:
        # An epoch ends with its bookkeeping even when a resumed run has no step left in it: a checkpoint
        # written at its last step (on a stop signal) still needs its evaluation, record and checkpoint.
        while not progress.finished:
            bar.set_description(f"epoch {progress.epoch + 1}/{run.cfg.train.epochs}")
            sums, clock = train_epoch(run, train_step, bar, display, preemption, ledger, profiler)
            summary = end_epoch(run, sums, clock, waits) or summary
        profiler.close()
        if summary is None:  # resumed a finished run whose results were never written: evaluate again
            PHASE.set("final evaluation")
            summary = evaluate_now(run)
        bar.close()
        finish(run, summary)  # the main process writes; every rank learns how that went
    except BaseException:
        profiler.close(failed=True)
        run.tracker.close(exit_code=1)  # the W&B run ends as failed, never left open (a no-op when closed)
        raise
    finally:
        bar.close()
        preemption.restore()
        waits.close()
        if ledger:
            ledger.close()
    return 0


def train_epoch(run: Run, train_step: TrainStep, bar, display, preemption, ledger,
                profiler) -> tuple[EpochSums, EpochClock]:
    """(all ranks) The steps left in the current epoch, with the checkpoints and stop checks inside it."""
    cfg, accelerator, plan, progress = run.cfg, run.accelerator, run.plan, run.progress
    epoch, check_every = progress.epoch, cfg.preempt.check_every_steps
    sums = EpochSums(progress, accelerator.device, plan.steps_per_epoch, *run.partial)
    run.partial = (0.0, 0)
    clock = EpochClock(progress)
    watch = Watch(run, sums, preemption)
    sigterm_at = faults.step_of("sigterm_at")  # test hook: a stop signal to this process after that step
    run.model.train()
    PHASE.set("training", progress)
    for x, y, index in run.batches(epoch, progress.micro_step):
        if progress.micro_step >= plan.micro_per_epoch or progress.step >= plan.total_steps:
            break
        if ledger:
            ledger.record(epoch, progress.step + 1, progress.micro_step, index)
        train_step(x, y, sums)
        clock.count(len(y) * plan.world)
        progress.micro_step += 1
        if progress.micro_step % plan.accum:
            continue
        # ---- an optimizer step is complete ----
        progress.step += 1
        run.state.average.update(progress.step, plan.total_steps)
        bar.update(1)
        profiler.step()  # (all ranks) the profiling window's step boundary; a no-op when profile.enabled is off
        sums.step_done(progress.step)
        display.show(sums, run.state.optimizer, clock)  # (main process) now and then: a device sync
        if progress.step == sigterm_at:
            faults.hit("sigterm_at", progress.step)
        end_of_epoch = progress.micro_step >= plan.micro_per_epoch or progress.step >= plan.total_steps
        due = checkpoint_due(cfg, progress.step, end_of_epoch=end_of_epoch)
        if watch.stop(check=due or progress.step % check_every == 0):  # (all ranks agree) a signal
            clock.settle()
            sums.flush_curve()
            stop_for_signal(run, sums, preemption.received)
        if due:
            with clock.paused():  # the checkpoint carries the counts and curve up to here
                sums.flush_curve()
                PHASE.set(f"checkpoint at step {progress.step}")
                check_weights(run)
                save_checkpoint(accelerator, run.state, cfg, run.data.classes, run.run_dir, sums.loss_sum, sums.seen)
                PHASE.set("training", progress)
        if end_of_epoch:
            break
    run.state.average.end_epoch()
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()  # the steps were only queued: wait for them before reading the clock
    clock.settle()
    sums.flush_curve()
    display.show(sums, run.state.optimizer, clock, force=True)
    return sums, clock


class Watch:
    """(all ranks) Whether to stop: a stop signal on any rank, or a non-finite loss on any rank. Agreed
    with one collective every preempt.check_every_steps steps (and before in-epoch checkpoints); with one
    process the signal flag is read every step and the loss at the same points."""

    def __init__(self, run: Run, sums: EpochSums, preemption: Preemption):
        self.run, self.sums, self.preemption = run, sums, preemption
        self.nonfinite = run.cfg.train.stop_on_nonfinite
        self.good_step = run.progress.step  # the last step at which the loss was seen finite

    def stop(self, check: bool) -> bool:
        """True when the run must stop for a signal; raises RunError (every rank) when it diverged."""
        if self.run.accelerator.num_processes == 1:
            signalled = self.preemption.received is not None
            if (check or signalled) and self.nonfinite:
                self._check(self.sums.finite())
            return signalled
        if not check:
            return False
        loss_sum = self.sums.loss_sum
        bad = (~torch.isfinite(loss_sum)).to(loss_sum.dtype) if self.nonfinite else loss_sum.new_zeros(())
        flags = torch.stack([bad, bad.new_tensor(1.0 if self.preemption.received else 0.0)])
        bad_ranks, signalled = self.run.accelerator.reduce(flags, reduction="sum").tolist()
        self._check(bad_ranks == 0)
        return signalled > 0

    def _check(self, finite: bool) -> None:
        step = self.run.progress.step
        if not finite:
            where = f"at step {step}" if step == self.good_step + 1 else f"between steps {self.good_step + 1} and {step}"
            raise diverged(self.run, where)
        self.good_step = step


def stop_for_signal(run: Run, sums: EpochSums, signal_name: str | None) -> None:
    """(all ranks) Checkpoint, requeue under SLURM (main process), and leave with the preemption code."""
    step = run.progress.step
    run.log.print(f"\nreceived {signal_name or 'a stop signal on another rank'}: saving a checkpoint at step {step}")
    PHASE.set(f"checkpoint at step {step} on a stop signal")
    check_weights(run)
    save_checkpoint(run.accelerator, run.state, run.cfg, run.data.classes, run.run_dir, sums.loss_sum, sums.seen)
    if run.accelerator.is_main_process and run.cfg.preempt.requeue:
        requeue_slurm_job(run.log)
    run.accelerator.wait_for_everyone()
    run.tracker.close(exit_code=PREEMPTED_EXIT_CODE)
    raise Preempted()
