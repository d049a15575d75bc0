"""Checkpoint files: atomic full-state checkpoints with a manifest, retention, and safe loading.

A checkpoint is a folder `checkpoints/step-00001234/` holding
  model.safetensors  the weights, with the config and class names in its metadata (no Accelerate needed)
  state.pt           optimizer, scheduler, grad scaler, weight averages, progress, every rank's RNG state;
                     loadable with torch.load(weights_only=True)
  meta.json          step, epoch, accuracy, world size, versions
  MANIFEST.json      size and sha256 of the three files above, written last
It is written under a hidden temporary name and renamed into place only when complete, so a crash
at any moment leaves the earlier checkpoints as they were.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import zipfile
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from dist_cifar import faults
from dist_cifar.config import ConfigError, from_dict
from dist_cifar.errors import CheckpointError
from dist_cifar.models import build_model

FILES = ("model.safetensors", "state.pt", "meta.json")
PREFIX = "step-"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_metadata(config: dict, classes: list[str]) -> dict[str, str]:
    return {"format": "dist_cifar", "config": json.dumps(config), "classes": json.dumps(classes)}


def _write_bytes(path: Path, data: bytes) -> None:
    # Serialised in memory and written here, so a full disk is an OSError naming the cause; torch.save
    # and safetensors writing to the file themselves raise RuntimeError ("unexpected pos 576 vs 534")
    # or SafetensorError instead.
    with open(path, "wb") as f:
        f.write(data)


def save_weights(path: Path, state_dict: dict, config: dict, classes: list[str]) -> None:
    """Weights plus the config and class names, as one safetensors file."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    _write_bytes(path, safetensors_bytes(tensors, metadata=model_metadata(config, classes)))


def load_weights(path: str | os.PathLike, *, check_manifest: bool = True) -> tuple[dict, dict, list[str]]:
    """(state_dict, config dict, class names) from a model.safetensors file or a checkpoint folder: the one
    reader of model files (evaluate, predict, resume, the sweep's runs). A file inside a checkpoint folder
    is first checked against the folder's MANIFEST.json. Every failure (missing, unreadable, damaged,
    foreign, without dist_cifar's metadata) is a CheckpointError of one line naming the file."""
    path = Path(path)
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise CheckpointError(f"no model weights in the folder {path} (expected {path / 'model.safetensors'}: "
                                  f"give a run folder, a checkpoint folder or a model.safetensors file)")
        path = path / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"no model weights at {path}" + ("" if path.exists() else " (no such file)"))
    if check_manifest and (path.parent / "MANIFEST.json").is_file():
        problem = manifest_problem(path.parent, path.name)
        if problem:
            raise CheckpointError(f"cannot use model weights {path}: {problem}")
    try:
        with open(path, "rb"):  # safetensors calls a permission error "No such file or directory"
            pass
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except OSError as err:
        raise CheckpointError(f"cannot read model weights {path}: {err.strerror or _first_line(err)}") from None
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise CheckpointError(f"cannot read model weights {path}: not a readable safetensors file "
                              f"({_first_line(err)})") from None
    if meta.get("format") != "dist_cifar":
        raise CheckpointError(f"{path} is not a dist_cifar model file (no config and class names in it)")
    try:
        config, classes = json.loads(meta["config"]), json.loads(meta["classes"])
    except (KeyError, ValueError) as err:  # ValueError: json.JSONDecodeError
        raise CheckpointError(f"{path} is damaged: its saved config or class names do not parse "
                              f"({type(err).__name__}: {_first_line(err)})") from None
    if not isinstance(config, dict) or not isinstance(classes, list) or not classes \
            or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{path} is damaged: its saved config is not a mapping or its class names not a "
                              f"list of names")
    return state, config, classes


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(network in eval mode on `device`, its Config, class names) from a model.safetensors file or a
    checkpoint folder: the one way predict, evaluate, resume and the tests rebuild a trained model.
    CheckpointError, one line naming the file, when it is missing, not a model, or does not fit."""
    state, saved, classes = load_weights(path)
    try:
        cfg = from_dict(saved)
    except ConfigError as err:
        raise CheckpointError(f"the config saved in {path} is not valid here: {_first_line(err)}") from None
    except Exception as err:  # a config of the wrong shape (a list where a section should be, ...)
        raise CheckpointError(f"the config saved in {path} is damaged: {type(err).__name__}: {_first_line(err)}") from None
    try:
        net = build_model(cfg.model, len(classes), cfg.data.image_size)
    except Exception as err:
        raise CheckpointError(f"the model saved in {path} cannot be built: {type(err).__name__}: {_first_line(err)}") from None
    try:
        net.load_state_dict(state)
    except RuntimeError as err:  # names the first missing, unexpected or mis-shaped tensor
        raise CheckpointError(f"{path} does not fit a {cfg.model.name} model: {_first_line(err)}") from None
    if cfg.model.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net.to(device).eval(), cfg, classes


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def write_checkpoint(checkpoints_dir: Path, step: int, *, model_state: dict, state: dict, meta: dict,
                     config: dict, classes: list[str]) -> Path:
    """(main process only) Write one checkpoint atomically; returns its folder."""
    final = checkpoints_dir / f"{PREFIX}{step:08d}"
    try:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=checkpoints_dir))
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint {final}: {err.strerror or err}") from None
    try:
        save_weights(tmp / "model.safetensors", model_state, config, classes)
        faults.hit("during_save", step)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        _write_bytes(tmp / "state.pt", buffer.getbuffer())
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        manifest = {}
        for name in FILES:
            _fsync(tmp / name)
            manifest[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
        (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / "MANIFEST.json")
        if final.exists():  # the same step saved again (e.g. the end of a resumed run): swap it out
            old = checkpoints_dir / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(checkpoints_dir)
        faults.hit("after_save", step)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {final}: {err.strerror or err}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def verify(folder: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
    if not (folder / "MANIFEST.json").is_file():
        return "no MANIFEST.json (incomplete)"
    for name in FILES:
        problem = manifest_problem(folder, name)
        if problem:
            return problem
    return None


def manifest_problem(folder: Path, name: str) -> str | None:
    """None if folder/name has the size and sha256 that folder/MANIFEST.json records, else what differs."""
    try:
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        entry = manifest.get(name)
        if entry is None:
            return f"{name} is not in MANIFEST.json"
        expected_bytes, expected_sha = int(entry["bytes"]), str(entry["sha256"])
    except OSError as err:
        return f"MANIFEST.json unreadable ({err.strerror or type(err).__name__})"
    except (ValueError, AttributeError, KeyError, TypeError):  # not JSON, or not the manifest's shape
        return "MANIFEST.json unreadable (damaged)"
    path = folder / name
    if not path.is_file():
        return f"{name} missing"
    try:
        size = path.stat().st_size
        if size != expected_bytes:
            return f"{name} is {size} bytes, the manifest says {expected_bytes}"
        if _sha256(path) != expected_sha:
            return f"{name} checksum differs from the manifest (corrupt)"
    except OSError as err:
        return f"{name} unreadable ({err.strerror or type(err).__name__})"
    return None


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Checkpoint folders, newest step first (temporary and hidden folders excluded)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def find_latest(checkpoints_dir: Path, warn=print) -> Path | None:
    """The newest complete checkpoint; broken ones are skipped with a warning, never deleted."""
    for folder in list_checkpoints(checkpoints_dir):
        problem = verify(folder)
        if problem is None:
            return folder
        warn(f"skipping checkpoint {folder}: {problem}")
    return None


def read_checkpoint(folder: Path) -> tuple[dict, dict, dict]:
    """(model state_dict, full state, meta) of a verified checkpoint; CheckpointError naming the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint not found: {folder}")
    problem = verify(folder)
    if problem:
        raise CheckpointError(f"checkpoint {folder} is unusable: {problem}")
    model_state, _, _ = load_weights(folder / "model.safetensors", check_manifest=False)  # verified just now
    state = load_state(folder / "state.pt")
    meta = json.loads((folder / "meta.json").read_text())
    return model_state, state, meta


def load_state(path: Path) -> dict:
    """torch.load(weights_only=True) of a state.pt, with one line of our own when it is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive: this is something else
            raise CheckpointError(f"cannot read {path}: not a state file written by torch.save") from None
        # torch's message suggests weights_only=False: never follow that for a file of unknown origin.
        raise CheckpointError(f"refused {path}: it holds Python objects other than tensors and plain data, "
                              f"and loading those could run code; dist_cifar never writes such a file") from None
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read {path}: {first}") from None


def load_optimizer_state(optimizer, saved: dict, folder: Path) -> None:
    """optimizer.load_state_dict, refusing (CheckpointError naming state.pt) state that does not fit.

    torch matches saved state to parameters by position and checks only the group sizes, so a
    checkpoint from code that groups or orders the parameters differently would load and then fail
    deep inside the first optimizer step (or, worse, train on with the wrong moments).
    """
    where = Path(folder) / "state.pt"
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"the optimizer state in {where} does not fit this run: {err}") from None
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.dim() and value.shape != p.shape:
                    raise CheckpointError(
                        f"the optimizer state in {where} does not fit this run: {name} of shape "
                        f"{tuple(value.shape)} for a parameter of shape {tuple(p.shape)} (the parameters "
                        f"are grouped or ordered differently from the code that wrote it)")


def prune(checkpoints_dir: Path, keep_last: int) -> None:
    """(main process only, after a save) Keep the newest `keep_last` complete checkpoints and the most accurate one;
    remove the half-written folders of earlier, killed processes."""
    folders = [f for f in list_checkpoints(checkpoints_dir) if verify(f) is None]
    keep = set(folders[:keep_last])
    scored = []
    for f in folders:
        acc = json.loads((f / "meta.json").read_text()).get("test_accuracy")
        if acc is not None:
            scored.append((acc, f.name, f))
    if scored:
        keep.add(max(scored)[2])
    for f in folders:
        if f not in keep:
            remove(f)
    # Half-written or half-deleted folders of processes that died mid-save or mid-prune: the run holds
    # its folder's lock and has just finished its own save, so any left are stale. They are never
    # chosen for a resume, only taking space.
    for stale in [*checkpoints_dir.glob(".tmp-*"), *checkpoints_dir.glob(".old-*"), *checkpoints_dir.glob(".del-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def remove(folder: Path) -> None:
    """Delete a checkpoint so that a kill at any moment leaves it whole or gone: rename it to a hidden
    name first (one atomic step), then delete that."""
    doomed = folder.with_name(f".del-{folder.name}-{os.getpid()}")
    try:
        os.replace(folder, doomed)
    except OSError:
        return
    faults.hit("during_prune", folder.name)
    shutil.rmtree(doomed, ignore_errors=True)

