"""dist_cifar.bench end to end: a quick real run on the shared CIFAR-10 JPEGs, with a fresh decoded-image cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DIST_CIFAR_TEST_DATA", REPO.parent / "shared" / "data" / "cifar10-jpeg")).resolve()
RATES = ("tutorial", "dist_cifar", "bare_step")


@pytest.mark.skipif(not (DATA / "train").is_dir(), reason=f"no CIFAR-10 image folder at {DATA}")
def test_quick_bench_measures_three_rates_ratios_and_memory(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, DIST_CIFAR_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "dist_cifar.bench", "--quick", "--steps", "200",
                           "--data", str(DATA), "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())

    # one run of each measurement, in the interleaved order, each in its own process
    assert [r["measurement"] for r in result["runs"]] == list(RATES)
    assert result["settings"]["steps"] == 200 and result["settings"]["repeats"] == 1
    dist_run = result["runs"][1]
    assert dist_run["steps"] == 200
    rates = {name: result["summary"][name]["images_per_second"]["median"] for name in RATES}
    assert all(rate > 0 for rate in rates.values()), rates

    ratios = result["ratios"]
    assert ratios["dist_cifar_over_tutorial"] == pytest.approx(rates["dist_cifar"] / rates["tutorial"])
    assert ratios["dist_cifar_over_bare_step"] == pytest.approx(rates["dist_cifar"] / rates["bare_step"])

    for run in result["runs"]:
        assert run["peak_rss_mb"] > 0 and run["peak_pss_all_mb"] > 0, run
        assert run["wall_seconds"] > 0 and run["cpu_seconds"] > 0, run
    assert result["runs"][0]["processes"] >= 3, "the tutorial's 2 DataLoader workers were not seen"
    assert result["runs"][2]["torch_threads"] == 1  # the trainer's thread count for batch 4

    targets = {t["target"].split()[0]: t for t in result["targets"]}
    assert targets["dist_cifar"]["value"] == pytest.approx(ratios["dist_cifar_over_bare_step"])
    assert targets["time"]["met"] is None  # no --time-to-accuracy: not measured
    assert targets["peak"]["value"] == pytest.approx(dist_run["peak_rss_mb"])

    assert result["machine"]["cpu_model"] and result["machine"]["torch"]
    assert "| dist_cifar configs/tutorial.yaml" in proc.stdout
    assert (tmp_path / "cache").is_dir()  # the decoded images went to DIST_CIFAR_CACHE
