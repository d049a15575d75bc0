"""The training job: `accelerate launch dist_cifar/train.py --config configs/X.yaml [key.sub=value ...]`.

Also runs as `python dist_cifar/train.py`, `python -m dist_cifar.train`, `torchrun ... dist_cifar/train.py`
and the `dist-cifar-train` console script. One process on the CPU is the fallback; N processes form one
data-parallel group (gloo on CPUs, NCCL on GPUs). The run itself is dist_cifar/engine/ (job.py first).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the package importable without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dist_cifar.config import ConfigError, dump_yaml, load_config  # noqa: E402  (no torch: --print-config is quick)
from dist_cifar.dist.exit import run_and_leave, run_in_group  # noqa: E402  (no torch either)
from dist_cifar.errors import CheckpointError, DataError, RunError  # noqa: E402


def set_process_defaults() -> None:
    """Defaults a trainer process needs before torch loads; the entry points call it, imports never do.

    OMP_WAIT_POLICY=PASSIVE: torch's OpenMP threads sleep as soon as they wait instead of spinning first.
    On cores shared with other work (other ranks, other jobs) a spinning thread holds a core its partner
    needs: configs/cpu_fast.yaml (2 threads, batch 128) trained about 2x faster beside one busy process
    with it, and at the same speed on idle cores (docs/benchmarks.md). OpenMP reads it once, when torch
    loads it; a value already in the environment wins.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="dist-cifar-train", description="Train an image classifier, on one CPU or many processes.")
    parser.add_argument("--config", help="YAML run config (configs/*.yaml); defaults apply without one")
    parser.add_argument("--print-config", action="store_true",
                        help="print every config key with its resolved value (YAML) and exit without training")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Train as the command line says; the exit code (0 done, 1 error, 2 config error, 75 preempted)."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"dist_cifar: config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    from dist_cifar.dist.preempt import PREEMPTED_EXIT_CODE
    from dist_cifar.engine.job import train
    from dist_cifar.engine.loop import Preempted

    def work() -> int:
        try:
            return train(cfg, Path(args.config).stem if args.config else "run")
        except ConfigError as err:
            print(f"dist_cifar: config error: {err}", file=sys.stderr)
            return 2
        except (DataError, CheckpointError, RunError) as err:
            print(f"dist_cifar: error: {err}", file=sys.stderr)
            return 1
        except Preempted:
            return PREEMPTED_EXIT_CODE
    return run_in_group(work)


def cli() -> None:
    set_process_defaults()
    run_and_leave(main)


if __name__ == "__main__":
    cli()
