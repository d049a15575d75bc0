"""Every way a run ends is a state a resume understands, and a diverging run stops itself.

Real trainer processes on real images: a run that finished (all epochs, train.max_steps, the target
accuracy, a stop signal after its last step) is run again with train.resume=auto, as a requeued job or a
user re-running a script does, once as it finished and once killed (SIGKILL) right after its last
checkpoint, before its results were written. A run whose loss turns NaN exits 1 with one line and writes
nothing from the NaN state.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_train, tail

# 400 images, batch 16: 25 optimizer steps an epoch; the test split is evaluated whole (10,000 images).
BASE = ["--config", "configs/smoke.yaml", "data.train_subset=400", "tracking.plots=false", "train.threads=1"]
END_STATES = {  # overrides, the step of the last checkpoint, the number of epoch records
    "epochs": (["train.epochs=2"], 50, 2),
    "max_steps": (["train.epochs=3", "train.max_steps=30"], 30, 2),
    "target": (["train.epochs=4", "train.target_accuracy=0.15"], 50, 2),  # 11.3 % after epoch 1, 19.9 % after 2
}


def args(data_args, run_dir: Path, *extra: str) -> list[str]:
    return [*BASE, *data_args, f"output_dir={run_dir}", *extra]


def files(run_dir: Path) -> dict[str, bytes]:
    """Every file of the run folder but the lock, by path: what a finished run's resume must not change."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".dist_cifar.lock"}


def comparable(run_dir: Path) -> dict:
    r = json.loads((run_dir / "results.json").read_text())
    return {k: r[k] for k in ("accuracy", "confusion_matrix", "epochs", "steps", "finished", "target_reached_at_epoch")}


@pytest.fixture(scope="module")
def finished_runs(data_args, tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted run of each end state."""
    out = {}
    for state, (extra, _, records) in END_STATES.items():
        run_dir = tmp_path_factory.mktemp(f"finished-{state}") / "run"
        proc = run_train(args(data_args, run_dir, *extra), timeout=300)
        assert proc.returncode == 0, tail(proc.stdout)
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == records
        out[state] = run_dir
    return out


@pytest.mark.parametrize("state", END_STATES)
def test_a_finished_run_resumed_says_so_and_rewrites_nothing(state, finished_runs, data_args, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_runs[state], run_dir)
    before = files(run_dir)
    proc = run_train(args(data_args, run_dir, *END_STATES[state][0], "train.resume=auto"), timeout=120)
    assert proc.returncode == 0, tail(proc.stdout)
    assert "is finished" in proc.stdout and "nothing to do" in proc.stdout, tail(proc.stdout)
    assert "Traceback" not in proc.stdout
    assert files(run_dir) == before  # results.json, metrics, checkpoints: byte for byte


@pytest.mark.parametrize("state", END_STATES)
def test_a_run_killed_after_its_last_checkpoint_writes_its_results_on_resume(state, finished_runs, data_args,
                                                                             tmp_path):
    extra, last_step, records = END_STATES[state]
    run_dir = tmp_path / "run"
    killed = run_train(args(data_args, run_dir, *extra), env={"DIST_CIFAR_FAULT": f"after_save:{last_step}"},
                       timeout=300)
    assert killed.returncode == -9, tail(killed.stdout)
    assert not (run_dir / "results.json").exists()
    resumed = run_train(args(data_args, run_dir, *extra, "train.resume=auto"), timeout=300)
    assert resumed.returncode == 0, tail(resumed.stdout)
    assert comparable(run_dir) == comparable(finished_runs[state])
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == records  # no epoch trained again
    again = run_train(args(data_args, run_dir, *extra, "train.resume=auto"), timeout=120)
    assert again.returncode == 0 and "nothing to do" in again.stdout, tail(again.stdout)


def test_a_signal_at_the_last_step_ends_the_run_on_resume(finished_runs, data_args, tmp_path):
    """SIGTERM right after the run's last optimizer step: checkpoint, exit 75; the resume does the epoch's
    end (evaluation, record, final checkpoint) and the results are the uninterrupted run's."""
    extra, last_step, records = END_STATES["epochs"]
    run_dir = tmp_path / "run"
    stopped = run_train(args(data_args, run_dir, *extra), env={"DIST_CIFAR_FAULT": f"sigterm_at:{last_step}"},
                        timeout=300)
    assert stopped.returncode == 75, tail(stopped.stdout)
    resumed = run_train(args(data_args, run_dir, *extra, "train.resume=auto"), timeout=300)
    assert resumed.returncode == 0, tail(resumed.stdout)
    assert comparable(run_dir) == comparable(finished_runs["epochs"])
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == records


@pytest.mark.parametrize("state,more", [("epochs", "train.epochs=3"), ("max_steps", "train.max_steps=40")])
def test_asking_a_finished_run_for_more_is_refused_with_how(state, more, finished_runs, data_args, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_runs[state], run_dir)
    before = files(run_dir)
    proc = run_train(args(data_args, run_dir, *END_STATES[state][0], more, "train.resume=auto"), timeout=120)
    assert proc.returncode == 1, tail(proc.stdout)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("dist_cifar: error:")]
    assert len(errors) == 1 and "cannot go on" in errors[0] and "another output_dir" in errors[0], tail(proc.stdout)
    assert files(run_dir) == before


def test_a_higher_target_continues_the_run_where_it_stopped(finished_runs, data_args, tmp_path):
    """The target does not shape the schedule, so a run stopped at one target goes on exactly to a higher
    one: it trains the next epoch and stops there like a run that had the higher target from the start."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_runs["target"], run_dir)
    higher = ["train.epochs=4", "train.target_accuracy=0.99"]
    proc = run_train(args(data_args, run_dir, *higher, "train.resume=auto"), timeout=300)
    assert proc.returncode == 0, tail(proc.stdout)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    straight = run_train(args(data_args, tmp_path / "straight", *higher), timeout=300)
    assert straight.returncode == 0, tail(straight.stdout)
    assert comparable(run_dir)["confusion_matrix"] == comparable(tmp_path / "straight")["confusion_matrix"]


# ---- divergence ----

@pytest.mark.parametrize("nprocs", [1, 2])
def test_a_diverging_run_stops_with_one_line_and_writes_nothing_from_nan(nprocs, data_args, tmp_path):
    """optim.lr=1e6 on 2,000 images: the loss is NaN within a few steps; the run must stop within the first
    check interval (preempt.check_every_steps=10), exit 1, name the steps, and leave no model, results or
    checkpoint written from non-finite weights."""
    run_dir = tmp_path / "run"
    proc = run_train(args(data_args, run_dir, "optim.lr=1e6", "checkpoint.every_steps=5", "data.train_subset=2000"),
                     nprocs=nprocs, timeout=300)
    assert proc.returncode == 1, tail(proc.stdout)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("dist_cifar: error:")]
    assert len(errors) >= 1 and all("non-finite" in e and "step" in e for e in errors), tail(proc.stdout)
    assert not re.search(r'File ".*dist_cifar/', proc.stdout), tail(proc.stdout)  # torchrun's own report aside
    assert not (run_dir / "results.json").exists() and not (run_dir / "model.safetensors").exists()
    for folder in (run_dir / "checkpoints").glob("step-*"):  # any checkpoint is from before the NaN
        weights = load_file(folder / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()), folder


def test_a_nan_on_one_rank_stops_every_rank_and_keeps_the_last_good_checkpoint(data_args, tmp_path):
    """A NaN loss at step 13 on the last rank is caught at the next check (step 20: 10 is the check
    interval) by both ranks together; the checkpoint of step 10 stays the newest and is named."""
    run_dir = tmp_path / "run"
    proc = run_train(args(data_args, run_dir, "checkpoint.every_steps=10", "train.epochs=2", "train.global_batch_size=16",
                          "train.per_device_batch_size=null"), nprocs=2,
                     env={"DIST_CIFAR_FAULT": "nonfinite_at:13"}, timeout=300)
    assert proc.returncode == 1, tail(proc.stdout)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("dist_cifar: error:")]
    assert errors and "between steps 11 and 20" in errors[0] and "step-00000010" in errors[0], tail(proc.stdout)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000010"]


def test_stop_on_nonfinite_off_trains_on(data_args, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(args(data_args, run_dir, "optim.lr=1e6", "train.stop_on_nonfinite=false", "data.train_subset=2000"),
                     timeout=300)
    assert proc.returncode == 0, tail(proc.stdout)
    assert json.loads((run_dir / "results.json").read_text())["accuracy"] == pytest.approx(0.1, abs=0.02)
