"""(all ranks) A training job from a config: the Accelerator, the run folder held, the resume decision,
then setup and the loop."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from accelerate.utils import broadcast_object_list

from dist_cifar.config import Config
from dist_cifar.dist.accelerator import build_accelerator
from dist_cifar.engine.loop import train_loop
from dist_cifar.engine.run import FINISHED_BECAUSE, batch_sizes
from dist_cifar.engine.setup import setup
from dist_cifar.errors import RunError
from dist_cifar.observe.log import MainLog, NullLog
from dist_cifar.observe.tracking import accelerator_kwargs
from dist_cifar.state.resume import check_resumable, find_resume_point, finished_reason
from dist_cifar.state.rundir import RunLock, check_output_dir


def train(cfg: Config, name: str = "run") -> int:
    """Train `cfg` to its end; 0 when done. `name` names the default run folder (the config file's stem)."""
    started = time.time()
    batch, _ = batch_sizes(cfg.train, int(os.environ.get("WORLD_SIZE", "1")))  # a bad batch: before any work
    main_rank = int(os.environ.get("RANK", "0")) == 0
    accelerator, info = build_accelerator(cfg, warn=lambda m: print(f"dist_cifar: warning: {m}", file=sys.stderr)
                                          if main_rank else None, batch_size=batch, **accelerator_kwargs(cfg))
    # ---- the run folder: usable, and this run's alone (the main process checks and locks; all ranks agree) ----
    run_dir = Path(broadcast_object_list([cfg.output_dir or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"])[0])
    cfg.output_dir = str(run_dir)  # what config.yaml and the checkpoints record
    lock = RunLock(run_dir)
    problem = (check_output_dir(run_dir) or lock.acquire()) if accelerator.is_main_process else None
    problem = broadcast_object_list([problem])[0]
    if problem:
        raise RunError(problem)
    try:
        log = MainLog(run_dir) if accelerator.is_main_process else NullLog(run_dir)
        resumed = find_resume_point(cfg, run_dir, log)
        if resumed and already_done(resumed, cfg, run_dir, accelerator, log):
            return 0
        run = setup(cfg, accelerator, info, run_dir, log, resumed)
        run.started = started
        return train_loop(run)
    finally:
        lock.release()


def already_done(resumed, cfg: Config, run_dir: Path, accelerator, log) -> bool:
    """(all ranks) True when `resumed` is the last checkpoint of a finished run whose results are written:
    said in one line, nothing rewritten. A finished run killed before its results were written goes on
    to write them; one asked for more epochs or steps is refused (CheckpointError)."""
    reason = finished_reason(resumed, cfg)  # refuses more epochs or steps, saying how
    # Then the refusals of any resume: a finished run is not "done" for another config.
    check_resumable(resumed, cfg, resumed.meta["classes"], batch_sizes(cfg.train, accelerator.num_processes)[1])
    written = all((run_dir / f).is_file() for f in ("results.json", "model.safetensors"))
    done = broadcast_object_list([bool(reason) and written if accelerator.is_main_process else None])[0]
    if done:
        progress = resumed.progress
        log.print(f"dist_cifar: the run in {run_dir} is finished: it {FINISHED_BECAUSE[reason]} at epoch "
                  f"{progress.epoch}, step {progress.step}; nothing to do (results in {run_dir / 'results.json'})")
    return done
