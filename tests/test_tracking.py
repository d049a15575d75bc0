"""W&B tracking for real, offline: a real Accelerator, a real wandb run written to disk and read back.

The network is the one boundary not crossed: online mode is tested without a key and against a
closed local port, where it must fall back to offline at once. Run as a script under torchrun, this
file is also the 2-rank job of test_only_the_main_process_talks_to_wandb.
"""

from __future__ import annotations

import json
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, child_env, free_port, run_train, start_train, tail
from dist_cifar.config import Config, from_dict
from dist_cifar.observe.log import MainLog

FAKE_KEY = "fake-test-key-0123456789abcdef0123456789abcdef0123"


def read_wandb_records(path: Path) -> list:
    """The records of a .wandb file: W&B's 7-byte header, then LevelDB-log records (32 KiB blocks) of
    wandb_internal_pb2.Record protobufs. wandb 0.31 ships no reader of its own for these files."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pos, block, pending = [], 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_config(records) -> dict:
    """The run's config: the run record's, then each config update (Accelerate stores it after wandb.init)."""
    config = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            updates = r.run.config.update if kind == "run" else r.config.update
            config.update({u.key: json.loads(u.value_json) for u in updates})
    return config


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


class RecordingLog(MainLog):
    """The trainer's main-process log, keeping its lines for the test to read."""

    def __init__(self, run_dir: Path):
        super().__init__(run_dir)
        self.lines: list[str] = []
        self.warnings: list[str] = []

    def print(self, *args) -> None:
        self.lines.append(" ".join(map(str, args)))

    def warn(self, message: str) -> None:
        self.warnings.append(message)


@pytest.fixture
def wandb_env(tmp_path, monkeypatch) -> Path:
    """A fake API key, and W&B's own folders (cache, staging, settings) inside the test's folder."""
    home = tmp_path / "wandb-home"
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var in ("WANDB_BASE_URL", "WANDB_MODE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    return home


def make_config(run_dir: Path, **wandb) -> Config:
    """The resolved config of a smoke run, as the trainer would hold it, with tracking settings."""
    data = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    data.update(output_dir=str(run_dir), tracking={"wandb": wandb})
    return from_dict(data)


def start(cfg: Config, run_dir: Path):
    from dist_cifar.dist.accelerator import build_accelerator
    from dist_cifar.observe.tracking import Tracker, accelerator_kwargs

    accelerator, _ = build_accelerator(cfg, **accelerator_kwargs(cfg))
    log = RecordingLog(run_dir)
    return Tracker(cfg, accelerator, run_dir, log), log


# Metrics and results as the trainer writes them (metrics.jsonl records, results.json) for 10 classes.
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
HISTORY = [{"epoch": e, "step": 31 * e, "train_loss": 2.3 - 0.2 * e, "test_accuracy": None if e == 1 else 0.1 * e,
            "lr": 0.003, "seconds": 8.0, "images_per_second": 62.0} for e in (1, 2, 3)]
CM = [[100 * (i == j) + j for j in range(10)] for i in range(10)]  # rows = true class
RESULTS = {"accuracy": 0.3, "num_eval_samples": sum(map(sum, CM)), "classes": CLASSES, "confusion_matrix": CM,
           "per_class_accuracy": {c: CM[i][i] / sum(CM[i]) for i, c in enumerate(CLASSES)}}


def test_offline_run_holds_config_metrics_and_results(wandb_env, tmp_path):
    from PIL import Image

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = make_config(run_dir, mode="offline", project="dist-cifar-test", run_name="smoke-1", tags=["test", "cpu"])
    tracker, log = start(cfg, run_dir)
    for record in HISTORY:
        tracker.log(record, step=record["step"])
    picture = run_dir / "pictures" / "confusion_matrix.png"
    picture.parent.mkdir()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(picture)
    tracker.finish(RESULTS, pictures=[picture])

    (offline,) = offline_runs(run_dir)
    assert log.warnings == []
    assert log.lines[-1] == f"wandb: offline run saved; upload it with: wandb sync {offline}"
    records = read_wandb_records(next(offline.glob("run-*.wandb")))
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "exit" in kinds  # finished cleanly

    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name, list(run.tags)) == ("dist-cifar-test", "smoke-1", ["test", "cpu"])
    config = wandb_config(records)
    assert config["data"]["train_subset"] == 5000 and config["optim"]["name"] == "adamw"  # the resolved config
    assert config["tracking"]["wandb"]["mode"] == "offline"
    assert config["launch"]["world_size"] == 1

    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({".".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
    by_step = {row["_step"]: row for row in rows if "train_loss" in row}
    assert sorted(by_step) == [31, 62, 93]
    assert by_step[62]["train_loss"] == pytest.approx(1.9) and by_step[62]["test_accuracy"] == pytest.approx(0.2)
    assert "test_accuracy" not in by_step[31]  # None values are left out, not logged as null

    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({".".join(u.nested_key) or u.key: json.loads(u.value_json) for u in r.summary.update})
    assert summary["final/test_accuracy"] == 0.3 and summary["final/num_eval_samples"] == RESULTS["num_eval_samples"]
    assert summary["final/accuracy/cat"] == pytest.approx(RESULTS["per_class_accuracy"]["cat"])

    tables = offline / "files" / "media" / "table" / "final"
    (per_class,) = [json.loads(p.read_text()) for p in tables.glob("per_class_accuracy_*.table.json")]
    assert per_class["columns"] == ["class", "accuracy", "correct", "total"]
    assert [row[0] for row in per_class["data"]] == CLASSES
    assert per_class["data"][3][1:] == [pytest.approx(RESULTS["per_class_accuracy"]["cat"]), CM[3][3], sum(CM[3])]
    (confusion,) = [json.loads(p.read_text()) for p in tables.glob("confusion_matrix_table_*.table.json")]
    assert confusion["columns"] == ["Actual", "Predicted", "nPredictions"]
    assert len(confusion["data"]) == 100 and sum(row[2] for row in confusion["data"]) == RESULTS["num_eval_samples"]
    assert ["cat", "dog", CM[3][5]] in confusion["data"]
    assert list((offline / "files" / "media" / "images").rglob("*.png"))

    # the API key is nowhere: not in the run folder, not in W&B's own folders
    for folder in (run_dir, wandb_env):
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert FAKE_KEY.encode() not in path.read_bytes(), f"API key written to {path}"


def test_online_without_an_api_key_goes_offline_at_once(wandb_env, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY")
    run_dir = tmp_path / "run"
    started = time.monotonic()
    tracker, log = start(make_config(run_dir, mode="online"), run_dir)
    tracker.log(HISTORY[0], step=31)
    tracker.close()
    assert time.monotonic() - started < 60  # no login prompt, no network wait
    assert len(log.warnings) == 1 and "no API key" in log.warnings[0] and "offline" in log.warnings[0]
    (offline,) = offline_runs(run_dir)
    assert f"wandb sync {offline}" in log.lines[-1]


def test_online_with_an_unreachable_server_goes_offline_at_once(wandb_env, tmp_path, monkeypatch):
    port = free_port()  # nothing listens there: connection refused, like a machine without network
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    run_dir = tmp_path / "run"
    started = time.monotonic()
    tracker, log = start(make_config(run_dir, mode="online"), run_dir)
    tracker.close()
    assert time.monotonic() - started < 60
    assert len(log.warnings) == 1 and f"cannot reach 127.0.0.1:{port}" in log.warnings[0]
    assert len(offline_runs(run_dir)) == 1


def test_disabled_tracking_does_nothing(wandb_env, tmp_path):
    from dist_cifar.observe.tracking import accelerator_kwargs

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = make_config(run_dir, mode="disabled")
    assert accelerator_kwargs(cfg) == {}
    tracker, log = start(cfg, run_dir)
    tracker.log(HISTORY[0], step=31)
    tracker.finish(RESULTS)
    assert tracker.run is None and log.lines == [] and not (run_dir / "wandb").exists()


def history_steps(records) -> list[int]:
    return [r.history.step.num for r in records if r.WhichOneof("record_type") == "history"]


def attempts(run_dir: Path) -> list[list]:
    """The records of each attempt's transaction log (online or offline), oldest first."""
    logs = sorted((p for p in (run_dir / "wandb").glob("*/run-*.wandb") if not p.parent.is_symlink()),
                  key=lambda p: p.parent.name)  # not latest-run, a link to the newest
    return [read_wandb_records(p) for p in logs]


def summary_of(records) -> dict:
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({".".join(u.nested_key) or u.key: json.loads(u.value_json) for u in r.summary.update})
    return summary


def test_a_resumed_training_run_continues_the_same_wandb_run_without_repeating_steps(wandb_env, tmp_path):
    """Attempt 1 logs steps 31 and 62 and is stopped; attempt 2 resumes from a checkpoint before 62,
    so it logs 62 again, then 93; attempt 3 resumes after the last epoch and only finishes."""
    run_dir = tmp_path / "run"
    cfg = make_config(run_dir, mode="offline")
    ids, lines = [], []
    for logged, exit_code in ((HISTORY[:2], 75), (HISTORY[1:], 1), ([], None)):
        tracker, log = start(cfg, run_dir)
        ids.append(tracker.run.id)
        for record in logged:
            tracker.log(record, step=record["step"])
        tracker.finish(RESULTS) if exit_code is None else tracker.close(exit_code=exit_code)
        lines.append(log.lines)
        time.sleep(1.1)  # W&B names each attempt's folder by the second it started
    assert ids[0] == ids[1] == ids[2]
    assert not any("continuing" in line for line in lines[0])
    assert f"wandb: continuing run {ids[0]} after step 62: records up to there are not logged again" in lines[1]
    assert f"wandb: continuing run {ids[0]} after step 93: records up to there are not logged again" in lines[2]

    logs = attempts(run_dir)
    assert len(logs) == 3
    assert {r.run.run_id for records in logs for r in records if r.WhichOneof("record_type") == "run"} == {ids[0]}
    assert [history_steps(records) for records in logs] == [[31, 62], [93], [94]]  # 94: the final tables
    assert summary_of(logs[-1])["final/test_accuracy"] == 0.3


def test_a_run_stopped_by_sigterm_and_requeued_is_one_wandb_run_without_repeated_steps(wandb_env, data_args,
                                                                                      tmp_path):
    """A real trainer: 3 epochs of 62 steps, checkpoints every 25 steps. Attempt 1 logs epoch 1 (step
    62) and is stopped by SIGTERM in epoch 2; its newer checkpoints are then found broken, so the
    requeued attempt resumes from step 50 and repeats step 62, which W&B must not get twice."""
    run_dir = tmp_path / "run"
    args = ["--config", "configs/smoke.yaml", *data_args, "data.train_subset=1000", "train.epochs=3",
            "train.eval_every_epochs=0", "tracking.plots=false", "train.threads=1", f"output_dir={run_dir}",
            "checkpoint.every_steps=25", "checkpoint.keep_last=10", "tracking.wandb.mode=offline",
            "train.resume=auto"]

    def checkpoints() -> list[int]:
        folder = run_dir / "checkpoints"
        return sorted(int(p.name[5:]) for p in folder.glob("step-*")) if folder.is_dir() else []

    job = start_train(args)
    job.wait_for(lambda: any(s >= 75 for s in checkpoints()), what="a checkpoint in epoch 2")
    job.procs[0].send_signal(signal.SIGTERM)
    assert job.wait(120) == [75], tail(job.output())
    stopped = max(checkpoints())
    assert 75 <= stopped < 124, checkpoints()
    for step in checkpoints():
        if step > 50:  # broken: resume=auto skips them
            state = run_dir / "checkpoints" / f"step-{step:08d}" / "state.pt"
            state.write_bytes(state.read_bytes()[:100])

    result = run_train(args, timeout=180)
    assert result.returncode == 0, tail(result.stdout)
    assert re.search(r"resumed from \S+step-00000050 at epoch 1", result.stdout), tail(result.stdout)

    (run_id,) = {(run_dir / "wandb" / "dist_cifar-run-id").read_text().strip()}
    assert f"wandb: continuing run {run_id} after step 62: records up to there are not logged again" in result.stdout
    logs = attempts(run_dir)
    assert len(logs) == 2
    assert {r.run.run_id for records in logs for r in records if r.WhichOneof("record_type") == "run"} == {run_id}
    exits = [[r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] for records in logs]
    assert exits == [[75], [0]]
    steps = [step for records in logs for step in history_steps(records)]  # in the order `wandb sync` uploads them
    assert steps == [62, 124, 186], steps  # strictly increasing: the repeated 62 was not logged again
    assert summary_of(logs[-1])["final/test_accuracy"] == json.loads((run_dir / "results.json").read_text())["accuracy"]


def test_only_the_main_process_talks_to_wandb(wandb_env, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(Path(__file__)), str(run_dir)]
    out = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]
    reports = sorted(line for line in out.stdout.splitlines() if line.startswith("rank "))
    (offline,) = offline_runs(run_dir)
    assert reports == [f"rank 0: wandb run {offline.name.rsplit('-', 1)[1]}", "rank 1: wandb run None"]
    records = read_wandb_records(next(offline.glob("run-*.wandb")))
    assert wandb_config(records)["launch"]["world_size"] == 2


def _rank_main(run_dir: Path) -> None:
    """(each rank of a torchrun job) What the trainer does with a Tracker: build, log on all ranks, finish."""
    import torch

    from dist_cifar.dist.accelerator import build_accelerator
    from dist_cifar.observe.log import NullLog
    from dist_cifar.observe.tracking import Tracker, accelerator_kwargs

    cfg = make_config(run_dir, mode="offline")
    accelerator, _ = build_accelerator(cfg, **accelerator_kwargs(cfg))
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    tracker = Tracker(cfg, accelerator, run_dir, MainLog(run_dir) if accelerator.is_main_process else NullLog(run_dir))
    print(f"rank {accelerator.process_index}: wandb run {tracker.run.id if tracker.run else None}", flush=True)
    for record in HISTORY:
        tracker.log(record, step=record["step"])
        accelerator.wait_for_everyone()  # the trainer's epoch-end collectives
    tracker.finish(RESULTS)
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


# ---- TensorBoard (tracking.tensorboard): event files read back with TensorBoard's own reader ----

def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every event file in `folder`, as TensorBoard would show them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_two_process_run_writes_its_epoch_metrics_and_per_class_accuracy_to_tensorboard(data_args, tmp_path):
    run_dir = tmp_path / "run"
    out = run_train(["--config", "configs/smoke.yaml", *data_args, "data.train_subset=400", "train.epochs=2",
                     "tracking.plots=false", "tracking.tensorboard=true", f"output_dir={run_dir}"],
                    nprocs=2, launcher="ranks")
    assert out.returncode == 0, tail(out.stdout)
    assert out.stdout.count("tensorboard: event files in") == 1  # the main process alone
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("train_loss", "test_accuracy", "lr", "images_per_second"):
        assert [(s, round(v, 4)) for s, v in scalars[key]] == [(r["step"], round(r[key], 4)) for r in metrics], key
    assert scalars["final/test_accuracy"] == [(results["steps"], pytest.approx(results["accuracy"]))]
    assert {t.split("/")[-1]: v[0][1] for t, v in scalars.items() if t.startswith("final/accuracy/")} == \
        pytest.approx(results["per_class_accuracy"])


def test_a_resumed_tensorboard_run_continues_its_event_folder_without_the_lost_steps(tmp_path):
    """Two attempts of one run, as after a requeue: the second resumes at step 2 and logs steps 3 and 4 again."""
    from accelerate import Accelerator

    from dist_cifar.observe.tracking import Tracker

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    data.update(output_dir=str(run_dir), tracking={"tensorboard": True})
    cfg = from_dict(data)
    accelerator = Accelerator(cpu=True)
    first = Tracker(cfg, accelerator, run_dir, RecordingLog(run_dir))
    for step in (1, 2, 3, 4):
        first.log({"train_loss": float(step)}, step=step)
    first.close(exit_code=75)  # stopped after step 4; the newest checkpoint is at step 2
    time.sleep(1.1)  # event file names carry the second they were opened
    second = Tracker(cfg, accelerator, run_dir, RecordingLog(run_dir), start_step=2)
    for step in (3, 4):
        second.log({"train_loss": 10.0 * step}, step=step)
    second.close()
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert tensorboard_scalars(run_dir / "tensorboard")["train_loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))
