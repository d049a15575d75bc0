"""(all ranks) torch.profiler on demand (profile.enabled): one window of optimizer steps on every rank, a
Chrome trace per rank in run_dir/profile/ (chrome://tracing, ui.perfetto.dev), and a summary the main
process prints: per rank, host time, device time (CUDA) and collective time per step, and the main
process's top operations by self time.

Off (the default) the loop holds a NoProfiler whose step() does nothing: no profiler object, no hooks.
The window is counted in optimizer steps from the start of this process (a resumed run counts from its
resume point) and may include an evaluation when it spans an epoch's end.
"""

from __future__ import annotations

from pathlib import Path

from accelerate.utils import gather_object

# Op names of collectives in either backend's trace: gloo:all_reduce, nccl:all_reduce, c10d::allreduce_,
# record_param_comms (the c10d wrapper), and the NCCL kernels on the device (ncclDevKernel_AllReduce...).
COLLECTIVE_MARKS = ("all_reduce", "allreduce", "broadcast", "all_gather", "allgather", "reduce_scatter",
                    "record_param_comms")


class NoProfiler:
    """profile.enabled=false: what the loop steps."""

    def step(self) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


def step_profiler(run):
    """(all ranks) The configured profiler, or a NoProfiler."""
    return StepProfiler(run) if run.cfg.profile.enabled else NoProfiler()


class StepProfiler:
    """(all ranks) torch.profiler over wait/warmup/active optimizer steps; step() at every step's end."""

    def __init__(self, run):
        import os

        import torch.profiler as tp

        if run.accelerator.device.type != "cuda":
            # torch 2.14's Kineto logs "ERROR: ... gpuGetDeviceCount failed" on every machine without a GPU
            # (2026-12-02); its level is read when the profiler first starts. A user's own setting wins.
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        cfg = run.cfg.profile
        self.run, self.cfg, self.failed, self.done = run, cfg, False, False
        self.rank = run.accelerator.process_index
        self.folder = Path(run.run_dir) / "profile"
        self.cuda = run.accelerator.device.type == "cuda"
        activities = [tp.ProfilerActivity.CPU] + ([tp.ProfilerActivity.CUDA] if self.cuda else [])
        self.window = cfg.wait_steps + cfg.warmup_steps + cfg.active_steps
        self.prof = tp.profile(activities=activities, profile_memory=cfg.memory, with_stack=cfg.with_stack,
                               schedule=tp.schedule(wait=cfg.wait_steps, warmup=cfg.warmup_steps,
                                                    active=cfg.active_steps, repeat=1),
                               on_trace_ready=self._ready)
        self.prof.start()
        self.steps = 0
        run.log.print(f"profile: steps {cfg.wait_steps + cfg.warmup_steps + 1}-{self.window} of this process "
                      f"(after {cfg.wait_steps} unprofiled and {cfg.warmup_steps} warm-up steps), "
                      f"traces in {self.folder}")

    def step(self) -> None:
        """(all ranks, every optimizer step) The profiler's step boundary; nothing once the window is written."""
        if self.done:
            return
        self.steps += 1
        self.prof.step()

    def close(self, failed: bool = False) -> None:
        """(all ranks) Stop; a window cut short by the run's end is written with the steps it has. On a
        failure (`failed`) each rank writes its trace and nothing is gathered."""
        if self.done:
            return
        self.failed = failed
        if self.steps <= self.cfg.wait_steps + self.cfg.warmup_steps and not failed:
            self.run.log.warn(f"profile: the run ended after {self.steps} steps, before the profiled window "
                              f"(profile.wait_steps + warmup_steps = {self.cfg.wait_steps + self.cfg.warmup_steps}): "
                              f"no trace written")
        self.prof.stop()
        self.done = True

    def _ready(self, prof) -> None:
        """(all ranks, once) Write this rank's trace; gather every rank's summary; the main process prints it."""
        self.done = True
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"rank{self.rank}.json"
        prof.export_chrome_trace(str(path))
        mine = summarize(prof.key_averages(), self.cuda, self.cfg.top_ops)
        mine["trace"] = str(path)
        if self.failed:
            return
        every = gather_object([mine])  # (all ranks) at the same step everywhere: the schedule is the same
        self.run.log.write_json("profile_summary.json", {"ranks": every})  # beside profile/, which holds only traces
        self.run.log.print(summary_text(every, self.cuda))


def _device_us(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0) or 0.0


def summarize(averages, cuda: bool, top: int) -> dict:
    """One rank's numbers per profiled step (milliseconds) from prof.key_averages()."""
    step_events = [e for e in averages if e.key.startswith("ProfilerStep")]
    steps = sum(e.count for e in step_events) or 1
    host_us = sum(e.cpu_time_total for e in step_events)
    ops = [e for e in averages if not e.key.startswith("ProfilerStep")]
    collective = [e for e in ops if any(m in e.key.lower() for m in COLLECTIVE_MARKS)]
    out = {"steps": steps, "host_ms_per_step": host_us / steps / 1000,
           # CPU: the collectives' own time (gloo's work on its threads, and the wait for it); CUDA: their kernels
           "collective_ms_per_step": sum(_device_us(e) if cuda else e.cpu_time_total for e in collective) / steps / 1000,
           "top_ops": [{"op": e.key, "self_host_ms_per_step": e.self_cpu_time_total / steps / 1000,
                        "self_device_ms_per_step": _device_us(e) / steps / 1000, "calls_per_step": e.count / steps}
                       for e in sorted(ops, key=lambda e: (_device_us(e) if cuda else e.self_cpu_time_total),
                                       reverse=True)[:top]]}
    if cuda:
        out["device_ms_per_step"] = sum(_device_us(e) for e in ops) / steps / 1000
    return out


def summary_text(every: list[dict], cuda: bool) -> str:
    """The printed summary: a line per rank, then the main process's top operations."""
    main = every[0]
    lines = [f"profile: {main['steps']} steps per rank (traces: {Path(main['trace']).parent})",
             "  rank  host ms/step" + ("  device ms/step" if cuda else "") + "  collective ms/step"]
    for rank, s in enumerate(every):
        device = f"  {s['device_ms_per_step']:14.2f}" if cuda else ""
        lines.append(f"  {rank:4d}  {s['host_ms_per_step']:12.2f}{device}  {s['collective_ms_per_step']:18.2f}")
    what = "device" if cuda else "host"
    total = main["device_ms_per_step" if cuda else "host_ms_per_step"] or 1.0
    lines.append(f"  top operations on rank 0 by self {what} time (ms per step, % of the step's {what} time):")
    for op in main["top_ops"]:
        ms = op[f"self_{what}_ms_per_step"]
        lines.append(f"    {ms:8.3f}  {100 * ms / total:5.1f} %  {op['calls_per_step']:6.1f} calls  {op['op']}")
    return "\n".join(lines)
