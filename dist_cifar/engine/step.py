"""(all ranks) One training micro-step: forward, backward, and at an optimizer step's end the update."""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from dist_cifar import faults

NO_CONTEXT = contextlib.nullcontext()  # reusable: entering it does nothing


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


class TrainStep:
    """train_step(x, y, sums): one micro-step of the run's model, its loss added to `sums` (an EpochSums)."""

    def __init__(self, run):
        cfg, accelerator = run.cfg, run.accelerator
        self.accelerator, self.model = accelerator, run.model
        self.optimizer, self.scheduler = run.state.optimizer, run.state.scheduler
        self.accumulate, self.autocast = step_contexts(accelerator, run.plan.accum)
        self.parameters = list(run.model.parameters())  # listed once: model.zero_grad() walks the module tree
        self.label_smoothing, self.clip = cfg.train.label_smoothing, cfg.train.grad_clip_norm
        # fp16's grad scaler skips steps with inf gradients on purpose: only the loss tells divergence there.
        self.watch_norm = cfg.train.stop_on_nonfinite and accelerator.scaler is None
        self.progress = run.progress
        last_rank = accelerator.process_index == accelerator.num_processes - 1
        self.nan_at = faults.step_of("nonfinite_at") if last_rank else None  # test hooks: a NaN loss, a slow rank
        self.sleep = faults.slow_rank_seconds(accelerator.process_index)

    def __call__(self, x, y, sums) -> torch.Tensor:
        accelerator = self.accelerator
        with self.accumulate(self.model):
            with self.autocast():
                loss = F.cross_entropy(self.model(x), y, label_smoothing=self.label_smoothing)
            if self.nan_at is not None and self.progress.step + 1 == self.nan_at:
                loss = loss * float("nan")
            accelerator.backward(loss)
            if accelerator.sync_gradients and self.clip:
                norm = accelerator.clip_grad_norm_(self.parameters, self.clip)
                if self.watch_norm:
                    sums.watch(norm)
            self.optimizer.step()
            if accelerator.sync_gradients:
                self.scheduler.step()
                for p in self.parameters:  # model.zero_grad(set_to_none=True)
                    p.grad = None
        sums.add(loss, len(y))
        if self.sleep:
            time.sleep(self.sleep)
        return loss
