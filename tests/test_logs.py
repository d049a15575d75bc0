"""A log a person can read: a real 10-epoch run with its output in a file (as under SLURM) writes
plain progress lines now and then, never a carriage return, and stays small."""

from __future__ import annotations

import re

from conftest import start_train, tail


def test_a_ten_epoch_log_off_a_terminal_is_small_and_plain(data_args, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--config", "configs/smoke.yaml", *data_args, "data.train_subset=1000", "train.epochs=10",
            "train.eval_every_epochs=0", "tracking.plots=false", "train.threads=1", f"output_dir={run_dir}"]
    # stdout and stderr go to a file: not a terminal. A line every 0.5 s forces several in a short run.
    job = start_train(args, env={"DIST_CIFAR_PROGRESS_SECONDS": "0.5"})
    assert job.wait(300) == [0], tail(job.output())
    raw = job.logs[0].read_bytes()
    text = raw.decode()

    returns = raw.count(b"\r")
    assert returns == 0, f"{returns} carriage returns in {len(raw)} bytes: a redrawn bar (train.py not on progress_bar?)"
    assert len(raw) < 100_000, f"{len(raw)} bytes of log"
    progress = [line for line in text.splitlines() if re.match(r"epoch \d+/10  step \d+/620 \(\d+%\)", line)]
    assert len(progress) >= 3, text[-3000:]
    assert len({line.split()[1] for line in progress}) >= 2, "progress lines from one epoch only"
    assert all(" elapsed " in line for line in progress)
    assert progress[-1].startswith("epoch 10/10  step 620/620 (100%)")  # the closing line
    print(f"log: {len(raw)} bytes, {len(text.splitlines())} lines, {len(progress)} progress lines")
