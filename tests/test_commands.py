"""The user commands on a real trained run: dist-cifar-evaluate (1 process and a 2-rank gloo group),
dist-cifar-predict on real JPEGs and broken inputs, and dist-cifar-show-data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, child_env, free_port
from smoke_run import smoke_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_args):
    return smoke_run(tmp_path_factory, data_args)


def command(module: str, *args, timeout: float = 300, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def evaluate_on_two_ranks(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "dist_cifar.evaluate_cli", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


# ---- dist-cifar-evaluate ----

def test_evaluate_reproduces_the_runs_accuracy(run_dir, data_root, tmp_path):
    """By default the results go next to the model, not into the working folder, nor over the run's results.json."""
    trained_bytes = (run_dir / "results.json").read_bytes()
    out = command("dist_cifar.evaluate_cli", run_dir / "model.safetensors", "--data-root", data_root, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert list(tmp_path.iterdir()) == [] and (run_dir / "results.json").read_bytes() == trained_bytes
    assert out.stdout.splitlines()[-1] == f"evaluation written to {run_dir / 'evaluation.json'}"
    got = json.loads((run_dir / "evaluation.json").read_text())
    trained = json.loads(trained_bytes)
    assert got["num_eval_samples"] == 10000
    assert got["accuracy"] == trained["accuracy"]
    assert got["confusion_matrix"] == trained["confusion_matrix"]
    assert got["classes"] == trained["classes"] and got["world_size"] == 1
    assert "Accuracy for class: airplane" in out.stdout
    assert f"Accuracy of the network on the 10000 test images: {100 * trained['accuracy']:.2f} %" in out.stdout


def test_evaluate_on_two_gloo_ranks_counts_every_image_once(run_dir, data_root, tmp_path):
    checkpoint = sorted((run_dir / "checkpoints").iterdir())[-1]  # a checkpoint folder this time
    out = evaluate_on_two_ranks(checkpoint, "--data-root", data_root, "--out", tmp_path / "r.json",
                                "--batch-size", 128)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads((tmp_path / "r.json").read_text())
    trained = json.loads((run_dir / "results.json").read_text())
    assert (got["world_size"], got["backend"]) == (2, "gloo")
    assert got["num_eval_samples"] == 10000
    assert got["confusion_matrix"] == trained["confusion_matrix"]
    assert out.stdout.count("Accuracy of the network") == 1  # the main process reports, once


def test_evaluate_refuses_data_with_other_classes(run_dir, data_root, tmp_path):
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            folder = tmp_path / "two" / split / name
            folder.mkdir(parents=True)
            for src in sorted((data_root / split / name).iterdir())[:3]:
                shutil.copy(src, folder)
    out = command("dist_cifar.evaluate_cli", run_dir / "model.safetensors", "--data-root", tmp_path / "two",
                  "--output", tmp_path / "r.json")  # the older spelling of --out
    assert out.returncode == 1
    assert "was trained on classes" in out.stderr and "['cat', 'dog']" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "r.json").exists()


# ---- dist-cifar-predict ----

def test_predict_matches_the_training_preprocessing(run_dir, data_root):
    """Top-1 of predict on test JPEGs equals the model's prediction on the trainer's decoded test split."""
    from dist_cifar.state.checkpoint import load_model
    from dist_cifar.config import DataConfig
    from dist_cifar.data.sources import load_dataset
    from dist_cifar.data.batches import normalize

    files = [data_root / "test" / c / f"{i:04d}.jpg" for c in ("cat", "ship") for i in range(6)]
    out = command("dist_cifar.predict", run_dir / "model.safetensors", *files, "--json", "--top-k", "3")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["path"] for line in lines] == [str(f) for f in files]

    net, cfg, classes = load_model(run_dir / "model.safetensors")
    test = load_dataset(DataConfig(name="imagefolder", root=str(data_root))).test
    index = [classes.index(c) * 1000 + i for c in ("cat", "ship") for i in range(6)]  # sorted class/name order
    with torch.no_grad():
        probs = net(normalize(torch.from_numpy(np.asarray(test.images[index])), cfg.data.mean, cfg.data.std)).softmax(1)
    for line, p in zip(lines, probs):
        assert len(line["top"]) == 3
        assert line["top"][0]["class"] == classes[int(p.argmax())]
        assert line["top"][0]["probability"] == pytest.approx(float(p.max()), abs=1e-5)
        shown = [t["probability"] for t in line["top"]]
        assert shown == sorted(shown, reverse=True) and sum(shown) <= 1 + 1e-6


def test_predict_reports_each_bad_item_and_goes_on(run_dir, data_root, tmp_path):
    good = tmp_path / "good"
    (good / "nested").mkdir(parents=True)
    shutil.copy(data_root / "test" / "frog" / "0000.jpg", good / "frog.jpg")
    shutil.copy(data_root / "test" / "truck" / "0001.jpg", good / "nested" / "truck.JPG")
    (good / "notes.txt").write_text("not an image, not an image name: skipped in folders")
    bad = tmp_path / "bad.jpg"
    bad.write_text("this is not a JPEG")
    (tmp_path / "empty").mkdir()
    missing = tmp_path / "missing.png"

    out = command("dist_cifar.predict", run_dir / "model.safetensors", good, bad, missing, tmp_path / "empty",
                  data_root / "test" / "cat" / "0000.jpg")
    assert out.returncode == 1
    errors = out.stderr.splitlines()
    assert len(errors) == 3, out.stderr
    assert any(str(bad) in e and "not a readable image" in e for e in errors)
    assert any(str(missing) in e and "no such file" in e for e in errors)
    assert any(str(tmp_path / "empty") in e and "no image files" in e for e in errors)
    rows = out.stdout.splitlines()
    assert [r.split()[0] for r in rows] == [str(good / "frog.jpg"), str(good / "nested" / "truck.JPG"),
                                            str(data_root / "test" / "cat" / "0000.jpg")]
    assert all(r.count("%") == 3 for r in rows)


def test_predict_refuses_unusable_checkpoints(run_dir, data_root, tmp_path):
    from dist_cifar.state.checkpoint import load_weights, save_weights

    image = data_root / "test" / "cat" / "0000.jpg"
    not_a_model = command("dist_cifar.predict", run_dir / "config.yaml", image)
    assert not_a_model.returncode == 1 and not_a_model.stdout == ""
    assert "cannot read model weights" in not_a_model.stderr and len(not_a_model.stderr.splitlines()) == 1

    state, config, classes = load_weights(run_dir / "model.safetensors")
    config["model"]["name"] = "resnet18"  # a file whose weights are not of the model its config names
    save_weights(tmp_path / "other.safetensors", state, config, classes)
    other = command("dist_cifar.predict", tmp_path / "other.safetensors", image)
    assert other.returncode == 1 and other.stdout == ""
    assert "does not fit a resnet18 model" in other.stderr and len(other.stderr.splitlines()) == 1


# ---- accelerate launch asked for N CPU processes but starting one ----

@pytest.mark.parametrize("flags", [["--cpu", "--num_processes", "2"], ["--num_processes", "2"]],
                         ids=["--cpu", "no --multi_gpu"])
def test_accelerate_launch_of_one_process_for_two_stops_with_the_flag_to_use(flags, data_args, tmp_path):
    if "--cpu" not in flags and torch.cuda.device_count() > 1:
        pytest.skip("with several GPUs accelerate launch turns --multi_gpu on by itself")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *flags, "dist_cifar/train.py",
           "--config", "configs/smoke.yaml", *data_args, "train.threads=1", f"output_dir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    ours = [line for line in out.stderr.splitlines() if line.startswith("dist_cifar:")]
    assert ours == ["dist_cifar: error: accelerate launch was asked for several processes but started ONE "
                    "(its --cpu flag, or no --multi_gpu, runs a single process): use `accelerate launch "
                    "--multi_gpu --num_processes N` or `accelerate launch --config_file launch/cpu_multi.yaml "
                    "--num_processes N`"], out.stderr[-3000:]
    assert not (tmp_path / "run").exists()  # stopped before the run folder, the data or the model


# ---- dist-cifar-show-data ----

def test_show_data_writes_a_grid(data_args, tmp_path):
    out = command("dist_cifar.show_data", "--config", "configs/smoke.yaml", *data_args, "--out", tmp_path / "g.png",
                  "--n", 12, "data.train_subset=100")
    assert out.returncode == 0, out.stderr
    with Image.open(tmp_path / "g.png") as img:
        assert img.format == "PNG" and img.width > 600 and img.height > 300
    bad = command("dist_cifar.show_data", "--config", "configs/smoke.yaml", "data.nmae=x", "--out", tmp_path / "x.png")
    assert bad.returncode == 2 and "unknown config key 'data.nmae'" in bad.stderr
    assert not (tmp_path / "x.png").exists()


# ---- dist-cifar-sweep and the image pack (the commands behind the README's Results) ----

def test_sweep_reports_mean_and_spread_of_its_seeds(data_args, tmp_path):
    out = tmp_path / "sweep"
    proc = command("dist_cifar.sweep", "--config", "configs/smoke.yaml", "--seeds", "0,3", "--out", out,
                   *data_args, "data.train_subset=500", "tracking.plots=false", timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 3]
    runs = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 3)]
    accs = [r["accuracy"] for r in runs]
    assert [r["seed"] for r in runs] == [0, 3] and accs[0] != accs[1]  # the seed reached the runs
    assert summary["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert summary["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    assert (summary["accuracy"]["min"], summary["accuracy"]["max"]) == (min(accs), max(accs))
    assert "±" in proc.stdout
    again = command("dist_cifar.sweep", "--config", "configs/smoke.yaml", "--seeds", "0", "--out", out, *data_args)
    assert again.returncode != 0 and str(out) in again.stderr  # an earlier sweep is never overwritten


def test_image_pack_round_trips_every_file(data_root, tmp_path):
    src = tmp_path / "src"
    for split, cls in (("train", "cat"), ("train", "dog"), ("test", "cat")):
        (src / split / cls).mkdir(parents=True)
        for path in sorted((data_root / split / cls).iterdir())[:3]:
            shutil.copy(path, src / split / cls / path.name)
    pack = tmp_path / "pack.npz"
    script = str(REPO / "launch" / "pack_images.py")
    assert subprocess.run([sys.executable, script, str(src), str(pack)], capture_output=True).returncode == 0
    dest = tmp_path / "dest"
    assert subprocess.run([sys.executable, script, "--unpack", str(pack), str(dest)], capture_output=True).returncode == 0
    files = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())
    assert len(files) == 9 and files == sorted(p.relative_to(dest) for p in dest.rglob("*") if p.is_file())
    assert all((src / f).read_bytes() == (dest / f).read_bytes() for f in files)
