"""GPU peer benchmark: airbench94 and the tutorial's loop beside dist_cifar's recipes for them, on one GPU."""

# `python -m dist_cifar.bench --gpu [--quick] [--repeats N] [--out FILE] [--data DIR] [--work DIR]`
#
# Every measurement is a child process of its own, launched and watched by dist_cifar.bench's
# run_watched (its wall time from launch), the rows interleaved (A, B, C, D, A, B, ...):
# - airbench94: the `airbench` package (the `bench` extra) unchanged: train94(verbose=False) timed whole
#   (net build, whitening, training) after an untimed 1-epoch warm-up run, then evaluate(tta_level=2).
#   It reads cifar10/{train,test}.pt, written once here from dist_cifar's decoded-image cache.
# - dist_cifar_airbench94: `python -m dist_cifar.sweep --config configs/airbench94.yaml --seeds R
#   --warmup-epochs 1`; train_seconds is the loop alone, run_seconds the sweep's wall time of the seed.
# - tutorial_gpu: the tutorial's loop moved to the GPU (bench_loops' tutorial-epochs, 1 epoch).
# - dist_cifar_tutorial_gpu: `python -m dist_cifar.train --config configs/tutorial.yaml train.epochs=1`.
# - torchrun_airbench94 (once): the trainer under torchrun, 1 process: the NCCL process-group path.
# Without a GPU (CUDA) the same plumbing runs on the CPU with tiny sizes: a check, never a measurement.

from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dist_cifar.bench.common import (REPO, BenchError, add_data_argument, machine_info, prepare_cache, run_child,
                                     run_trainer, run_watched, shown, spread, targets_table)
from dist_cifar.bench.loops import airbench_version, decoded_cache_config

AIRBENCH = "airbench==0.1.8"
AIRBENCH_CONFIG = REPO / "configs" / "airbench94.yaml"
TUTORIAL_CONFIG = REPO / "configs" / "tutorial.yaml"
PLUMBING = "cpu plumbing check, not a measurement"
MAX_TRAIN_RATIO = 1.0  # dist_cifar airbench94 training time <= this x airbench94's
MAX_ACCURACY_GAP_POINTS = 0.2  # ... at equal mean accuracy, within this many points
MAX_WALL_OVER_TRAIN = 1.5  # dist_cifar airbench94 wall time per run <= this x its training time
MIN_TUTORIAL_SPEEDUP = 3.0  # dist_cifar tutorial images/s on the GPU >= this x the tutorial loop's
CHILD_TIMEOUT_SECONDS = 900

# Sizes per row: the full recipes; --quick on a GPU (a smoke check); without a GPU (plumbing: the whole
# --quick run takes 2-3 minutes on 2 cores; half-precision convs are slow on CPUs, hence the narrow nets).
SIZES = {
    "full": {"airbench94": {}, "dist_airbench94": [], "tutorial": {}, "dist_tutorial": []},
    "gpu_quick": {"airbench94": {"epochs": 2}, "dist_airbench94": ["train.epochs=2"],
                  "tutorial": {"max_steps": 2000}, "dist_tutorial": ["train.max_steps=2000"]},
    "cpu_quick": {"airbench94": {"epochs": 1, "batch_size": 256, "train_images": 256, "test_images": 250,
                                 "widths": "8,16,16"},
                  "dist_airbench94": ["train.epochs=1", "data.train_subset=512", "train.global_batch_size=256",
                                      "model.widths=[8,16,16]", "train.mixed_precision=no", "train.tta_level=0"],
                  "tutorial": {"max_steps": 150, "test_images": 250}, "dist_tutorial": ["train.max_steps=150"]},
}


# ---- airbench's data files (in the parent, once) ----

def check_against_folders(dataset, data: Path) -> None:
    """The decoded cache's classes and labels are the image folder's: sorted class folders, one label per file."""
    from dist_cifar.data.sources import list_image_folder

    for name in ("train", "test"):
        classes, files = list_image_folder(data / name)
        labels = getattr(dataset, name).labels
        if classes != dataset.classes or not np.array_equal(labels, [c for _, c in files]):
            raise BenchError(f"the decoded cache of {data} does not match its {name}/ folders: rebuild the cache")


def write_airbench_data(data: Path, folder: Path, seed: int = 0) -> dict:
    """folder/train.pt and test.pt as airbench's CifarLoader reads them ({'images': N x 32 x 32 x 3 uint8,
    'labels': int64, 'classes'}) from dist_cifar's decoded cache. The training images are written in a
    seeded shuffled order, as CIFAR-10's own files hold them (airbench whitens from the first 5,000),
    with folder/train_order.npy giving each row's index in the image folder's order; test keeps that order."""
    from dist_cifar.data.sources import load_dataset

    dataset = load_dataset(decoded_cache_config(data))
    check_against_folders(dataset, data)
    order = np.random.default_rng(seed).permutation(len(dataset.train))
    folder.mkdir(parents=True, exist_ok=True)
    for name, split, index in (("train", dataset.train, order), ("test", dataset.test, np.arange(len(dataset.test)))):
        torch.save({"images": torch.from_numpy(np.array(split.images[index])),
                    "labels": torch.from_numpy(split.labels[index].astype(np.int64)),
                    "classes": list(dataset.classes)}, folder / f"{name}.pt")
    np.save(folder / "train_order.npy", order)
    return {"folder": str(folder), "train_images": len(dataset.train), "test_images": len(dataset.test),
            "classes": list(dataset.classes), "train_order_seed": seed}


# ---- the measurements (in the parent; one child process each) ----

def measure_airbench94(args, work: Path, tag: str, repeat: int) -> dict:
    return run_child("airbench94", args, work, tag, root=work / "airbench", **args.sizes["airbench94"])


def measure_dist_airbench94(args, work: Path, tag: str, repeat: int) -> dict:
    out = work / tag
    cmd = [sys.executable, "-m", "dist_cifar.sweep", "--config", str(AIRBENCH_CONFIG), "--seeds", str(repeat),
           "--warmup-epochs", "1", "--out", str(out), "data.name=imagefolder", f"data.root={args.data}",
           "tracking.plots=false", *args.sizes["dist_airbench94"]]
    watched = run_watched(cmd, work / f"{tag}.log", CHILD_TIMEOUT_SECONDS)
    seed = json.loads((out / "summary.json").read_text())["runs"][0]
    return {"train_seconds": seed["train_seconds"], "run_seconds": seed["wall_seconds"], "accuracy": seed["accuracy"],
            "seed": seed["seed"], "device": seed["device"], "mixed_precision": seed["mixed_precision"], **watched}


def measure_tutorial_gpu(args, work: Path, tag: str, repeat: int) -> dict:
    return run_child("tutorial-epochs", args, work, tag, epochs=1, source="cifar10", device=args.device,
                     **args.sizes["tutorial"])


def measure_dist_tutorial_gpu(args, work: Path, tag: str, repeat: int) -> dict:
    watched, results, _ = run_trainer(TUTORIAL_CONFIG, args, work, tag, "train.epochs=1", f"seed={repeat}",
                                      *args.sizes["dist_tutorial"])
    return {"images_per_second": results["train_images_per_second"], "train_seconds": results["train_seconds"],
            "accuracy": results["accuracy"], "steps": results["steps"], "device": results["device"], **watched}


def measure_torchrun(args, work: Path, tag: str, repeat: int) -> dict:
    """(once) The trainer under torchrun: a 1-process group, NCCL on a GPU (gloo without one)."""
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1")
    watched, results, _ = run_trainer(AIRBENCH_CONFIG, args, work, tag, *args.sizes["dist_airbench94"],
                                      launcher=launcher, check=False)
    found = {k: results.get(k) for k in ("accuracy", "train_seconds", "backend", "world_size", "device")}
    if watched["exit_code"]:
        found["log_tail"] = (work / f"{tag}.log").read_text(errors="replace")[-3000:]
    return {**found, **watched}


ROWS = {"airbench94": measure_airbench94, "dist_cifar_airbench94": measure_dist_airbench94,
        "tutorial_gpu": measure_tutorial_gpu, "dist_cifar_tutorial_gpu": measure_dist_tutorial_gpu}


def run_all(args, work: Path, runs: list, after_each) -> None:
    """Every row, interleaved round by round (a row leaves the rounds once its repeats are done), then
    torchrun once; `after_each()` after every run (the JSON so far survives a stage's time limit)."""
    for repeat in range(max(args.repeats.values())):
        for name, measure in ROWS.items():
            if repeat < args.repeats[name]:
                print(f"dist-cifar-bench --gpu: run {repeat + 1}/{args.repeats[name]}: {name}", flush=True)
                runs.append({"measurement": name, "repeat": repeat, **measure(args, work, f"{name}-{repeat}", repeat)})
                after_each()
    print("dist-cifar-bench --gpu: once: torchrun_airbench94", flush=True)
    runs.append({"measurement": "torchrun_airbench94", "repeat": 0, **measure_torchrun(args, work, "torchrun", 0)})


# ---- medians, ratios, targets ----

def mean_std(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(runs: list[dict]) -> dict:
    keys = ("train_seconds", "run_seconds", "wall_seconds", "images_per_second", "peak_rss_mb")
    out = {}
    for name in dict.fromkeys(r["measurement"] for r in runs):
        mine = [r for r in runs if r["measurement"] == name]
        out[name] = {k: spread([r.get(k) for r in mine]) for k in keys if any(r.get(k) is not None for r in mine)}
        out[name]["accuracy"] = mean_std([r.get("accuracy") for r in mine])
    return out


def ratios(summary: dict) -> dict:
    """Ratios of medians (accuracy: of means), None where a row is missing."""
    def med(name, key):
        return ((summary.get(name) or {}).get(key) or {}).get("median")

    def div(a, b):
        return a / b if a is not None and b else None

    accuracy = [((summary.get(n) or {}).get("accuracy") or {}).get("mean") for n in ("dist_cifar_airbench94", "airbench94")]
    return {
        "dist_cifar_airbench94_over_airbench94_train_seconds": div(med("dist_cifar_airbench94", "train_seconds"),
                                                                   med("airbench94", "train_seconds")),
        "accuracy_difference_points": 100 * (accuracy[0] - accuracy[1]) if None not in accuracy else None,
        "dist_cifar_airbench94_run_wall_over_train_seconds": div(med("dist_cifar_airbench94", "run_seconds"),
                                                                 med("dist_cifar_airbench94", "train_seconds")),
        "dist_cifar_airbench94_run_wall_over_airbench94_run_seconds": div(med("dist_cifar_airbench94", "run_seconds"),
                                                                          med("airbench94", "run_seconds")),
        "dist_cifar_tutorial_over_tutorial_gpu_images_per_second": div(
            med("dist_cifar_tutorial_gpu", "images_per_second"), med("tutorial_gpu", "images_per_second")),
    }


def targets(ratio: dict, measured: bool) -> list[dict]:
    """The issue's targets; `met` is None when a value is missing or nothing was measured (no GPU)."""
    gap = ratio["accuracy_difference_points"]
    rows = [("dist_cifar airbench94 train s / airbench94 train s", ratio[
                "dist_cifar_airbench94_over_airbench94_train_seconds"], "<=", MAX_TRAIN_RATIO),
            ("mean accuracy difference, points, dist_cifar - airbench94, absolute", None if gap is None else abs(gap), "<=",
             MAX_ACCURACY_GAP_POINTS),
            ("dist_cifar airbench94 wall s per run / its train s",
             ratio["dist_cifar_airbench94_run_wall_over_train_seconds"], "<=", MAX_WALL_OVER_TRAIN),
            ("dist_cifar tutorial images/s / tutorial loop images/s, GPU",
             ratio["dist_cifar_tutorial_over_tutorial_gpu_images_per_second"], ">=", MIN_TUTORIAL_SPEEDUP)]
    return [{"target": name, "value": value, "limit": f"{op} {limit:g}",
             "met": None if value is None or not measured else (value >= limit if op == ">=" else value <= limit)}
            for name, value, op, limit in rows]


# ---- the report ----

def accuracy_shown(s: dict | None) -> str:
    return "-" if not s else f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f} %"


LABELS = {"airbench94": "airbench94: package airbench 0.1.8, train94() + evaluate(tta_level=2)",
          "dist_cifar_airbench94": "dist_cifar configs/airbench94.yaml (sweep, 1 seed a process, 1-epoch warm-up, pictures off)",
          "tutorial_gpu": "tutorial loop on the device (its Net, batch 4, DataLoader 2 workers, 1 epoch)",
          "dist_cifar_tutorial_gpu": "dist_cifar configs/tutorial.yaml train.epochs=1, pictures off",
          "torchrun_airbench94": "torchrun --nproc_per_node 1, dist_cifar configs/airbench94.yaml (once)"}


def table(result: dict) -> str:
    m, st, s = result["machine"], result["settings"], result["summary"]
    device = m.get("gpu") or f"{m['cpu_model']}, {m['usable_cores']} cores"
    title = "dist_cifar GPU peer benchmark" if result["mode"] == "measurement" else f"{PLUMBING.upper()} (no GPU)"
    lines = [f"### {title}: {device}, torch {m['torch']}, accelerate {m['accelerate']}, airbench "
             f"{m.get('airbench')}, {m['time']}",
             f"sizes: {st['sizes_name']}; median (min-max) of interleaved runs, accuracy mean ± std", "",
             "| run | runs | test accuracy | training s | wall s per run | process s from launch | images/s |",
             "|---|---|---|---|---|---|---|"]
    torchrun = next((r for r in result["runs"] if r["measurement"] == "torchrun_airbench94"), None)
    for name, label in LABELS.items():
        if name not in s:
            continue
        row = s[name]
        if name == "torchrun_airbench94":
            label += f": exit {torchrun['exit_code']}, backend {torchrun.get('backend')}"
        lines.append(f"| {label} | {row['wall_seconds']['n']} | {accuracy_shown(row.get('accuracy'))} | "
                     f"{shown(row.get('train_seconds'), 2)} | {shown(row.get('run_seconds'), 2)} | "
                     f"{shown(row.get('wall_seconds'), 1)} | {shown(row.get('images_per_second'))} |")
    lines += targets_table(result["targets"], "-" if result["mode"] == "measurement" else "- (plumbing)")
    gap = result["ratios"]["accuracy_difference_points"]
    if gap is not None:
        lines += ["", f"accuracy difference, dist_cifar airbench94 - airbench94: {gap:+.2f} points"]
    return "\n".join(lines)


# ---- entry point ----

def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="dist-cifar-bench --gpu", description=__doc__.splitlines()[0])
    add_data_argument(parser)
    parser.add_argument("--quick", action="store_true",
                        help="1 run a row, short runs: a smoke check on a GPU, a plumbing check (tiny sizes) without one")
    parser.add_argument("--repeats", type=int, help="runs of every row (default: 5 for the airbench rows, 2 for the tutorial rows)")
    parser.add_argument("--airbench-repeats", type=int, help="runs of the two airbench94 rows (default 5; 1 with --quick)")
    parser.add_argument("--tutorial-repeats", type=int, help="runs of the two tutorial rows (default 2; 1 with --quick)")
    parser.add_argument("--out", type=Path, help="JSON results (default bench-results/bench-gpu-<timestamp>.json)")
    parser.add_argument("--work", type=Path, help="keep the children's logs, runs and airbench's cifar10/*.pt here "
                                                  "(default: a temporary folder, removed at the end)")
    args = parser.parse_args(argv)
    default = 1 if args.quick else None
    airbench = args.airbench_repeats or args.repeats or default or 5
    tutorial = args.tutorial_repeats or args.repeats or default or 2
    args.repeats = {"airbench94": airbench, "dist_cifar_airbench94": airbench, "tutorial_gpu": tutorial,
                    "dist_cifar_tutorial_gpu": tutorial}
    args.data = args.data.expanduser().resolve()
    return args


def stopped(signum, frame):
    raise BenchError(f"stopped by {signal.Signals(signum).name} before the end: the rows so far")


def main(argv=None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("airbench") is None:
        print(f"dist-cifar-bench --gpu: the {AIRBENCH} package (the airbench94 peer) is not installed: "
              "pip install -e '.[bench]'", file=sys.stderr)
        return 2
    if not (args.data / "train").is_dir():
        print(f"dist-cifar-bench --gpu: no image folder at {args.data} (pass --data DIR)", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    args.device = "cuda" if cuda else "cpu"
    sizes_name = "full" if not args.quick else ("gpu_quick" if cuda else "cpu_quick")
    args.sizes = SIZES[sizes_name]
    if not cuda and not args.quick:
        print("dist-cifar-bench --gpu: no GPU (CUDA) here: only --quick runs without one (a plumbing check)",
              file=sys.stderr)
        return 2
    if not cuda:
        print(f"dist-cifar-bench --gpu: no GPU here: a {PLUMBING}", flush=True)
    out = args.out or Path("bench-results") / f"bench-gpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    signal.signal(signal.SIGTERM, stopped)  # a time limit (launch/gpu_bench.sh's stage): report what ran
    with tempfile.TemporaryDirectory(prefix="dist-cifar-bench-gpu-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        return measure_and_report(args, work, out, cuda, sizes_name)


def write_result(out: Path, machine: dict, settings: dict, runs: list, error: str | None = None) -> dict:
    """Summaries, ratios and targets of the runs so far, written to `out` as JSON; the result."""
    summary = summarize(runs)
    ratio = ratios(summary)
    result = {"mode": settings["mode"], "machine": machine, "settings": settings, "summary": summary, "ratios": ratio,
              "targets": targets(ratio, settings["mode"] == "measurement"), "runs": runs, "error": error}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    return result


def measure_and_report(args, work: Path, out: Path, cuda: bool, sizes_name: str) -> int:

    settings = {"data": str(args.data), "quick": args.quick, "sizes_name": sizes_name, "sizes": args.sizes,
                "repeats": args.repeats, "device": args.device, "command": sys.argv,
                "mode": "measurement" if cuda else PLUMBING}
    machine = {**machine_info(), "cuda": cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None,
               "cuda_version": torch.version.cuda, "airbench": airbench_version()}
    runs, error = [], None
    try:
        print(f"dist-cifar-bench --gpu: preparing the decoded-image cache and airbench's files in {work}", flush=True)
        settings["cache_seconds"] = prepare_cache(args.data)
        started = time.perf_counter()
        settings["airbench_data"] = write_airbench_data(args.data, work / "airbench" / "cifar10")
        settings["airbench_data"]["seconds"] = time.perf_counter() - started
        run_all(args, work, runs, lambda: write_result(out, machine, settings, runs, "unfinished"))
    except BenchError as err:
        error = str(err)
        print(f"dist-cifar-bench --gpu: {err}", file=sys.stderr)
    result = write_result(out, machine, settings, runs, error)
    print(table(result))
    print(f"\nresults in {out}")
    torchrun_failed = any(r.get("exit_code") for r in runs if r["measurement"] == "torchrun_airbench94")
    return 1 if error or torchrun_failed else 0
