"""Never lose work: multi-process runs that always end cleanly (under the conditions that used to abort
them), one run per folder, restarts that recover, hangs that end, bookkeeping at every resume point,
and bad input refused in one line before any work. Real gloo groups, real files, real signals.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import conftest
from conftest import IN_CI, REPO, child_env, free_port, run_train, start_train, tail
from test_resume import checkpoint, error_line, intact, snapshot, steps, train_args


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def metrics_epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---- 1. a clean end, always ----

END_ARGS = ["--config", "configs/smoke.yaml", "data.train_subset=400", "train.epochs=1", "tracking.plots=false",
            "train.threads=1"]


@pytest.mark.parametrize("launch", ["torchrun-2", "torchrun-3", "accelerate-2"])
def test_multi_process_runs_end_cleanly(launch, data_args, tmp_path):
    """Every rank exits 0 with the main process's files complete, and no rank aborts at exit. The abort
    this guards against (a gloo worker thread freeing a finished collective's tensors during interpreter
    shutdown: std::terminate, see dist_cifar/dist/exit.py) was seen only on loaded machines and is not
    reproduced here on demand; this proves the ordinary end under every launcher."""
    run_dir = tmp_path / "run"
    args = [*END_ARGS, *data_args, f"output_dir={run_dir}"]
    if launch.startswith("accelerate"):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", str(free_port()), "dist_cifar/train.py", *args]
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
        output, code = proc.stdout + proc.stderr, proc.returncode
    else:
        proc = run_train(args, nprocs=int(launch.split("-")[1]), timeout=600)
        output, code = proc.stdout, proc.returncode
    assert "terminate called" not in output, tail(output)
    assert code == 0, tail(output)
    r = results(run_dir)
    assert r["num_eval_samples"] == 10000 and (run_dir / "model.safetensors").is_file()


# ---- 2. one run per folder ----

def long_args(data_args, run_dir, *extra):
    return train_args(data_args, run_dir, "train.epochs=6", "checkpoint.every_steps=10", *extra)


def test_second_run_on_a_folder_in_use_stops_at_once_and_the_first_finishes(data_args, tmp_path):
    run_dir = tmp_path / "run"
    first = start_train(long_args(data_args, run_dir))
    first.wait_for(lambda: (run_dir / "config.yaml").exists(), what="the first run's config.yaml")
    os.kill(first.procs[0].pid, signal.SIGSTOP)  # still holding its lock, however fast this machine is
    try:
        for extra in ([], ["train.resume=auto"]):
            second = run_train(long_args(data_args, run_dir, *extra), timeout=120)
            line = error_line(second)
            assert f"output_dir {run_dir} is in use by another run" in line, line
            assert f"pid {first.procs[0].pid}" in line, line
            assert "data:" not in second.stdout  # refused before loading anything
    finally:
        os.kill(first.procs[0].pid, signal.SIGCONT)
    assert first.wait(300) == [0], tail(first.output())
    assert metrics_epochs(run_dir) == [1, 2, 3, 4, 5, 6]
    assert results(run_dir)["epochs"] == 6


def test_lock_of_a_killed_run_is_taken_over(data_args, tmp_path):
    run_dir = tmp_path / "run"
    first = start_train(long_args(data_args, run_dir))
    first.wait_for(lambda: steps(run_dir), what="a checkpoint")
    first.kill(signal.SIGKILL)
    first.wait(60)
    result = run_train(long_args(data_args, run_dir, "train.resume=auto"), timeout=300)
    assert result.returncode == 0, tail(result.stdout)
    assert metrics_epochs(run_dir) == [1, 2, 3, 4, 5, 6]


def test_two_runs_started_together_on_one_folder_one_wins(data_args, tmp_path):
    run_dir = tmp_path / "run"
    jobs = [start_train(train_args(data_args, run_dir, "train.epochs=1", f"seed={s}")) for s in (1, 2)]
    codes = sorted(job.wait(300)[0] for job in jobs)
    assert codes == [0, 1], [tail(job.output()) for job in jobs]
    assert metrics_epochs(run_dir) == [1]


def test_a_kill_during_pruning_leaves_no_half_deleted_checkpoint(data_args, tmp_path):
    run_dir = tmp_path / "run"
    args = train_args(data_args, run_dir, "checkpoint.every_steps=10", "checkpoint.keep_last=1")
    killed = run_train(args, env={"DIST_CIFAR_FAULT": "during_prune:step-00000010"}, timeout=120)
    assert killed.returncode == -signal.SIGKILL, tail(killed.stdout)
    assert steps(run_dir) == [20] and intact(checkpoint(run_dir, 20))  # step-10 renamed away whole
    assert list((run_dir / "checkpoints").glob(".del-step-00000010-*"))
    result = run_train([*args, "train.resume=auto"], timeout=180)
    assert result.returncode == 0, tail(result.stdout)
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers
    assert all(intact(p) for p in (run_dir / "checkpoints").iterdir())


# ---- 3. restarts that recover, hangs that end ----

def test_torchrun_max_restarts_recovers_from_a_killed_worker(data_args, tmp_path):
    """torchrun keeps its store across restarts; the restarted workers must not read the dead ones'
    addresses. The restarted run ends with the uninterrupted run's exact counts."""
    common = [a for a in train_args(data_args, tmp_path, "train.epochs=3", "checkpoint.every_steps=5", "seed=3")
              if not a.startswith("output_dir=")]
    straight = tmp_path / "straight"
    ref = run_train([*common, f"output_dir={straight}"], nprocs=2, timeout=300, launcher="ranks")
    assert ref.returncode == 0, tail(ref.stdout)

    run_dir = tmp_path / "restarted"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--max-restarts", "1",
           "--nproc_per_node", "2", "dist_cifar/train.py", *common, "train.resume=auto", f"output_dir={run_dir}"]
    log = tmp_path / "restart.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoints" / "step-00000010").exists():  # early in epoch 1 of 3: time to kill
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    victims = []
    for pid in conftest._descendants(proc.pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"RANK=1" in environ and b"dist_cifar/train.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
            victims.append(pid)
    assert victims, "no rank-1 worker found"
    os.kill(victims[0], signal.SIGKILL)  # still running: it would have to finish 3 epochs in these milliseconds
    try:
        code = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *conftest._descendants(proc.pid)]:
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"torchrun did not finish after the restart:\n{tail(log.read_text())}")
    output = log.read_text(errors="replace")
    assert code == 0, tail(output)
    assert "resumed from" in output, tail(output)
    assert results(run_dir)["confusion_matrix"] == results(straight)["confusion_matrix"]
    assert metrics_epochs(run_dir) == [1, 2, 3]


@pytest.mark.parametrize("how", ["stuck", "dead"])
def test_a_stuck_or_dead_rank_ends_the_job_with_one_line(how, data_args, tmp_path):
    """Ranks started one by one (every exit code seen). A stopped rank (SIGSTOP) makes the others time
    out after dist.timeout_seconds; a killed one ends them at once. Each says its rank and phase."""
    run_dir = tmp_path / "run"
    job = start_train(long_args(data_args, run_dir, "dist.timeout_seconds=15"), nprocs=2, launcher="ranks")
    job.wait_for(lambda: steps(run_dir), what="a checkpoint")
    victim = job.procs[1]
    os.kill(victim.pid, signal.SIGSTOP if how == "stuck" else signal.SIGKILL)
    started = time.monotonic()
    try:
        code = job.procs[0].wait(timeout=120)
    finally:
        victim.kill()  # (a stopped one); Popen's kill, unlike os.kill, also suits a rank that has been reaped
        victim.wait()
    took = time.monotonic() - started
    print(f"{how} rank 1: rank 0 ended {took:.1f} s later (dist.timeout_seconds=15)")
    output = job.logs[0].read_text(errors="replace")
    assert code == 1, tail(output)
    errors = [line for line in output.splitlines() if line.startswith("dist_cifar: error:")]
    assert len(errors) == 1 and "Traceback" not in output, tail(output)
    assert "rank 0 of 2" in errors[0] and "during " in errors[0], errors[0]
    if how == "stuck":
        assert "timed out" in errors[0] and 10 < took < 90, (took, errors[0])
    else:
        assert "left the process group" in errors[0] and took < 30, (took, errors[0])


# ---- 4. bookkeeping at every resume point ----

@pytest.mark.parametrize("boundary", ["last step of an epoch", "last step of the run"])
def test_resume_from_a_checkpoint_at_a_boundary_keeps_the_bookkeeping(boundary, data_args, tmp_path):
    """1,000 images, batch 16: 62 optimizer steps an epoch, 124 in all. Stopped by SIGTERM right after the
    boundary's step (its checkpoint is written before the epoch-end bookkeeping), then resumed."""
    run_dir = tmp_path / "run"
    args = train_args(data_args, run_dir, "train.epochs=2", "checkpoint.every_steps=2", "checkpoint.keep_last=3")
    step = 62 if boundary == "last step of an epoch" else 124
    stopped = run_train(args, env={"DIST_CIFAR_FAULT": f"sigterm_at:{step}"}, timeout=180)
    assert stopped.returncode == 75 and max(steps(run_dir)) == step, tail(stopped.stdout)
    assert json.loads((checkpoint(run_dir, step) / "meta.json").read_text())["test_accuracy"] is None  # mid-epoch
    result = run_train([*args, "train.resume=auto"], timeout=180)
    assert result.returncode == 0, tail(result.stdout)
    assert metrics_epochs(run_dir) == [1, 2]
    r = results(run_dir)
    assert (r["epochs"], r["steps"]) == (2, 124), r
    # One counter across step checkpoints and the two attempts (rates were 0 with step checkpoints)
    assert r["train_images"] == 124 * 16 and r["train_images_per_second"] > 0, r
    rates = [json.loads(line)["images_per_second"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the epoch whose record the resumed attempt wrote without training a step in it has no rate
    assert rates == ([None, rates[1]] if step == 62 else [rates[0], None]) and max(r or 0 for r in rates) > 0, rates
    final = json.loads((checkpoint(run_dir, 124) / "meta.json").read_text())
    assert final["epoch"] == 2 and final["test_accuracy"] == r["accuracy"]  # the epoch-end checkpoint


def test_the_last_step_of_an_epoch_is_written_once_with_its_bookkeeping(data_args, tmp_path):
    """checkpoint.every_steps=2 divides the 62-step epoch: step 62 is written once, by the epoch's end,
    with its test accuracy (it used to be written twice: first bare by the step trigger, then again)."""
    run_dir = tmp_path / "run"
    args = train_args(data_args, run_dir, "train.epochs=2", "train.eval_every_epochs=1", "checkpoint.every_steps=2")
    killed = run_train(args, env={"DIST_CIFAR_FAULT": "after_save:62"}, timeout=180)  # SIGKILL after step 62's first save
    assert killed.returncode == -signal.SIGKILL and max(steps(run_dir)) == 62, tail(killed.stdout)
    meta = json.loads((checkpoint(run_dir, 62) / "meta.json").read_text())
    assert meta["epoch"] == 1 and meta["test_accuracy"] is not None, meta
    assert metrics_epochs(run_dir) == [1]


# ---- 5. bad input, before any work, in one line ----

@pytest.fixture
def mount(tmp_path):
    """mount(options) -> a fresh tmpfs mounted with those options; unmounted after the test."""
    mounted = []

    def make(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                             text=True)
        if out.returncode != 0:
            reason = f"cannot mount a tmpfs ({out.stderr.strip()}): needs root or CAP_SYS_ADMIN"
            pytest.fail(reason) if IN_CI and os.geteuid() == 0 else pytest.skip(reason)
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def refused_before_work(result) -> str:
    line = error_line(result)
    assert "data:" not in result.stdout and "decoding" not in result.stdout, tail(result.stdout)
    return line


def test_output_dir_that_is_a_file(data_args, tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    line = refused_before_work(run_train(train_args(data_args, target), timeout=120))
    assert f"output_dir {target} exists and is not a folder" in line, line
    assert target.read_text() == "not a folder"


def test_output_dir_on_a_read_only_disk(data_args, mount):
    ro = mount("size=1m,ro")
    line = refused_before_work(run_train(train_args(data_args, ro / "run"), timeout=120))
    assert f"output_dir {ro / 'run'} is not writable" in line and "Read-only" in line, line
    assert not list(ro.iterdir())


def test_output_dir_on_a_full_disk(data_args, mount):
    full = mount("size=8m")
    stats = os.statvfs(full)
    (full / "filler").write_bytes(bytes(stats.f_bavail * stats.f_frsize))
    before = sorted(p.name for p in full.iterdir())
    line = refused_before_work(run_train(train_args(data_args, full / "run"), timeout=120))
    assert f"output_dir {full / 'run'}" in line and ("No space left" in line or "MiB free" in line), line
    assert sorted(p.name for p in full.iterdir()) == before  # no folder, no .config.yaml.tmp


def test_refused_unsafe_state_gets_one_line_of_our_own(data_args, tmp_path):
    """A checkpoint whose state.pt is a pickle that would run code (MANIFEST made to match): refused,
    the code not run, and no advice to load it unsafely."""
    run_dir = tmp_path / "run"
    done = run_train(train_args(data_args, run_dir, "train.epochs=1"), timeout=180)
    assert done.returncode == 0, tail(done.stdout)
    folder = checkpoint(run_dir, max(steps(run_dir)))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"progress": Payload()}, folder / "state.pt")
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    data = (folder / "state.pt").read_bytes()
    manifest["state.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    result = run_train(train_args(data_args, tmp_path / "other", "train.epochs=1", f"train.resume={folder}"),
                       timeout=120)
    line = error_line(result)
    assert "refused" in line and "could run code" in line, line
    assert "weights_only=False" not in result.stdout and "weights_only" not in line
    assert not marker.exists()


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path, monkeypatch):
    from PIL import Image

    from dist_cifar.config import DataConfig
    from dist_cifar.data.sources import load_dataset

    rng = np.random.default_rng(0)
    grey = {}
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                values = rng.integers(0, 65536, size=(32, 32), dtype=np.uint16)
                path = tmp_path / split / cls / f"{i}.png"
                Image.fromarray(values).save(path)
                assert Image.open(path).mode.startswith("I;16")
                grey[str(path)] = values
    monkeypatch.setenv("DIST_CIFAR_CACHE", str(tmp_path / "cache"))
    data = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path)))
    images = np.asarray(data.train.images)
    expected = sorted((values >> 8).astype(np.uint8).tobytes() for p, values in grey.items() if "/train/" in p)
    got = sorted(img[:, :, 0].tobytes() for img in images)
    assert got == expected  # each pixel the 16-bit value's high byte (clipping made 99 % of them 255)
    assert (images[..., 0] == images[..., 1]).all() and images.mean() < 160
