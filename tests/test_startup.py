"""What a single-process run imports, in a fresh interpreter (`python -X importtime`), and that the
optimizer path such a run takes (torch's methods without their torch.compile wrappers, see
dist_cifar/optim.py) saves and resumes exactly."""

from __future__ import annotations

import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file

import prefork
from conftest import REPO, child_env, tail

# Loaded by a plain single-process run before this change, and not needed by one: torch's compiler stack
# (torch.optim's wrappers imported it: 2-3 CPU-s), DTensor (Accelerate's prepare(): 1.2-1.6 s), and the
# optional parts that only some runs use.
NOT_AT_START = ("torch._dynamo", "torch.distributed.tensor", "torchvision", "matplotlib", "wandb")


def fresh_run(args: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    """The trainer in a new interpreter with -X importtime; its result and the modules it imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "dist_cifar.train", *args], cwd=REPO,
                            env=child_env(), capture_output=True, text=True, timeout=300)
    names = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
             if line.startswith("import time:") and "|" in line}
    return result, names


def test_a_single_process_run_loads_no_compiler_and_resumes_exactly(data_args, tmp_path):
    run_dir, resumed = tmp_path / "run", tmp_path / "resumed"
    args = ["--config", "configs/cpu_fast.yaml", *data_args, "train.max_steps=30", "checkpoint.every_steps=10",
            "checkpoint.keep_last=3", "tracking.plots=false", "train.threads=1"]
    first, loaded = fresh_run([*args, f"output_dir={run_dir}"])
    assert first.returncode == 0, tail(first.stdout + first.stderr)
    assert {"torch", "accelerate", "dist_cifar.optim"} <= loaded  # the listing itself works
    assert sorted(loaded & set(NOT_AT_START)) == []

    shutil.copytree(run_dir, resumed)
    (resumed / "model.safetensors").unlink()
    shutil.rmtree(resumed / "checkpoints" / "step-00000030")
    second, loaded = fresh_run([*args, f"output_dir={resumed}", "train.resume=auto"])
    assert second.returncode == 0, tail(second.stdout + second.stderr)
    assert f"resumed from {resumed / 'checkpoints' / 'step-00000020'}" in second.stdout, tail(second.stdout)
    assert sorted(loaded & set(NOT_AT_START)) == []
    mine, theirs = load_file(resumed / "model.safetensors"), load_file(run_dir / "model.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_the_prefork_server_preloads_only_what_a_fresh_trainer_loads():
    """Forked trainers (tests/prefork.py) must take a fresh one's code paths: the optimizer's depends on
    whether torch._dynamo is loaded."""
    assert sorted(set(prefork.PRELOAD) & set(NOT_AT_START)) == []
