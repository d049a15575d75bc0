"""Checkpoints and resume, with real processes, files and signals: a run stopped by SIGTERM, killed
with SIGKILL or killed half-way through writing a checkpoint continues to the same final weights,
bit for bit, as a run never stopped; broken or foreign checkpoints are refused clearly.

Each run trains tutorial_net on 1,000 real CIFAR-10 images for 3 epochs (62 optimizer steps an
epoch on one process, 31 on two) and takes 10-30 s, most of it starting Python and torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import IN_CI, run_train, start_train, tail

CHECKPOINT_FILES = ("model.safetensors", "state.pt", "meta.json")
AUGMENT = ["data.augment.flip=true", "data.augment.crop_padding=2"]


def train_args(data_args, run_dir, *extra) -> list[str]:
    return ["--config", "configs/smoke.yaml", *data_args, "data.train_subset=1000", "train.epochs=3",
            "train.eval_every_epochs=0", "tracking.plots=false", f"output_dir={run_dir}",
            "train.threads=1",  # measured 3x faster than 2 threads when other jobs share the 2 cores
            *extra]


def steps(run_dir: Path) -> list[int]:
    """Optimizer steps of the checkpoint folders (complete or not), oldest first."""
    folder = run_dir / "checkpoints"
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    return sorted(int(n[5:]) for n in names if re.fullmatch(r"step-\d{8}", n))


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def intact(folder: Path) -> bool:
    """Checked here independently of dist_cifar.checkpoint: every file present and matching MANIFEST.json."""
    try:
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        return all(hashlib.sha256((folder / n).read_bytes()).hexdigest() == manifest[n]["sha256"]
                   for n in CHECKPOINT_FILES)
    except (OSError, KeyError, ValueError):
        return False


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but the run-folder lock's (each run that opens the folder notes itself there)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".dist_cifar.lock"}


def resumed_from(output: str) -> Path | None:
    found = re.findall(r"resumed from (\S+) at epoch", output)
    return Path(found[-1]) if found else None


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Final weights bitwise equal, same accuracy, one metrics record per epoch."""
    mine, theirs = load_file(run_dir / "model.safetensors"), load_file(reference / "model.safetensors")
    assert mine.keys() == theirs.keys()
    differ = [k for k in mine if not torch.equal(mine[k], theirs[k])]
    assert not differ, f"weights differ from the uninterrupted run's: {differ}"
    accuracy = [json.loads((d / "results.json").read_text())["accuracy"] for d in (run_dir, reference)]
    assert accuracy[0] == accuracy[1]
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3], f"metrics.jsonl epochs {epochs}: an epoch is missing or repeated"


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one-line error the trainer ends with; and no traceback anywhere."""
    assert result.returncode not in (0, 75), tail(result.stdout)
    assert "Traceback" not in result.stdout, tail(result.stdout)
    errors = [line for line in result.stdout.splitlines() if line.startswith("dist_cifar: error:")]
    assert len(errors) == 1, tail(result.stdout)
    return errors[0]


@pytest.fixture(scope="module")
def reference_1p(tmp_path_factory, data_args) -> Path:
    """One process, never interrupted, augmented; three checkpoints kept (170, 180 and the final 186)."""
    run_dir = tmp_path_factory.mktemp("ref-1p") / "run"
    result = run_train(train_args(data_args, run_dir, *AUGMENT, "checkpoint.every_steps=10",
                                  "checkpoint.keep_last=3"), timeout=240)
    assert result.returncode == 0, tail(result.stdout)
    assert steps(run_dir) == [170, 180, 186]
    return run_dir


@pytest.fixture(scope="module")
def reference_2p(tmp_path_factory, data_args) -> Path:
    """Two gloo processes (ranks started here), never interrupted, augmented."""
    run_dir = tmp_path_factory.mktemp("ref-2p") / "run"
    result = run_train(train_args(data_args, run_dir, *AUGMENT, "checkpoint.every_steps=5"), nprocs=2, timeout=240,
                       launcher="ranks")
    assert result.returncode == 0, tail(result.stdout)
    return run_dir


def test_sigterm_mid_epoch_then_resume_is_exact(reference_1p, data_args, tmp_path):
    run_dir = tmp_path / "run"
    args = train_args(data_args, run_dir, *AUGMENT, "checkpoint.every_steps=10", "checkpoint.keep_last=3")
    job = start_train(args)
    job.wait_for(lambda: any(s >= 70 for s in steps(run_dir)), what="a checkpoint in epoch 2")
    job.procs[0].send_signal(signal.SIGTERM)
    assert job.wait(120) == [75], tail(job.output())
    stopped = max(steps(run_dir))
    meta = json.loads((checkpoint(run_dir, stopped) / "meta.json").read_text())
    assert 70 < stopped < 124 and meta["epoch"] == 1 and meta["micro_step"] > 0, meta  # mid epoch 2
    assert intact(checkpoint(run_dir, stopped))
    assert not (run_dir / "model.safetensors").exists()

    result = run_train([*args, "train.resume=auto"], timeout=180)
    assert result.returncode == 0, tail(result.stdout)
    assert resumed_from(result.stdout) == checkpoint(run_dir, stopped)
    assert_same_run(run_dir, reference_1p)


def test_sigkill_anywhere_and_during_a_save_then_resume_is_exact(reference_2p, data_args, tmp_path):
    run_dir = tmp_path / "run"
    args = train_args(data_args, run_dir, *AUGMENT, "checkpoint.every_steps=5", "train.resume=auto")
    rng = random.Random(20250611)
    # Steps take ~15 ms on a fast machine, so the delays stay short enough for both kills to land
    # well before the fault step (a 0.5 s delay once let a run pass step 62 before it was killed).
    first = rng.randint(6, 20)
    kill_points = [(first, rng.uniform(0.0, 0.08)), (rng.randint(first + 8, 35), rng.uniform(0.0, 0.08))]
    fault_step = 62  # the end of epoch 2 (31 steps an epoch on 2 processes): between every_steps saves
    attempts = []

    def resume_is_sound(output: str) -> None:
        """Every step-* folder is complete, and the run continued from the newest one."""
        assert all(intact(checkpoint(run_dir, s)) for s in steps(run_dir)), steps(run_dir)
        if attempts:
            assert resumed_from(output) == checkpoint(run_dir, attempts[-1]), tail(output)

    for after_step, delay in kill_points:
        job = start_train(args, nprocs=2, launcher="ranks")
        job.wait_for(lambda: any(s >= after_step for s in steps(run_dir)), what=f"checkpoint {after_step}")
        time.sleep(delay)
        assert job.running(), "the run finished before it could be killed"
        job.kill(signal.SIGKILL)
        job.wait(60)
        resume_is_sound(job.output())
        attempts.append(max(steps(run_dir)))
    assert attempts[-1] < 60, f"the second kill landed too late ({attempts[-1]}) to test the fault at {fault_step}"

    job = start_train(args, nprocs=2, env={"DIST_CIFAR_FAULT": f"during_save:{fault_step}"}, launcher="ranks")
    assert job.wait(120)[0] != 0, tail(job.output())
    resume_is_sound(job.output())
    half_written = list((run_dir / "checkpoints").glob(f".tmp-step-{fault_step:08d}-*"))
    assert half_written, "the fault hook did not leave a half-written checkpoint"
    assert not (half_written[0] / "MANIFEST.json").exists()
    assert max(steps(run_dir)) == 60
    attempts.append(60)

    result = run_train(args, nprocs=2, timeout=180, launcher="ranks")
    assert result.returncode == 0, tail(result.stdout)
    resume_is_sound(result.stdout)
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "the half-written checkpoint was left behind"
    assert_same_run(run_dir, reference_2p)


def test_broken_checkpoints_are_skipped_by_auto_and_refused_by_path(reference_1p, data_args, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_1p, run_dir)
    (run_dir / "model.safetensors").unlink()  # so the auto resume below must write it again
    state = checkpoint(run_dir, 186) / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    weights = checkpoint(run_dir, 180) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    weights.write_bytes(bytes(data))
    before = snapshot(run_dir)
    args = train_args(data_args, run_dir, *AUGMENT, "checkpoint.every_steps=10", "checkpoint.keep_last=3")

    for broken, name in ((checkpoint(run_dir, 186), "state.pt"), (checkpoint(run_dir, 180), "model.safetensors")):
        line = error_line(run_train([*args, f"train.resume={broken}"], timeout=120))
        assert str(broken) in line and name in line, line
    assert snapshot(run_dir) == before, "a refused resume changed the run folder"

    result = run_train([*args, "train.resume=auto"], timeout=180)
    assert result.returncode == 0, tail(result.stdout)
    warnings = [line for line in result.stdout.splitlines() if line.startswith("dist_cifar: warning: skipping")]
    assert len(warnings) == 2 and "step-00000186" in warnings[0] and "step-00000180" in warnings[1], warnings
    assert resumed_from(result.stdout) == checkpoint(run_dir, 170)
    # The runs saved again at 180 and 186 may replace the broken folders; the weights must be exact.
    assert (load_file(run_dir / "model.safetensors").keys() == load_file(reference_1p / "model.safetensors").keys())
    mine, theirs = load_file(run_dir / "model.safetensors"), load_file(reference_1p / "model.safetensors")
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("override, key", [("train.per_device_batch_size=32", "train.per_device_batch_size"),
                                           ("model.name=resnet18", "model.name")])
def test_checkpoint_of_another_config_is_refused(reference_1p, data_args, tmp_path, override, key):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_1p, run_dir)
    before = snapshot(run_dir)
    line = error_line(run_train(train_args(data_args, run_dir, *AUGMENT, override, "train.resume=auto"), timeout=120))
    assert key in line and str(checkpoint(run_dir, 186)) in line, line
    assert snapshot(run_dir) == before


def test_checkpoint_of_another_global_batch_is_refused(reference_2p, data_args, tmp_path):
    """2 processes x 16 images wrote it; 1 process x 16 would change the data order: refused, naming the key
    that continues it (tests/test_elastic.py resumes on other world sizes with the same global batch)."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_2p, run_dir)
    before = snapshot(run_dir)
    line = error_line(run_train(train_args(data_args, run_dir, *AUGMENT, "train.resume=auto"), timeout=120))
    assert "were 32 images" in line and "now 16" in line and "train.global_batch_size=32" in line, line
    assert snapshot(run_dir) == before


def test_output_dir_holding_a_run_is_refused_without_resume(reference_1p, data_args, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_1p, run_dir)
    before = snapshot(run_dir)
    line = error_line(run_train(train_args(data_args, run_dir, *AUGMENT), timeout=120))
    assert "already holds a run" in line and "train.resume=auto" in line, line
    assert snapshot(run_dir) == before


@pytest.fixture
def full_disk(tmp_path):
    """A 4 MiB tmpfs, mounted for the test and unmounted after it: really full, even for root."""
    mountpoint = tmp_path / "full-disk"
    mountpoint.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mountpoint)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        reason = f"cannot mount a tmpfs to fill ({out.stderr.strip()}): a full disk needs root or CAP_SYS_ADMIN"
        pytest.fail(reason) if IN_CI and os.geteuid() == 0 else pytest.skip(reason)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_full_disk_stops_the_run_clearly_and_keeps_the_previous_checkpoint(reference_1p, data_args, tmp_path,
                                                                            full_disk):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_1p, run_dir, ignore=lambda d, names: [n for n in names if n == "checkpoints"])
    (run_dir / "checkpoints").symlink_to(full_disk)
    shutil.copytree(checkpoint(reference_1p, 170), checkpoint(run_dir, 170))
    stats = os.statvfs(full_disk)
    # Room for the next checkpoint's weights (250 kB) but not its optimizer state (520 kB).
    (full_disk / "filler").write_bytes(bytes(stats.f_bavail * stats.f_frsize - 400_000))
    before = snapshot(checkpoint(run_dir, 170))

    result = run_train(train_args(data_args, run_dir, *AUGMENT, "checkpoint.every_steps=10", "train.resume=auto"),
                       timeout=120)
    line = error_line(result)
    assert "cannot write checkpoint" in line and "step-00000180" in line and "No space left" in line, line
    assert f"previous checkpoint is {checkpoint(run_dir, 170)}" in line, line
    assert snapshot(checkpoint(run_dir, 170)) == before
    assert steps(run_dir) == [170] and not list(full_disk.glob(".tmp-*")), list(full_disk.iterdir())


def test_sigusr1_on_one_rank_stops_both_at_the_same_step(data_args, tmp_path):
    run_dir = tmp_path / "run"
    args = train_args(data_args, run_dir, "checkpoint.every_steps=5", "preempt.check_every_steps=4")
    # Ranks started directly (not torchrun), so each rank's own exit code is visible.
    job = start_train(args, nprocs=2, launcher="ranks")
    job.wait_for(lambda: any(s >= 5 for s in steps(run_dir)), what="checkpoint 5")
    os.kill(job.rank_pids()[1], signal.SIGUSR1)  # the non-main rank only
    signalled = time.monotonic()
    assert job.wait(90) == [75, 75], tail(job.output())
    assert time.monotonic() - signalled < 60
    stopped = max(steps(run_dir))
    assert stopped % 4 == 0 and intact(checkpoint(run_dir, stopped)), steps(run_dir)
    meta = json.loads((checkpoint(run_dir, stopped) / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == stopped
    state = torch.load(checkpoint(run_dir, stopped) / "state.pt", weights_only=True)
    assert len(state["ranks"]) == 2  # both ranks took part in the save
    assert f"received a stop signal on another rank: saving a checkpoint at step {stopped}" in job.output()


def test_optimizer_state_that_does_not_fit_is_refused(reference_1p, data_args, tmp_path):
    """A checkpoint whose optimizer state is ordered differently (as written by code that groups the
    parameters another way) is refused before training, not at the first optimizer step."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_1p, run_dir)
    (run_dir / "results.json").unlink()  # a finished run with its results written loads no state: not finished
    folder = checkpoint(run_dir, 186)
    state = torch.load(folder / "state.pt", weights_only=True)
    moments = state["optimizer"]["state"]
    moments[0], moments[1] = moments[1], moments[0]  # conv1 weight and bias: different shapes
    torch.save(state, folder / "state.pt")
    manifest = json.loads((folder / "MANIFEST.json").read_text())  # consistent files, wrong content
    manifest["state.pt"] = {"bytes": (folder / "state.pt").stat().st_size,
                            "sha256": hashlib.sha256((folder / "state.pt").read_bytes()).hexdigest()}
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    before = snapshot(run_dir)
    line = error_line(run_train(train_args(data_args, run_dir, *AUGMENT, "train.resume=auto"), timeout=120))
    assert str(folder / "state.pt") in line and "does not fit" in line, line
    # config.yaml is rewritten before the state is loaded (train.py writes it once every rank has
    # checked the folder); everything else, every checkpoint included, is untouched.
    before.pop("config.yaml")
    assert {k: v for k, v in snapshot(run_dir).items() if k != "config.yaml"} == before
