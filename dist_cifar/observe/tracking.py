"""Experiment tracking through Accelerate's tracker API: one Weights & Biases run per training run, and
TensorBoard event files in run_dir/tensorboard/ (tracking.tensorboard; no account, `tensorboard --logdir`).

Every rank builds a `Tracker`; only the main process talks to W&B, the others hold a tracker that
does nothing. Mode `online` never blocks on a login prompt or a dead network: without an API key,
or when the server cannot be reached, the run is written offline under run_dir/wandb/ and the log
says which `wandb sync DIR` uploads it later.

A training run stopped and resumed (a SLURM requeue) is one W&B run: the id is kept in the run
folder, and a step some earlier attempt already gave W&B is not logged again. A resumed run repeats
the steps after its checkpoint; W&B keeps every record of an offline run and `wandb sync` uploads
each attempt in turn, so without this the synced history would hold those steps twice.

TensorBoard keeps one event folder per training run as well: each attempt adds an event file to it, and
a resumed attempt starts its file with purge_step (its checkpoint's step + 1), so TensorBoard's reader
drops what an earlier attempt logged after that checkpoint (lost work, logged again).
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import secrets
import socket
import struct
import urllib.parse
from pathlib import Path

from accelerate import Accelerator

from dist_cifar.config import Config, to_dict
from dist_cifar.errors import RunError

INIT_TIMEOUT_S = 30.0  # longest wait for an online W&B run to start before logging offline instead
PROBE_TIMEOUT_S = 3.0  # TCP connect to the W&B server, before trying an online run
RUN_ID_FILE = "dist_cifar-run-id"  # in run_dir/wandb/: a resumed training run continues the same W&B run
TENSORBOARD_DIR = "tensorboard"  # in run_dir: the event folder of every attempt of the run


def accelerator_kwargs(cfg: Config) -> dict:
    """(all ranks) Accelerator(...) arguments for tracking: pass them to dist.accelerator.build_accelerator."""
    return {} if cfg.tracking.wandb.mode == "disabled" else {"log_with": "wandb"}


def _base_url() -> str:
    import wandb

    return os.environ.get("WANDB_BASE_URL") or wandb.setup().settings.base_url


def _has_credentials(base_url: str) -> bool:
    """Whether W&B can authenticate without asking: the places `wandb login` and wandb.init look."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urllib.parse.urlparse(base_url).hostname
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        return bool(host and netrc.netrc(path).authenticators(host))
    except (OSError, netrc.NetrcParseError):
        return False


def _unreachable(base_url: str) -> str | None:
    """Why the W&B server cannot be reached (DNS, TCP), or None. Behind a proxy, W&B's own timeout decides."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return None
    url = urllib.parse.urlparse(base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        return f"cannot reach {url.hostname}:{port} ({err.strerror or err.__class__.__name__})"
    return None


def _run_id(run_dir: Path) -> str:
    """The W&B run id of this training run, kept in its folder so a resumed run continues the same W&B run."""
    path = run_dir / "wandb" / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    run_id = secrets.token_hex(4)  # W&B ids: lowercase letters and digits
    path.write_text(run_id + "\n")
    return run_id


def _last_logged_step(run_dir: Path, run_id: str) -> int:
    """The highest history step in this run's transaction logs under run_dir/wandb/ (every attempt,
    online or offline), or -1. A log cut short (an attempt killed) counts up to where it is readable."""
    from wandb.proto import wandb_internal_pb2 as pb

    last = -1
    for path in (run_dir / "wandb").glob(f"*/run-{run_id}.wandb"):  # latest-run/ too: a link to one of them
        try:
            data = path.read_bytes()
        except OSError:
            continue
        # W&B's 7-byte header, then LevelDB-log records in 32 KiB blocks: crc32 (4), length (2),
        # kind (1: whole, 2: first, 3: middle, 4: last piece) and the piece of a Record protobuf.
        pos, block, pending = 7, 32768, b""
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # too little room left in the block for a header: padding
                pos += block - pos % block
                continue
            _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0 or pos + 7 + length > len(data):  # zero fill, or cut short
                break
            piece, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            pending = piece if kind in (1, 2) else pending + piece
            if kind in (1, 4):
                record = pb.Record()
                try:
                    record.ParseFromString(pending)
                except Exception:  # protobuf's DecodeError: a damaged record ends what can be read
                    break
                if record.WhichOneof("record_type") == "history":
                    last = max(last, record.history.step.num)
    return last


def _tensorboard(run_dir: Path, cfg: Config, start_step: int):
    """(only on the main process) Accelerate's TensorBoard tracker on run_dir/tensorboard/, the config as text."""
    import yaml
    from accelerate.tracking import TensorBoardTracker

    tracker = TensorBoardTracker(TENSORBOARD_DIR, str(run_dir), purge_step=start_step + 1 if start_step else None)
    tracker.start()
    # add_hparams (Accelerate's store_init_configuration) wants a flat dict and writes a run folder of its own
    tracker.writer.add_text("config", "    " + yaml.safe_dump(to_dict(cfg), sort_keys=False).replace("\n", "\n    "),
                            global_step=start_step)
    return tracker


class Tracker:
    """(all ranks) Sends the resolved config, per-epoch metrics and final results to W&B and TensorBoard
    (main process only). `start_step`: the step the run starts or resumes from."""

    def __init__(self, cfg: Config, accelerator: Accelerator, run_dir: Path, log, start_step: int = 0):
        self.accelerator, self._log = accelerator, log
        self.tensorboard = None  # Accelerate's TensorBoardTracker, on the main process with tracking.tensorboard
        if cfg.tracking.tensorboard:
            if importlib.util.find_spec("tensorboard") is None:  # (all ranks) every rank stops, none waits
                raise RunError("tracking.tensorboard=true needs the tensorboard package: "
                               "pip install 'dist_cifar[tensorboard]' (or pip install tensorboard)")
            if accelerator.is_main_process:
                self.tensorboard = _tensorboard(Path(run_dir), cfg, start_step)
                log.print(f"tensorboard: event files in {Path(run_dir) / TENSORBOARD_DIR} "
                          f"(tensorboard --logdir {Path(run_dir) / TENSORBOARD_DIR})")
        self.run = None  # the wandb Run, on the main process of a tracked run
        self.offline_dir: Path | None = None  # the offline run folder, for `wandb sync`
        self.earlier_step = -1  # the highest step earlier attempts gave this W&B run: not logged again
        self.last_step: int | None = None  # the highest step this attempt logged
        wb = cfg.tracking.wandb
        if wb.mode == "disabled" or not accelerator.is_main_process:
            return
        if not any(str(t) == "wandb" for t in accelerator.log_with):
            raise RunError("tracking.wandb.mode is on but the Accelerator has no wandb tracker: build it with "
                           "build_accelerator(cfg, **tracking.accelerator_kwargs(cfg)) (is wandb installed?)")
        import wandb

        run_dir = Path(run_dir)
        mode = wb.mode
        if mode == "online":
            base_url = _base_url()
            if not _has_credentials(base_url):
                problem = "no API key (set WANDB_API_KEY or run `wandb login`)"
            else:
                problem = _unreachable(base_url)
            if problem:
                log.warn(f"wandb: {problem}: logging this run offline instead")
                mode = "offline"
        run_id = _run_id(run_dir)
        self.earlier_step = _last_logged_step(run_dir, run_id)  # read before this attempt writes its own log
        init = dict(dir=str(run_dir), id=run_id, resume="allow", name=wb.run_name or run_dir.name,
                    tags=list(wb.tags) or None, entity=wb.entity or None)
        try:
            self._start(wb.project, cfg, mode, init)
        except wandb.errors.Error as err:
            if mode != "online":
                raise
            log.warn(f"wandb: cannot start an online run ({str(err).splitlines()[0]}): logging offline instead")
            # init_trackers registered the tracker before starting it: drop the one that failed, and
            # restart W&B's service process, which still holds the run id
            accelerator.trackers = [t for t in accelerator.trackers if t.name != "wandb"]
            wandb.teardown()
            mode = "offline"
            self._start(wb.project, cfg, mode, init)
        self.run = accelerator.get_tracker("wandb", unwrap=True)
        # A resumed online run starts at the server's next step (W&B itself drops records below it).
        self.earlier_step = max(self.earlier_step, getattr(self.run, "starting_step", 0) - 1)
        if self.earlier_step >= 0:
            log.print(f"wandb: continuing run {self.run.id} after step {self.earlier_step}: "
                      f"records up to there are not logged again")
        if mode == "offline":
            self.offline_dir = Path(getattr(self.run.settings, "sync_dir", None) or Path(self.run.dir).parent)
            log.print(f"wandb: offline run {self.run.id} in {self.offline_dir}")
        else:
            log.print(f"wandb: run {self.run.id} at {self.run.url}")

    def _start(self, project: str, cfg: Config, mode: str, init: dict) -> None:
        import wandb

        # silent: W&B's banner and end-of-run summary would bury the trainer's own lines; this class
        # prints where the run is. init_timeout bounds the wait for a slow server.
        settings = wandb.Settings(silent=True, init_timeout=INIT_TIMEOUT_S)
        config = dict(to_dict(cfg), launch={"world_size": self.accelerator.num_processes,
                                            "device": str(self.accelerator.device),
                                            "mixed_precision": self.accelerator.mixed_precision})
        self.accelerator.init_trackers(project, config=config,
                                       init_kwargs={"wandb": dict(init, mode=mode, settings=settings)})

    def log(self, metrics: dict, step: int) -> None:
        """(all ranks; main process logs) One record of numbers at optimizer step `step`; None values are left out."""
        values = {k: v for k, v in metrics.items() if v is not None}
        if self.tensorboard is not None:  # its purge_step already dropped what an earlier attempt logged after here
            self.tensorboard.log(values, step=step)
        if self.run is None or step <= self.earlier_step:
            return  # an earlier attempt logged this step: a resumed run repeats the work after its checkpoint
        self.accelerator.log(values, step=step)  # the W&B tracker only: TensorBoard is not among accelerator.trackers
        self.last_step = max(step, self.last_step or 0)

    def finish(self, results: dict, pictures: list[Path] = ()) -> None:
        """(all ranks; main process logs) Final accuracy, per-class table, confusion matrix, pictures; ends the run."""
        if self.tensorboard is not None:
            self._finish_tensorboard(results, pictures)
        if self.run is None:
            self.close()
            return
        import wandb

        classes = results["classes"]
        cm = results["confusion_matrix"]  # rows = true class, columns = predicted
        per_class = wandb.Table(columns=["class", "accuracy", "correct", "total"], data=[
            [name, results["per_class_accuracy"][name], cm[i][i], sum(cm[i])] for i, name in enumerate(classes)])
        # The chart wandb.plot.confusion_matrix draws, built from the counts instead of per-sample predictions.
        confusion = wandb.plot_table(
            "wandb/confusion_matrix/v1",
            wandb.Table(columns=["Actual", "Predicted", "nPredictions"],
                        data=[[t, p, cm[i][j]] for i, t in enumerate(classes) for j, p in enumerate(classes)]),
            {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
            {"title": f"Confusion matrix ({results['num_eval_samples']} test images)"})
        values = {"final/per_class_accuracy": per_class, "final/confusion_matrix": confusion}
        values.update({f"pictures/{Path(p).stem}": wandb.Image(str(p)) for p in pictures})
        # At the last step when this attempt logged it (the same row), else one after it: never at or
        # below a step an earlier attempt logged, nor at W&B's own step count, which starts at 0 offline.
        self.accelerator.log(values, step=self.earlier_step + 1 if self.last_step is None else self.last_step)
        self.run.summary.update({"final/test_accuracy": results["accuracy"],
                                 "final/num_eval_samples": results["num_eval_samples"],
                                 **{f"final/accuracy/{k}": v for k, v in results["per_class_accuracy"].items()}})
        self.close()

    def _finish_tensorboard(self, results: dict, pictures) -> None:
        """(only on the main process) The final accuracy, per class too, and the pictures, at the run's last step."""
        import numpy as np
        from PIL import Image

        step = results.get("steps") or 0
        cm = results["confusion_matrix"]
        self.tensorboard.log({"final/test_accuracy": results["accuracy"],
                              **{f"final/accuracy/{k}": v for k, v in results["per_class_accuracy"].items()}}, step=step)
        table = "| true \\ predicted | " + " | ".join(results["classes"]) + " |\n|" + " --- |" * (len(cm) + 1) + "\n"
        table += "".join(f"| {name} | " + " | ".join(map(str, row)) + " |\n" for name, row in zip(results["classes"], cm))
        self.tensorboard.writer.add_text("final/confusion_matrix", table, global_step=step)
        images = {f"pictures/{Path(p).stem}": np.asarray(Image.open(p).convert("RGB")) for p in pictures}
        if images:
            self.tensorboard.log_images(images, step=step, dataformats="HWC")

    def close(self, exit_code: int = 0) -> None:
        """(all ranks) End the W&B run; a non-zero exit_code (failure, preemption) marks it as not finished cleanly."""
        if self.tensorboard is not None:
            tensorboard, self.tensorboard = self.tensorboard, None
            tensorboard.finish()  # flushes and closes the event file
        if self.run is None:
            return
        run, self.run = self.run, None
        # Not accelerator.end_training(): that also destroys the process group, which the trainer owns.
        run.finish(exit_code=exit_code)
        # finish() can return before W&B's service process has written the run file (measured with
        # wandb 0.31: sometimes only its 7-byte header was on disk); teardown waits for the service to close.
        import wandb

        wandb.teardown()
        if self.offline_dir is not None:
            self._log.print(f"wandb: offline run saved; upload it with: wandb sync {self.offline_dir}")
