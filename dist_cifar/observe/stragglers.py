"""(all ranks) Each rank's busy time per optimizer step, gathered at every epoch's end, and the slow rank named.

In data-parallel training every rank's step takes the same wall time: the gradient all-reduce makes the
fast ranks wait for the slowest. So a rank's own cost is its training time less the time it sat waiting
for the others, and the waits are what this module measures, with public hooks and no host sync:
  - the gradient sync: from the moment this rank's last gradient is accumulated (a post-accumulate-grad
    hook: it has arrived at the all-reduce) to the start of the optimizer step (a step pre-hook: backward
    returned, the all-reduce is done). On CUDA the two points are CUDA events on the training stream,
    read at the epoch's end after the loop's own synchronize.
  - the buffer broadcast of DDP's forward (BatchNorm statistics, on CPU): from the DDP wrapper's forward
    pre-hook to the wrapped network's.
busy = this rank's training seconds of the epoch (the epoch clock) - these waits. Waits elsewhere (the stop
check every preempt.check_every_steps steps) are not subtracted: they make the ranks look more alike.
One process: nothing is hooked and nothing gathered.
"""

from __future__ import annotations

import socket
import statistics
import time

import torch
from accelerate.utils import gather_object


class NoStepTimes:
    """One process: no one to wait for, nothing to compare."""

    def end_epoch(self, run, seconds: float) -> None:
        return None

    def close(self) -> None:
        pass


def step_times(run):
    """(all ranks) The step-time watcher of a multi-process run, else one that does nothing."""
    return StepTimes(run) if run.accelerator.num_processes > 1 else NoStepTimes()


class StepTimes:
    """(all ranks) Waits of this rank in the current epoch; end_epoch gathers every rank's busy time."""

    def __init__(self, run):
        accelerator = run.accelerator
        self.cuda = accelerator.device.type == "cuda"
        self.ratio_limit = run.cfg.dist.straggler_ratio
        self.hosts = gather_object([socket.gethostname()])  # (all ranks) once: who runs where
        self.wait = 0.0  # host seconds waited in this epoch (CPU)
        self.events: list[tuple] = []  # (arrived, left) CUDA event pairs of this epoch
        self.steps = 0  # optimizer steps in this epoch
        self.totals = [[0.0, 0.0, 0.0] for _ in self.hosts]  # every rank's busy s, wait s and steps (this attempt)
        self._arrived = self._called = None
        self._order: list[int] = []  # parameter ids in the order backward finishes them (the first step)
        self._last: int | None = None  # id of the parameter whose gradient comes last
        params = [p for p in run.state.net.parameters() if p.requires_grad]
        self.handles = [p.register_post_accumulate_grad_hook(self._gradient) for p in params]
        inner = getattr(run.state.optimizer, "optimizer", run.state.optimizer)  # Accelerate's wrapper holds torch's
        self.handles.append(inner.register_step_pre_hook(self._stepping))
        if not self.cuda and run.model is not run.state.net and not run.cfg.model.compile:
            self.handles.append(run.model.register_forward_pre_hook(self._forward_called))
            self.handles.append(run.state.net.register_forward_pre_hook(self._forward_entered))

    # ---- hooks (this rank, every micro-step): a clock reading or an event record each ----
    def _gradient(self, param) -> None:
        if self._last is None:
            self._order.append(id(param))
        elif id(param) != self._last:
            return
        if self.cuda:
            self._arrived = torch.cuda.Event(enable_timing=True)
            self._arrived.record()
        else:
            self._arrived = time.perf_counter()

    def _stepping(self, optimizer, args, kwargs) -> None:
        if self._last is None and self._order:
            self._last = self._order[-1]  # learnt from the first step: the same graph every step
        if self._arrived is not None:
            if self.cuda:
                left = torch.cuda.Event(enable_timing=True)
                left.record()
                self.events.append((self._arrived, left))
            else:
                self.wait += time.perf_counter() - self._arrived
        self._arrived = None
        self.steps += 1

    def _forward_called(self, module, args) -> None:
        self._called = time.perf_counter()

    def _forward_entered(self, module, args) -> None:
        if self._called is not None:
            self.wait += time.perf_counter() - self._called
            self._called = None

    # ---- at the epoch's end (all ranks: one gather) ----
    def end_epoch(self, run, seconds: float) -> dict | None:
        """(all ranks) Gather every rank's busy and wait seconds of the epoch just trained (`seconds`: this
        rank's training time in it); the main process names a rank above the ratio. Returns the run's stats."""
        wait = self.wait + sum(a.elapsed_time(b) for a, b in self.events) / 1000  # the loop synchronized already
        mine = torch.tensor([max(seconds - wait, 0.0), wait, float(self.steps)], dtype=torch.float64,
                            device=run.accelerator.device)
        every = run.accelerator.gather(mine).view(-1, 3).cpu().tolist()
        self.wait, self.events, self.steps = 0.0, [], 0
        self.totals = [[t + e for t, e in zip(total, new)] for total, new in zip(self.totals, every)]
        if not every[0][2]:
            return self.run_stats()  # no step in this epoch (resumed at its end)
        epoch = per_step(every, self.hosts, self.ratio_limit)
        if epoch["straggler"]:
            run.log.print(straggler_line(epoch, run.progress.epoch + 1))
        return self.run_stats()

    def run_stats(self) -> dict | None:
        """results.json's per-rank step times: every epoch of this attempt together."""
        return per_step(self.totals, self.hosts, self.ratio_limit) if self.totals[0][2] else None

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def per_step(rows: list[list[float]], hosts: list[str], ratio_limit: float) -> dict:
    """From every rank's [busy seconds, wait seconds, steps]: seconds per step, the median, and the
    slowest rank with its ratio to the median."""
    busy, wait = [b / max(n, 1) for b, _, n in rows], [w / max(n, 1) for _, w, n in rows]
    median = statistics.median(busy)
    slowest = max(range(len(busy)), key=busy.__getitem__)
    ratio = busy[slowest] / median if median > 0 else 1.0
    return {"steps": int(rows[0][2]), "busy_seconds_per_step": [round(b, 6) for b in busy], "wait_seconds_per_step": [round(w, 6) for w in wait],
            "median_busy_seconds_per_step": round(median, 6), "slowest_rank": slowest, "slowest_host": hosts[slowest],
            "slowest_to_median": round(ratio, 3), "straggler_ratio": ratio_limit, "straggler": ratio > ratio_limit}


def straggler_line(stats: dict, epoch: int) -> str:
    rank, busy = stats["slowest_rank"], stats["busy_seconds_per_step"]
    return (f"straggler: rank {rank} on {stats['slowest_host']} is {stats['slowest_to_median']:.2f}x the median busy "
            f"time per step in epoch {epoch} ({1000 * busy[rank]:.1f} ms against {1000 * stats['median_busy_seconds_per_step']:.1f} ms; "
            f"the others wait for it in the all-reduce)")
