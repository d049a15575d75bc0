"""Elastic resume on real gloo groups: a run killed (SIGKILL) mid-epoch continues on another number of
processes with the same global batch, from the same sample, and trains on exactly the samples the
uninterrupted run trains on, step by step (the trainer's test-only ledger, DIST_CIFAR_LEDGER).

Each run: tutorial_net, 600 real CIFAR-10 images, global batch 12 (50 optimizer steps an epoch),
2 epochs, augmented, SGD; 10-30 s each, most of it starting Python and torch. SGD, because AdamW
divides each update by the gradient's own scale and so turns last-bit differences of near-zero
gradients into whole-step ones (measured 2026-11-28, uninterrupted runs, this config with AdamW lr
0.001: largest weight difference 1.4e-6 between 1 and 2 processes, 0.037 between 2 and 3, accuracy
18.51 / 18.51 / 18.31 %); with SGD 2 and 3 processes differ by 1.6e-7 and agree on accuracy.

That float-order difference does not always stay small: a max-pool or ReLU that sits on a near tie can
route one step's gradient differently, and the runs drift apart from there (2026-11-29: resumed 3 -> 2 at
step 20, the weights were within 3e-8 of the uninterrupted 2-process run's up to step 37, 2e-6 at step
38, 0.06 at step 100, accuracy 16.03 against 16.94 %; resumed at steps 15, 25 or 30, 1e-7 at the end).
Which step a killed run resumes from depends on the machine's load, so the state carried over is compared
five steps after the resume, where only float order separates a correct resume from the uninterrupted run,
and a state that was not carried over (weights, momentum, lr, position) already shows by orders of
magnitude. The samples themselves are compared exactly, step by step, for the whole run.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_train, start_train, tail
from test_resume import checkpoint

STEPS_PER_EPOCH = 50
TOTAL_STEPS = 100


def elastic_args(data_args, run_dir, *extra) -> list[str]:
    return ["--config", "configs/smoke.yaml", *data_args, "data.train_subset=600", "train.epochs=2",
            "train.global_batch_size=12", "train.per_device_batch_size=null", "data.augment.flip=true",
            "data.augment.crop_padding=2", "checkpoint.every_steps=5", "checkpoint.keep_last=100",
            "optim.name=sgd", "optim.lr=0.05", "train.eval_every_epochs=0", "tracking.plots=false",
            "train.threads=1", "train.resume=auto",
            f"output_dir={run_dir}", *extra]


def ledger(folder: Path, up_to: int | None = None) -> dict[int, list[int]]:
    """Optimizer step -> the sorted sample indices all ranks trained on in it (steps up to `up_to`: a
    killed attempt's last steps may be cut off on some ranks); checks that ranks and micro-steps never
    trained on one sample twice within a step, and that every step has its 12 samples."""
    steps: dict[int, list[int]] = defaultdict(list)
    for path in folder.glob("rank*.jsonl"):
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines):
            try:
                record = json.loads(line)
            except ValueError:  # a line cut off by SIGKILL: only ever the last one
                assert n == len(lines) - 1, f"{path}: line {n + 1} is not JSON"
                continue
            if up_to is None or record["step"] <= up_to:
                steps[record["step"]].extend(record["indices"])
    for step, indices in steps.items():
        assert len(indices) == len(set(indices)) == 12, f"step {step}: {len(indices)} samples, duplicates or missing"
    return {step: sorted(indices) for step, indices in steps.items()}


def checkpoint_steps(run_dir: Path) -> list[int]:
    folder = run_dir / "checkpoints"
    return sorted(int(p.name[5:]) for p in folder.iterdir() if re.fullmatch(r"step-\d{8}", p.name)) if folder.is_dir() else []


def accuracy(run_dir: Path) -> float:
    return json.loads((run_dir / "results.json").read_text())["accuracy"]


def max_weight_difference(a: Path, b: Path) -> float:
    mine, theirs = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert mine.keys() == theirs.keys()
    return max(float((mine[k].double() - theirs[k].double()).abs().max()) for k in mine)


def max_momentum_difference(a: Path, b: Path) -> float:
    """Largest difference between the SGD momentum buffers of two checkpoint folders."""
    mine, theirs = (torch.load(folder / "state.pt", weights_only=True)["optimizer"]["state"] for folder in (a, b))
    assert mine.keys() == theirs.keys() and mine
    return max(float((mine[i]["momentum_buffer"].double() - theirs[i]["momentum_buffer"].double()).abs().max())
               for i in mine)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_args) -> tuple[Path, dict]:
    """Two processes, never interrupted."""
    root = tmp_path_factory.mktemp("elastic-ref")
    result = run_train(elastic_args(data_args, root / "run"), nprocs=2, env={"DIST_CIFAR_LEDGER": str(root / "ledger")},
                       timeout=300, launcher="ranks")
    assert result.returncode == 0, tail(result.stdout)
    steps = ledger(root / "ledger")
    assert sorted(steps) == list(range(1, TOTAL_STEPS + 1))
    return root / "run", steps


def killed_mid_epoch(data_args, root: Path, nprocs: int, after: int = 15, extra=()) -> Path:
    """A run of `nprocs` processes, SIGKILLed (every process) once it has a checkpoint at step `after` or
    later (15: mid-way through epoch 1). Returns its run folder; its ledger is root/ledger-1."""
    run_dir = root / "run"
    job = start_train(elastic_args(data_args, run_dir, *extra), nprocs=nprocs,
                      env={"DIST_CIFAR_LEDGER": str(root / "ledger-1")}, launcher="ranks")
    job.wait_for(lambda: any(s >= after for s in checkpoint_steps(run_dir)), timeout=240,
                 what=f"a checkpoint at step {after}")
    job.kill()
    job.wait(60)
    return run_dir


def resume_on(data_args, killed: Path, root: Path, nprocs: int, written_by: int, reference, epoch: int = 1,
              extra=()) -> str:
    """Copy the killed run, continue it on `nprocs` processes; check samples, accuracy and the log line."""
    reference_dir, reference_steps = reference
    run_dir = root / f"resumed-on-{nprocs}"
    shutil.copytree(killed, run_dir)
    result = run_train(elastic_args(data_args, run_dir, *extra), nprocs=nprocs,
                       env={"DIST_CIFAR_LEDGER": str(root / f"ledger-on-{nprocs}")}, timeout=300, launcher="ranks")
    assert result.returncode == 0, tail(result.stdout)
    found = re.search(rf"resumed from \S+ at epoch {epoch}, step (\d+); resumed on (\d+) process(?:es)? from a checkpoint "
                      r"written by (\d+)", result.stdout)
    assert found, tail(result.stdout)
    resumed_step = int(found[1])
    assert (int(found[2]), int(found[3])) == (nprocs, written_by)
    first_step = (epoch - 1) * STEPS_PER_EPOCH
    assert first_step < resumed_step < first_step + STEPS_PER_EPOCH, f"resumed at step {resumed_step}: not mid-epoch"

    first, second = ledger(killed.parent / "ledger-1", up_to=resumed_step), ledger(root / f"ledger-on-{nprocs}")
    assert min(second) == resumed_step + 1 and max(second) == TOTAL_STEPS, sorted(second)[:3]
    combined = {**{s: v for s, v in first.items() if s <= resumed_step}, **second}
    differ = [s for s in range(1, TOTAL_STEPS + 1) if combined.get(s) != reference_steps[s]]
    assert not differ, f"steps whose samples differ from the uninterrupted run's: {differ[:10]}"

    # five steps after the resume (checkpoints every 5 steps, all kept): only float order may differ
    after = resumed_step + 5
    mine, theirs = checkpoint(run_dir, after), checkpoint(reference_dir, after)
    weights, momentum = max_weight_difference(mine, theirs), max_momentum_difference(mine, theirs)
    print(f"\nresumed {written_by} -> {nprocs} processes at step {resumed_step}: at step {after} the weights differ "
          f"from the uninterrupted run's by up to {weights:.3g} and the momentum by {momentum:.3g}; at the end "
          f"{max_weight_difference(run_dir, reference_dir):.3g}, accuracy {100 * accuracy(run_dir):.2f} % vs "
          f"{100 * accuracy(reference_dir):.2f} %")
    assert weights < 1e-5 and momentum < 1e-4, (
        f"step {after}: weights differ by up to {weights}, momentum by {momentum} from the uninterrupted run's "
        f"(float order alone: ~1e-7)")
    metrics = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [1, 2], metrics
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["world_size"], results["global_batch_size"], results["steps"]) == (nprocs, 12, TOTAL_STEPS)
    return result.stdout


def test_two_processes_resume_on_one_and_on_three(reference, data_args, tmp_path):
    killed = killed_mid_epoch(data_args, tmp_path, nprocs=2)
    resume_on(data_args, killed, tmp_path, nprocs=1, written_by=2, reference=reference)
    resume_on(data_args, killed, tmp_path, nprocs=3, written_by=2, reference=reference)


def test_three_processes_resume_on_two(reference, data_args, tmp_path):
    killed = killed_mid_epoch(data_args, tmp_path, nprocs=3)
    resume_on(data_args, killed, tmp_path, nprocs=2, written_by=3, reference=reference)


def test_loader_pipeline_resumed_in_epoch_two_on_another_world_size(reference, data_args, tmp_path):
    """The DataLoader pipeline (Accelerate's loader, 2 workers) gives the device pipeline's samples, also
    when a run killed in its second epoch resumes on another world size (Accelerate's loader counts its
    own passes as the sampler's epoch: a resumed epoch used to replay epoch 1's order)."""
    loader = ["data.pipeline=loader"]
    killed = killed_mid_epoch(data_args, tmp_path, nprocs=2, after=65, extra=loader)
    resume_on(data_args, killed, tmp_path, nprocs=1, written_by=2, reference=reference, epoch=2, extra=loader)


def test_another_global_batch_is_refused_before_training(reference, data_args, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    result = run_train(elastic_args(data_args, run_dir, "train.global_batch_size=24"), timeout=120)
    assert result.returncode == 1, tail(result.stdout)
    errors = [line for line in result.stdout.splitlines() if line.startswith("dist_cifar: error:")]
    assert len(errors) == 1 and "were 12 images, now 24" in errors[0], tail(result.stdout)
    assert "Traceback" not in result.stdout


@pytest.mark.parametrize("extra, env, message", [
    (["train.per_device_batch_size=5"], {}, "train.global_batch_size=12 means 12 images per process on 1 process "
                                            "x train.grad_accum_steps=1, but train.per_device_batch_size=5: set one of them "
                                            "(the other to null)"),
    (["train.grad_accum_steps=5"], {}, "train.global_batch_size=12 does not split evenly over 1 process x "
                                       "train.grad_accum_steps=5: use a multiple of 5"),
    ([], {"WORLD_SIZE": "5", "RANK": "0", "LOCAL_RANK": "0"},
     "train.global_batch_size=12 does not split evenly over 5 processes x train.grad_accum_steps=1: "
     "use a multiple of 5"),
])
def test_a_global_batch_that_does_not_split_is_one_line(data_args, tmp_path, extra, env, message):
    """Named before any process group, data or model exists: nothing is written."""
    run_dir = tmp_path / "run"
    result = run_train(elastic_args(data_args, run_dir, *extra), env=env, timeout=120)
    assert result.returncode == 2, tail(result.stdout)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines == [f"dist_cifar: config error: {message}"], tail(result.stdout)
    assert not run_dir.exists()
