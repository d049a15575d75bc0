"""Train one config over several seeds in one process and report accuracy as mean ± spread.

    python -m dist_cifar.sweep --config configs/airbench94.yaml --seeds 0-4 --out runs/sweep [key=value ...]

Each seed is a normal run in OUT/seed-N (one process: for several processes launch the trainer
itself once per seed). OUT/summary.json holds every run's accuracy and timing and their statistics.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dist_cifar import train


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return seeds


def reset_accelerate() -> None:
    """Forget the previous run's Accelerator so the next one starts clean in this process.

    Private calls on purpose: Accelerate keeps its state in process-wide singletons (AcceleratorState,
    PartialState, GradientState) and has no public call that resets them; Accelerator.free_memory()
    drops models and optimizers but keeps that state (a gradient-sync flag, dataloader references,
    the first run's precision). Accelerate's own tests do exactly this between runs
    (accelerate/test_utils/testing.py, AccelerateTestCase.tearDown), so each seed starts as a fresh
    process would. test_commands.py's sweep test runs two seeds through it.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def stats(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "median": statistics.median(values), "n": len(values)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dist-cifar-sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", default="0-4", help="e.g. 0-4 or 0,3,7")
    parser.add_argument("--out", required=True, help="folder for the runs and summary.json (must not exist)")
    parser.add_argument("--warmup-epochs", type=int, default=0,
                        help="first train this many epochs once, uncounted (GPU kernels and caches warm up)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError:
        print(f"dist_cifar: error: --seeds {args.seeds!r} is not like 0-4 or 0,3,7", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists():
        print(f"dist_cifar: error: {out} already exists: choose a new --out", file=sys.stderr)
        return 2
    base = ["--config", args.config, *args.overrides]
    if args.warmup_epochs:
        code = train.main(base + ["tracking.plots=false", f"train.epochs={args.warmup_epochs}",
                                  f"output_dir={out / 'warmup'}"])
        reset_accelerate()
        if code:
            return code
    runs = []
    for seed in seeds:
        started = time.time()
        code = train.main(base + [f"seed={seed}", f"output_dir={out / f'seed-{seed}'}"])
        reset_accelerate()
        if code:  # the run has said why on stderr, in its one line
            print(f"sweep stopped: seed {seed} failed (exit {code}); the runs of the seeds before it are in {out}")
            return code
        result = json.loads((out / f"seed-{seed}" / "results.json").read_text())
        runs.append({"seed": seed, "accuracy": result["accuracy"], "train_seconds": result["train_seconds"],
                     "target_reached_train_seconds": result.get("target_reached_train_seconds"),
                     "wall_seconds": round(time.time() - started, 3), "device": result["device"],
                     "mixed_precision": result["mixed_precision"]})
    summary = {"config": args.config, "overrides": args.overrides, "seeds": seeds, "runs": runs,
               "accuracy": stats([r["accuracy"] for r in runs]),
               "train_seconds": stats([r["train_seconds"] for r in runs]),
               "versions": json.loads((out / f"seed-{seeds[0]}" / "results.json").read_text())["versions"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    acc, secs = summary["accuracy"], summary["train_seconds"]
    print(f"{len(runs)} seeds {args.seeds}: accuracy {100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} % "
          f"(min {100 * acc['min']:.2f}, max {100 * acc['max']:.2f}); train seconds median {secs['median']:.2f}")
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
