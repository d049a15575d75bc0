"""One real training run (configs/smoke.yaml on 500 CIFAR-10 JPEGs), shared by the tests that read a finished run.

`smoke_run(tmp_path_factory, data_args)` trains it the first time it is asked for in a session
(about 10-30 s on 2 cores) and returns the same run folder afterwards, whichever test module asks.
"""

from __future__ import annotations

from pathlib import Path

from conftest import run_train, tail


def smoke_run(tmp_path_factory, data_args: list[str]) -> Path:
    run_dir = tmp_path_factory.getbasetemp() / "smoke-run"
    if not (run_dir / "results.json").is_file():
        out = run_train(["--config", "configs/smoke.yaml", *data_args, "data.train_subset=500",
                         f"output_dir={run_dir}"], timeout=300)
        assert out.returncode == 0, tail(out.stdout)
    return run_dir
