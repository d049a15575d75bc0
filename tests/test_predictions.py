"""Per-image predictions, gathered across ranks once: the run folder's predictions.csv and
`dist-cifar-evaluate --predictions`, the same bytes from 1, 2 and 3 gloo processes, and the same
accuracy and confusion counts as results.json."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from conftest import REPO, child_env, free_port, run_train, tail
from smoke_run import smoke_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_args):
    return smoke_run(tmp_path_factory, data_args)


def evaluate(model, *args, nprocs: int = 1) -> subprocess.CompletedProcess:
    """dist-cifar-evaluate on one process, or under torchrun on `nprocs`."""
    if nprocs == 1:
        cmd = [sys.executable, "-m", "dist_cifar.evaluate_cli"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "dist_cifar.evaluate_cli"]
    out = subprocess.run([*cmd, str(model), *map(str, args)], cwd=REPO, env=child_env(), capture_output=True,
                         text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, tail(out.stdout + out.stderr)
    return out


def rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def confusion(table: list[dict], classes: list[str]) -> list[list[int]]:
    cm = [[0] * len(classes) for _ in classes]
    for row in table:
        cm[classes.index(row["label"])][classes.index(row["prediction"])] += 1
    return cm


def test_every_run_folder_holds_its_predictions(run_dir, data_root):
    """One row per test image in test-set order, each named by its file, agreeing with results.json exactly."""
    results = json.loads((run_dir / "results.json").read_text())
    table = rows(run_dir / "predictions.csv")
    assert (run_dir / "predictions.csv").read_text().splitlines()[0] == "index,path,label,prediction,confidence"
    assert len(table) == results["num_eval_samples"] == 10000
    assert [int(r["index"]) for r in table] == list(range(10000))
    classes = results["classes"]
    listed = [f"test/{c}/{f.name}" for c in classes for f in sorted((data_root / "test" / c).iterdir())]
    assert [r["path"] for r in table] == listed
    assert all(r["path"].split("/")[1] == r["label"] for r in table)
    assert sum(r["label"] == r["prediction"] for r in table) / len(table) == results["accuracy"]
    assert confusion(table, classes) == results["confusion_matrix"]
    confidences = [float(r["confidence"]) for r in table]
    assert all(1 / len(classes) <= p <= 1 for p in confidences)
    assert all(len(r["confidence"]) == 8 for r in table)  # 0.dddddd: a fixed number of digits


def small_test_set(data_root, folder, per_class: int):
    """An image folder of the same ten classes with `per_class` test images each (links to the real ones)."""
    for split, n in (("train", 1), ("test", per_class)):
        for c in sorted(p.name for p in (data_root / "test").iterdir()):
            (folder / split / c).mkdir(parents=True)
            for f in sorted((data_root / split / c).iterdir())[:n]:
                (folder / split / c / f.name).symlink_to(f)
    return folder


def test_predictions_are_the_same_bytes_from_1_2_and_3_processes(run_dir, data_root, tmp_path):
    model = run_dir / "model.safetensors"
    # The run's batch size (500; 10,000 images: 20 batches, 10 per rank) on 2 processes: the run's file, byte for byte.
    out = evaluate(model, "--data-root", data_root, "--out", tmp_path / "e2.json",
                   "--predictions", tmp_path / "p2.csv", nprocs=2)
    assert (tmp_path / "p2.csv").read_bytes() == (run_dir / "predictions.csv").read_bytes()
    assert out.stdout.count("predictions of 10000 images written to") == 1  # the main process, once
    # 1 and 3 processes, another batch size (499 images: 16 batches of 33, the last of 4; 5/5/6 on 3 ranks)
    # and the top 3, on a smaller test set.
    small = small_test_set(data_root, tmp_path / "small", per_class=50)
    (small / "test" / "cat" / sorted(p.name for p in (small / "test" / "cat").iterdir())[0]).unlink()  # 499
    for n in (1, 3):
        evaluate(model, "--data-root", small, "--out", tmp_path / f"k{n}.json", "--batch-size", 33,
                 "--predictions", tmp_path / f"k{n}.csv", "--top-k", 3, nprocs=n)
    assert (tmp_path / "k1.csv").read_bytes() == (tmp_path / "k3.csv").read_bytes()
    table = rows(tmp_path / "k3.csv")
    evaluation = json.loads((tmp_path / "k3.json").read_text())
    assert evaluation["world_size"] == 3 and len(table) == evaluation["num_eval_samples"] == 499
    assert [int(r["index"]) for r in table] == list(range(499))
    assert confusion(table, evaluation["classes"]) == evaluation["confusion_matrix"]
    for r in table:
        assert (r["top1_class"], r["top1_probability"]) == (r["prediction"], r["confidence"])
        probs = [float(r[f"top{j}_probability"]) for j in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5
        assert len({r["top1_class"], r["top2_class"], r["top3_class"]}) == 3


def test_a_run_can_leave_its_predictions_out(data_args, tmp_path):
    out = tmp_path / "run"
    proc = run_train(["--config", "configs/smoke.yaml", *data_args, "data.train_subset=200", "tracking.plots=false",
                      "train.write_predictions=false", f"output_dir={out}"])
    assert proc.returncode == 0, tail(proc.stdout)
    assert (out / "results.json").is_file() and not (out / "predictions.csv").exists()
    assert "predictions" not in json.loads((out / "results.json").read_text())
