"""The test suite's prefork server (tests/prefork.py) starts trainers that behave as fresh interpreters do:
the same weights, results and output; real exit codes, signals, sessions, environments and streams.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import prefork
from conftest import REPO, child_env, prefork_server, start_train, tail, train_command


def test_only_plain_trainer_commands_with_the_servers_start_up_environment_are_forked():
    env = child_env()
    assert prefork.forkable(train_command(["a=1"]), env, env)
    assert prefork.forkable([sys.executable, "dist_cifar/train.py", "a=1"], env, env)
    assert not prefork.forkable(train_command(["a=1"], nprocs=2), env, env)  # torchrun is a subject of its own
    assert not prefork.forkable(["dist-cifar-train", "a=1"], env, env)
    assert not prefork.forkable([sys.executable, "-m", "dist_cifar.sweep"], env, env)
    for key in ("OMP_NUM_THREADS", "PYTHONPATH", "TORCH_LOGS", "LD_PRELOAD"):
        assert not prefork.forkable(train_command(["a=1"]), {**env, key: "1"}, env), key
    assert prefork.forkable(train_command(["a=1"]), {**env, "DIST_CIFAR_FAULT": "x"}, env)


def test_a_forked_child_is_its_own_process(tmp_path):
    """Exit codes, a signal's negative code, its own session, environment, working directory, argv."""
    server = prefork_server() or pytest.skip("DIST_CIFAR_TEST_PREFORK=0")
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, os, random, sys, time\n"
        "print(json.dumps({'pid': os.getpid(), 'sid': os.getsid(0), 'cwd': os.getcwd(), 'argv': sys.argv,\n"
        "  'var': os.environ.get('PROBE_VAR'), 'random': random.random(), 'stdin': sys.stdin.read()}))\n"
        "if len(sys.argv) > 1 and sys.argv[1] == 'sleep': time.sleep(60)\n"
        "sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 0)\n")
    env = child_env({"PROBE_VAR": "seen"})
    # forkable() only accepts the trainer, so call spawn directly with a probe script in its place
    runs = [server.spawn([sys.executable, str(probe), arg], env, tmp_path, tmp_path / f"{i}.log")
            for i, arg in enumerate(["0", "3", "sleep"])]
    assert runs[0].wait(60) == 0 and runs[1].wait(60) == 3
    runs[2].send_signal(signal.SIGTERM)
    assert runs[2].wait(60) == -signal.SIGTERM
    seen = [json.loads((tmp_path / f"{i}.log").read_text().splitlines()[0]) for i in range(3)]
    for run, info in zip(runs, seen):
        assert info["pid"] == run.pid == info["sid"]  # a session leader, as start_new_session=True makes
        assert info["cwd"] == str(tmp_path) and info["var"] == "seen" and info["stdin"] == ""
        assert info["argv"][0] == str(probe)
    assert len({info["random"] for info in seen}) == 3, "children share the server's random state"
    assert "PROBE_VAR" not in os.environ


def test_a_forked_trainer_ends_exactly_as_a_fresh_interpreters(data_args, tmp_path):
    """The same run, forked and fresh: bitwise equal weights, equal results, the same log lines."""
    server = prefork_server() or pytest.skip("DIST_CIFAR_TEST_PREFORK=0")
    args = ["--config", "configs/smoke.yaml", *data_args, "data.train_subset=500", "train.epochs=2",
            "tracking.plots=false", "train.threads=1", "data.augment.flip=true"]
    forked = start_train([*args, f"output_dir={tmp_path / 'forked'}"])
    assert isinstance(forked.procs[0], prefork.ForkedProcess), prefork.startup_differences(child_env(), server.env)
    fresh = subprocess.run(train_command([*args, f"output_dir={tmp_path / 'fresh'}"]), cwd=REPO, env=child_env(),
                           capture_output=True, text=True, timeout=300)
    assert forked.wait(300) == [0], tail(forked.output())
    assert fresh.returncode == 0, tail(fresh.stdout + fresh.stderr)
    a, b = load_file(tmp_path / "forked" / "model.safetensors"), load_file(tmp_path / "fresh" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    results = [json.loads((tmp_path / name / "results.json").read_text()) for name in ("forked", "fresh")]
    assert results[0]["accuracy"] == results[1]["accuracy"]
    assert results[0]["per_class_accuracy"] == results[1]["per_class_accuracy"]

    def accuracy_lines(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("Accuracy ")]

    assert accuracy_lines(forked.output()) == accuracy_lines(fresh.stdout) != []
