"""Benchmark: dist_cifar against the PyTorch tutorial's own loop and the bare model step, side by side.

`python -m dist_cifar.bench [--steps 3000] [--repeats 3] [--time-to-accuracy] [--imagefolder-baseline] [--out FILE] [--quick]`
(`python -m dist_cifar.bench --gpu ...`: the GPU peer benchmark, dist_cifar/bench/gpu.py)

Every measurement runs in its own child process, so each one pays its own start-up and has its own
peak memory; the measurements are interleaved (A, B, C, A, B, C, ...) so a busy machine slows them
alike, and each is reported as the median of its repeats with the min and max beside it.

What each rate includes:
- tutorial: the tutorial's loop as the tutorial runs it on torchvision.datasets.CIFAR10: the decoded
  uint8 images held in memory (`TutorialCIFAR10`, whose `.data`, `.targets` and `__getitem__`
  (Image.fromarray + transform) are torchvision CIFAR10's), ToTensor + Normalize(0.5, 0.5), DataLoader
  batch 4, shuffled, 2 workers, the tutorial's Net, SGD lr 0.001 momentum 0.9, loss.item() every
  step, torch's default thread count. The arrays come from dist_cifar's decoded-image cache
  (dist_cifar.data.sources.load_dataset), as torchvision's CIFAR10 loads its decoded pickles once. Timed from
  the end of step --warmup to the end of the last step: building the dataset, worker start-up and
  the first batches are excluded (`images_per_second_with_startup` counts the loader's start-up and
  first batches, not the dataset's construction, which `dataset_seconds` reports). Its periodic loss
  print is left out.
- tutorial_imagefolder (only with --imagefolder-baseline; NOT the tutorial and in no ratio or
  target): the same loop, timed the same way, on torchvision.datasets.ImageFolder over the JPEG files,
  which decodes every image every epoch: the baseline this benchmark used before, kept to show what
  the decoding cost. Its rate only (no 2-epoch run).
- dist_cifar: `train_images_per_second` from results.json of `python -m dist_cifar.train --config
  configs/tutorial.yaml train.max_steps=N`: the training loop only, its first step included; data
  loading, evaluation and checkpoints are outside it.
- bare step: forward + backward + SGD step on one batch already in memory, with the thread count
  the trainer uses for batch 4; timed after --warmup steps. The ceiling for this model and batch.
With --time-to-accuracy, both sides are timed from the moment the parent launches the process, so
both pay interpreter start-up, imports and loading the decoded images from the same cache:
- time_to_accuracy: --tta-config until the first evaluation at or above --target-accuracy
  (its metrics.jsonl wall time minus the launch time);
- tutorial_2_epochs: the tutorial script from launch to exit: building its two datasets (the
  counterpart of torchvision's CIFAR10 constructors), 2 epochs, accuracy on the 10,000 test images.
Peak memory: `peak_rss_mb` is the kernel's peak RSS of the largest process of the child's tree
(wait4); `peak_pss_all_mb` is the peak of the summed PSS of the child and its children (DataLoader
workers), sampled every 0.5 s, so pages the workers share with the main process count once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from dist_cifar.bench.common import (REPO, BenchError, add_data_argument, machine_info, prepare_cache, run_child,
                                     run_trainer, run_watched, shown, spread, targets_table)
from dist_cifar.bench.loops import BATCH, TUTORIAL_EPOCHS

TARGET_VS_BARE = 0.9  # dist_cifar images/s >= this x the bare step's
TARGET_TTA_FRACTION = 1 / 20  # time to the target accuracy <= this x the tutorial's 2-epoch wall time
TARGET_PEAK_RSS_MB = 1500  # peak RSS of a single-process full-CIFAR run (1.5 GB, 10^6 bytes per MB)

def measure_tutorial(args, work: Path, tag: str) -> dict:
    return run_child("tutorial", args, work, tag, steps=args.steps, warmup=args.warmup, source="cifar10")


def prepare_script_data(data: Path, folder: Path) -> None:
    """The reference script's decoded arrays (its CIFAR_NPZ cache), written once from dist_cifar's decoded
    cache: the same images the tutorial row trains on, and no JPEG decoding inside any timed run."""
    import numpy as np

    from dist_cifar.bench.loops import decoded_cache_config
    from dist_cifar.data.sources import load_dataset

    decoded = load_dataset(decoded_cache_config(data))
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        part = getattr(decoded, split)
        np.savez(folder / f"{split}.npz", x=np.asarray(part.images), y=np.asarray(part.labels, dtype=np.int64))


def measure_tutorial_script(args, work: Path, tag: str) -> dict:
    """The PyTorch tutorial's own script as a user runs it (args.tutorial_script: a fresh interpreter, its
    own DataLoader, torch's defaults), for warmup + steps steps; it times all of them, DataLoader start
    included, which the tutorial row reports as images_per_second_with_startup."""
    env = {**os.environ, "CIFAR_NPZ": str(work / "script-data"), "CIFAR_JPEG": str(args.data)}
    log = work / f"{tag}.log"
    watched = run_watched([sys.executable, str(args.tutorial_script), "1", str(args.warmup + args.steps)], log, env=env)
    printed = log.read_text().split()
    value = {printed[i]: float(printed[i + 1]) for i in range(len(printed) - 1) if printed[i] in ("images_per_second",)}
    return {"images_per_second": value["images_per_second"], "images_per_second_with_startup": value["images_per_second"],
            **watched}


def measure_tutorial_imagefolder(args, work: Path, tag: str) -> dict:
    return run_child("tutorial", args, work, tag, steps=args.steps, warmup=args.warmup, source="imagefolder")


def measure_dist_cifar(args, work: Path, tag: str) -> dict:
    watched, results, _ = run_trainer(REPO / "configs" / "tutorial.yaml", args, work, tag, f"train.max_steps={args.steps}")
    return {"images_per_second": results["train_images_per_second"], "train_seconds": results["train_seconds"],
            "steps": results["steps"], "accuracy": results["accuracy"], **watched}


def measure_bare(args, work: Path, tag: str) -> dict:
    return run_child("bare", args, work, tag, steps=args.steps, warmup=args.warmup)


def measure_time_to_accuracy(args, work: Path, tag: str) -> dict:
    watched, results, metrics = run_trainer(args.tta_config, args, work, tag,
                                            f"train.target_accuracy={args.target_accuracy}")
    reached = next((m for m in metrics if (m["test_accuracy"] or 0) >= args.target_accuracy), None)
    return {"seconds_to_target": reached["wall_time"] - watched["launched"] if reached else None,
            "epochs_to_target": reached["epoch"] if reached else None, "accuracy": results["accuracy"], **watched}


def measure_tutorial_epochs(args, work: Path, tag: str) -> dict:
    return run_child("tutorial-epochs", args, work, tag, epochs=TUTORIAL_EPOCHS, source="cifar10")


# ---- medians, ratios, targets ----

def summarize(runs: list[dict]) -> dict:
    keys = ("images_per_second", "images_per_second_with_startup", "peak_rss_mb", "peak_pss_all_mb", "wall_seconds", "seconds_to_target", "accuracy",
            "dataset_seconds")
    out = {}
    for name in dict.fromkeys(r["measurement"] for r in runs):
        mine = [r for r in runs if r["measurement"] == name]
        out[name] = {k: spread([r.get(k) for r in mine]) for k in keys if any(k in r for r in mine)}
    return out


def median(summary: dict, name: str, key: str):
    return (summary.get(name, {}).get(key) or {}).get("median")


def ratios(summary: dict) -> dict:
    """The headline ratios, of medians: the tutorial is the in-memory loop (never the ImageFolder one)."""
    dist, tut, bare = (median(summary, n, "images_per_second") for n in ("dist_cifar", "tutorial", "bare_step"))
    out = {"dist_cifar_over_tutorial": dist / tut, "dist_cifar_over_bare_step": dist / bare}
    script = median(summary, "tutorial_script", "images_per_second")
    if script:  # the honest peer: the tutorial as a user runs it, timed over the same window as the row
        out["tutorial_row_over_script"] = median(summary, "tutorial", "images_per_second_with_startup") / script
        out["dist_cifar_over_tutorial_script"] = dist / script
    return out


def imagefolder_comparison(summary: dict) -> dict | None:
    """(--imagefolder-baseline) How the old ImageFolder loop compares with the tutorial's in-memory one."""
    if "tutorial_imagefolder" not in summary:
        return None
    return {"tutorial_over_tutorial_imagefolder_images_per_second":
            median(summary, "tutorial", "images_per_second") / median(summary, "tutorial_imagefolder", "images_per_second")}


def targets(summary: dict, ratio: dict) -> list[dict]:
    tta, tutorial_wall = median(summary, "time_to_accuracy", "seconds_to_target"), median(
        summary, "tutorial_2_epochs", "wall_seconds")
    single = [s["peak_rss_mb"]["max"] for n, s in summary.items() if n in ("dist_cifar", "time_to_accuracy")]
    rows = [("dist_cifar images/s / bare step images/s", ratio["dist_cifar_over_bare_step"], ">=", TARGET_VS_BARE),
            ("time to target accuracy / tutorial 2-epoch wall time", tta / tutorial_wall if tta and tutorial_wall
             else None, "<=", TARGET_TTA_FRACTION),
            ("peak RSS MB of a single-process full-CIFAR dist_cifar run (max)", max(single), "<=", TARGET_PEAK_RSS_MB)]
    return [{"target": name, "value": value, "limit": f"{op} {limit:g}",
             "met": None if value is None else (value >= limit if op == ">=" else value <= limit)}
            for name, value, op, limit in rows]


# ---- the report ----

def table(result: dict) -> str:
    m, st, s = result["machine"], result["settings"], result["summary"]
    loads = [r["load_average_1min"] for r in result["runs"]]
    lines = [f"### dist_cifar bench: {m['cpu_model']}, {m['usable_cores']} cores, torch {m['torch']}, "
             f"accelerate {m['accelerate']}, {m['time']}",
             f"{st['steps']} steps of batch {BATCH}; median (min-max) of {st['repeats']} interleaved runs; "
             f"1-min load average at launches {min(loads):.1f}-{max(loads):.1f}", "",
             "| measurement | images/s | peak RSS MB (largest process) | peak PSS MB (all processes) |",
             "|---|---|---|---|"]
    names = {"tutorial_script": "the tutorial's own script, run as a user runs it (DataLoader start included)",
             "tutorial": "tutorial loop (CIFAR10-style uint8 arrays in memory, DataLoader 2 workers)",
             "tutorial_imagefolder": "not the tutorial: same loop on ImageFolder JPEGs, decoded every epoch (no ratio)",
             "dist_cifar": "dist_cifar configs/tutorial.yaml", "bare_step": "bare step (one ready batch)"}
    threads = {r["measurement"]: r.get("torch_threads") for r in result["runs"]}
    for name, label in names.items():
        if name not in s:
            continue
        t = f", {threads[name]} thread(s)" if threads.get(name) else ""
        lines.append(f"| {label}{t} | {shown(s[name]['images_per_second'])} | {shown(s[name]['peak_rss_mb'])} "
                     f"| {shown(s[name]['peak_pss_all_mb'])} |")
    r = result["ratios"]
    lines += ["", f"dist_cifar / tutorial: **{r['dist_cifar_over_tutorial']:.2f}x**; "
                  f"dist_cifar / bare step: **{r['dist_cifar_over_bare_step']:.2f}**"]
    if "tutorial_row_over_script" in r:
        lines += [f"tutorial row (with its start) / the tutorial's script: **{r['tutorial_row_over_script']:.2f}x**; "
                  f"dist_cifar / the tutorial's script: **{r['dist_cifar_over_tutorial_script']:.2f}x**"]
    if "time_to_accuracy" in s:
        t, w = s["time_to_accuracy"], s["tutorial_2_epochs"]
        lines += ["", "| run | wall s from launch | test accuracy | peak RSS MB |", "|---|---|---|---|",
                  f"| {Path(st['tta_config']).name} to {100 * st['target_accuracy']:.0f} % | "
                  f"{shown(t['seconds_to_target'], 1)} | {shown(t['accuracy'], 4)} | {shown(t['peak_rss_mb'])} |",
                  f"| tutorial, {TUTORIAL_EPOCHS} epochs + 10k test | {shown(w['wall_seconds'], 1)} | "
                  f"{shown(w['accuracy'], 4)} | {shown(w['peak_rss_mb'])} |"]
    if result.get("imagefolder_comparison"):
        c = result["imagefolder_comparison"]
        lines += ["", f"tutorial (in memory) / ImageFolder loop, images/s: "
                      f"{c['tutorial_over_tutorial_imagefolder_images_per_second']:.2f}x"]
    return "\n".join(lines + targets_table(result["targets"]))


# ---- entry point ----

def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="dist-cifar-bench", description=__doc__.splitlines()[0])
    add_data_argument(parser)
    parser.add_argument("--steps", type=int, help="timed training steps of batch 4 per run (default 3000; 300 with --quick)")
    parser.add_argument("--warmup", type=int, help="untimed steps before the tutorial and bare-step timing (default 50)")
    parser.add_argument("--repeats", type=int, help="runs of each measurement, interleaved (default 3; 1 with --quick)")
    parser.add_argument("--time-to-accuracy", action="store_true",
                        help="also time --tta-config to --target-accuracy and the tutorial's full 2 epochs")
    parser.add_argument("--tta-config", type=Path, default=REPO / "configs" / "cpu_fast.yaml")
    parser.add_argument("--target-accuracy", type=float, default=0.56)
    parser.add_argument("--out", type=Path, help="JSON results (default bench-results/bench-<timestamp>.json)")
    parser.add_argument("--imagefolder-baseline", action="store_true",
                        help="also time the tutorial's loop on ImageFolder JPEGs (decoded every epoch), labelled "
                             "tutorial_imagefolder and kept out of the ratios and targets (its rate only)")
    parser.add_argument("--tutorial-script", type=Path, default=REPO.parent / "shared" / "reference" / "tutorial_cifar10.py",
                        help="the tutorial's own script, timed beside the rows when it exists (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a short check: 300 steps, 20 warm-up, 1 repeat")
    parser.add_argument("--gpu", action="store_true",
                        help="the GPU peer benchmark instead (dist_cifar.bench.gpu: airbench94 and the tutorial's "
                             "loop on one GPU beside dist_cifar); `--gpu --help` lists its options")
    args = parser.parse_args(argv)
    args.steps = args.steps or (300 if args.quick else 3000)
    args.warmup = args.warmup or (20 if args.quick else 50)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.data = args.data.expanduser().resolve()
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--gpu" in argv:
        from dist_cifar.bench import gpu as bench_gpu

        return bench_gpu.main([a for a in argv if a != "--gpu"])
    args = parse_args(argv)
    if not (args.data / "train").is_dir():
        print(f"dist-cifar-bench: no image folder at {args.data} (pass --data DIR)", file=sys.stderr)
        return 2
    if args.time_to_accuracy and not args.tta_config.is_file():
        print(f"dist-cifar-bench: --time-to-accuracy needs {args.tta_config} (or pass --tta-config)", file=sys.stderr)
        return 2
    out = args.out or Path("bench-results") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    measurements = {"tutorial": measure_tutorial}
    if args.tutorial_script.is_file():
        measurements["tutorial_script"] = measure_tutorial_script
    if args.imagefolder_baseline:
        measurements["tutorial_imagefolder"] = measure_tutorial_imagefolder
    measurements.update(dist_cifar=measure_dist_cifar, bare_step=measure_bare)
    if args.time_to_accuracy:
        measurements.update(time_to_accuracy=measure_time_to_accuracy, tutorial_2_epochs=measure_tutorial_epochs)
    settings = {"data": str(args.data), "steps": args.steps, "warmup_steps": args.warmup, "repeats": args.repeats,
                "batch_size": BATCH, "time_to_accuracy": args.time_to_accuracy, "tta_config": str(args.tta_config),
                "target_accuracy": args.target_accuracy, "imagefolder_baseline": args.imagefolder_baseline,
                "tutorial_dataset": "TutorialCIFAR10 (torchvision CIFAR10's data layout and __getitem__, "
                                    "arrays from dist_cifar's decoded cache)", "command": sys.argv,
                "tutorial_script": str(args.tutorial_script) if args.tutorial_script.is_file() else None}
    print(f"dist-cifar-bench: preparing the decoded-image cache for {args.data}", flush=True)
    settings["cache_seconds"] = prepare_cache(args.data)
    runs = []
    try:
        with tempfile.TemporaryDirectory(prefix="dist-cifar-bench-") as tmp:
            for repeat in range(args.repeats):
                if "tutorial_script" in measurements:
                    prepare_script_data(args.data, Path(tmp) / "script-data")
                for name, measure in measurements.items():
                    print(f"dist-cifar-bench: run {repeat + 1}/{args.repeats}: {name}", flush=True)
                    runs.append({"measurement": name, "repeat": repeat, **measure(args, Path(tmp), f"{name}-{repeat}")})
    except BenchError as err:
        print(f"dist-cifar-bench: {err}", file=sys.stderr)
        return 1
    summary = summarize(runs)
    ratio = ratios(summary)
    result = {"machine": machine_info(), "settings": settings, "summary": summary, "ratios": ratio,
              "targets": targets(summary, ratio), "imagefolder_comparison": imagefolder_comparison(summary), "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"\nresults in {out}")
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
