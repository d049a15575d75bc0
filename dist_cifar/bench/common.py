"""What both benchmarks share: measured children run and watched (time, peak memory), the machine's
description, the decoded-image cache, medians and spreads, and the report's table rows."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dist_cifar.bench.loops import decoded_cache_config

REPO = Path(__file__).resolve().parents[2]
MEMORY_SAMPLE_SECONDS = 0.5
CHILD_TIMEOUT_SECONDS = 3 * 3600


class BenchError(RuntimeError):
    """A measurement failed: reported as one line plus the tail of its log."""


# ---- running a child and watching its memory (in the parent) ----

def descendants(pid: int) -> list[int]:
    """pid and every process below it (DataLoader workers, decode pools), from /proc."""
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += parents.get(p, [])
    return tree


def pss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1000
    except (OSError, ValueError):
        pass
    return 0.0


def stop(proc: subprocess.Popen, grace_seconds: float = 10.0) -> None:
    """SIGTERM (torchrun passes it on to its workers), then SIGKILL if it is still running after the grace."""
    proc.terminate()
    try:
        proc.wait(grace_seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_watched(cmd: list[str], log_path: Path, timeout: float = CHILD_TIMEOUT_SECONDS, check: bool = True,
                env: dict | None = None) -> dict:
    """Run `cmd` to the end; its wall time from launch, peak RSS (wait4) and sampled peak PSS of its tree.
    A non-zero exit raises BenchError, or with check=False is only reported as `exit_code`."""
    load = os.getloadavg()[0]
    launched = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    peak_pss, most_processes, next_sample = 0.0, 1, 0.0
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            now = time.time()
            if now >= next_sample:
                tree = descendants(proc.pid)
                peak_pss = max(peak_pss, sum(pss_mb(p) for p in tree))
                most_processes, next_sample = max(most_processes, len(tree)), now + MEMORY_SAMPLE_SECONDS
            if now - launched > timeout:
                proc.kill()
            time.sleep(0.02)
    except BaseException:  # the benchmark was stopped (Ctrl-C, a signal): its child must not outlive it
        stop(proc)
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    if proc.returncode != 0 and check:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise BenchError(f"{' '.join(cmd[:6])} ... exited with {proc.returncode}; its log ends:\n{tail}")
    return {"launched": launched, "wall_seconds": time.time() - launched, "peak_rss_mb": usage.ru_maxrss * 1024 / 1e6,
            "peak_pss_all_mb": peak_pss, "processes": most_processes, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "load_average_1min": load, "exit_code": proc.returncode}


def run_child(kind: str, args, work: Path, tag: str, **options) -> dict:
    """Run one of dist_cifar.bench.loops in a fresh interpreter; its result merged with the watch.
    `options` become its flags (max_steps=5: --max-steps 5)."""
    out = work / f"{tag}.json"
    cmd = [sys.executable, "-m", "dist_cifar.bench.loops", kind, "--out", str(out), "--data", str(args.data)]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    watched = run_watched(cmd, work / f"{tag}.log")
    return {**json.loads(out.read_text()), **watched}


def run_trainer(config: Path, args, work: Path, tag: str, *overrides: str, launcher: tuple = (),
                check: bool = True) -> tuple[dict, dict, list[dict]]:
    """`python -m dist_cifar.train` on the data (after `launcher`, e.g. torchrun's module and flags);
    returns the watch, results.json and metrics.jsonl (both empty after a failure with check=False)."""
    run_dir = work / tag
    cmd = [sys.executable, *launcher, "-m", "dist_cifar.train", "--config", str(config), "data.name=imagefolder",
           f"data.root={args.data}", f"output_dir={run_dir}", "tracking.plots=false", *overrides]
    watched = run_watched(cmd, work / f"{tag}.log", check=check)
    if watched["exit_code"]:
        return watched, {}, []
    results = json.loads((run_dir / "results.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return watched, results, metrics


# ---- the measurements (in the parent; one child process each) ----

def prepare_cache(data: Path) -> float:
    """Decode the image folder into dist_cifar's cache once, so no timed run pays for it; seconds taken."""
    from dist_cifar.data.sources import load_dataset

    started = time.perf_counter()
    load_dataset(decoded_cache_config(data))
    return time.perf_counter() - started


def spread(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def machine_info() -> dict:
    from dist_cifar.versions import versions

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((l.split(":", 1)[1].strip() for l in cpuinfo if l.startswith("model name")), platform.processor())
    mem_kb = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
    return {"cpu_model": model, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "memory_gb": round(mem_kb * 1024 / 1e9, 1), "platform": platform.platform(), **versions()}


def shown(s: dict | None, digits: int = 0) -> str:
    if not s:
        return "-"
    if s["n"] == 1:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def targets_table(targets: list[dict], unjudged: str = "-") -> list[str]:
    """The targets as markdown rows; `unjudged` marks a target with no verdict."""
    lines = ["", "| target | value | limit | met |", "|---|---|---|---|"]
    for t in targets:
        value = "not measured" if t["value"] is None else f"{t['value']:.3f}"
        met = unjudged if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {value} | {t['limit']} | {met} |")
    return lines


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    default_data = os.environ.get("DIST_CIFAR_DATA") or REPO.parent / "shared" / "data" / "cifar10-jpeg"
    parser.add_argument("--data", type=Path, default=Path(default_data),
                        help="image folder with train/<class>/ and test/<class>/ (default: $DIST_CIFAR_DATA or %(default)s)")
