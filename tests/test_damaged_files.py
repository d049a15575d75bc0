"""Damaged and hostile files end in one line, never a traceback: every command that reads weights
(evaluate, predict, resume, the sweep) on every kind of broken model file or checkpoint folder, and an
image folder holding a decompression bomb."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import save_file

from conftest import REPO, child_env
from smoke_run import smoke_run

# Without these capabilities root obeys file modes like anyone else: a mode-000 file is refused (EACCES).
NO_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []


def damage_metadata(data: bytes, what: bytes) -> bytes:
    """The file with one byte of its header changed, the header still JSON but the config or class names
    saved inside it not: `"airplane",` becomes `"airplane";` (same length, so every offset still holds)."""
    assert data.count(what) == 1, what
    return data.replace(what, what[:-1] + b";")


def png_claiming(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header claims width x height pixels: a decompression bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def make_cases(run_dir: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """{case: (the path a command is given, what its one line must say: one of the |-separated texts)}, each a
    broken copy of the run's model."""
    from dist_cifar.state.checkpoint import load_weights, save_weights

    model = (run_dir / "model.safetensors").read_bytes()
    checkpoint = sorted((run_dir / "checkpoints").iterdir())[-1]
    state, config, classes = load_weights(run_dir / "model.safetensors")
    cases = {}

    def file_case(name: str, data: bytes, expect: str) -> None:
        path = root / name / "model.safetensors"
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        cases[name] = (path, expect)

    def checkpoint_case(name: str, expect: str, change) -> None:
        folder = root / name / checkpoint.name
        shutil.copytree(checkpoint, folder)
        change(folder)
        cases[name] = (folder, expect)

    # ---- a checkpoint folder: the manifest catches what the reader would have tripped over ----
    checkpoint_case("checkpoint-header-damaged", "checksum differs from the manifest", lambda f: (
        f / "model.safetensors").write_bytes(damage_metadata(model, b'\\"airplane\\",')))
    checkpoint_case("checkpoint-truncated", "bytes, the manifest says", lambda f: (
        f / "model.safetensors").write_bytes(model[: len(model) // 2]))
    checkpoint_case("checkpoint-manifest-damaged", "MANIFEST.json unreadable", lambda f: (
        f / "MANIFEST.json").write_text('{"model.safetensors": {"bytes": 12'))
    checkpoint_case("checkpoint-without-model", "no model weights in the folder|model.safetensors missing", lambda f: (
        f / "model.safetensors").unlink())
    # ---- a model file on its own (no manifest): the reader itself ----
    file_case("header-damaged", damage_metadata(model, b'\\"airplane\\",'), "do not parse")
    file_case("config-damaged", damage_metadata(model, b'\\"seed\\":'), "do not parse")
    file_case("truncated", model[: len(model) // 2], "not a readable safetensors file")
    file_case("empty", b"", "not a readable safetensors file")
    file_case("not-safetensors", (REPO / "docs" / "training_curves.png").read_bytes()[:5000],
              "not a readable safetensors file")
    path = root / "no-metadata" / "model.safetensors"
    path.parent.mkdir()
    save_file(state, str(path))  # a good safetensors file, but not one of ours
    cases["no-metadata"] = (path, "is not a dist_cifar model file")
    for name, saved, expect in (("config-invalid", {**config, "model": {**config["model"], "name": "vgg"}},
                                 "is not valid here"),
                                ("config-wrong-shape", {**config, "data": [1, 2]}, "the config saved in")):
        path = root / name / "model.safetensors"
        path.parent.mkdir()
        save_weights(path, state, saved, classes)
        cases[name] = (path, expect)
    first = next(iter(state))
    path = root / "wrong-shapes" / "model.safetensors"
    path.parent.mkdir()
    save_weights(path, {**state, first: state[first][:1]}, config, classes)
    cases["wrong-shapes"] = (path, "does not fit a tutorial_net model")
    (root / "empty-folder").mkdir()
    cases["empty-folder"] = (root / "empty-folder", "no model weights in the folder")
    cases["missing"] = (root / "missing.safetensors", "no such file")
    file_case("permission-denied", model, "Permission denied")
    cases["permission-denied"][0].chmod(0)
    return cases


COMMANDS = {  # which cases each command is given: every one to evaluate, a sample to the others
    "evaluate": None,
    "predict": ["header-damaged", "permission-denied"],
    "resume": ["checkpoint-header-damaged", "checkpoint-manifest-damaged", "checkpoint-without-model"],
    "sweep": ["checkpoint-header-damaged"],
}
CASE_NAMES = ["checkpoint-header-damaged", "checkpoint-truncated", "checkpoint-manifest-damaged",
              "checkpoint-without-model", "header-damaged", "config-damaged", "truncated", "empty", "not-safetensors",
              "no-metadata", "config-invalid", "config-wrong-shape", "wrong-shapes", "empty-folder", "missing",
              "permission-denied"]


def command_line(command: str, path: Path, data_args: list[str], data_root: Path, out: Path) -> list[str]:
    py = [sys.executable, "-m"]
    if command == "evaluate":
        return [*py, "dist_cifar.evaluate_cli", str(path), "--data-root", str(data_root), "--out", str(out / "e.json")]
    if command == "predict":
        return [*py, "dist_cifar.predict", str(path), str(data_root / "test" / "cat" / "0000.jpg")]
    run = ["--config", "configs/smoke.yaml", *data_args, "tracking.plots=false", f"train.resume={path}"]
    if command == "resume":
        return [*py, "dist_cifar.train", *run, f"output_dir={out / 'run'}"]
    return [*py, "dist_cifar.sweep", "--seeds", "0", "--out", str(out / "sweep"), *run]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, data_args, data_root) -> dict:
    """Every (command, case) run at once (they are mostly Python start-up), as CompletedProcesses."""
    run_dir = smoke_run(tmp_path_factory, data_args)
    cases = make_cases(run_dir, tmp_path_factory.mktemp("broken"))
    jobs = [(c, name) for c, names in COMMANDS.items() for name in (names or CASE_NAMES)]

    def run(job):
        command, name = job
        path, _ = cases[name]
        out = tmp_path_factory.mktemp(f"{command}-{name}")
        cmd = command_line(command, path, data_args, data_root, out)
        if name == "permission-denied":
            cmd = NO_DAC + cmd
        return subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)

    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(jobs, pool.map(run, jobs)))
    return {job: (cases[job[1]], result) for job, result in results.items()}


@pytest.mark.parametrize("command, case", [(c, name) for c, names in COMMANDS.items() for name in (names or CASE_NAMES)])
def test_a_broken_model_ends_in_one_line_naming_it(outcomes, command, case):
    (path, expect), out = outcomes[(command, case)]
    assert out.returncode != 0
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    lines = out.stderr.splitlines()
    errors = [line for line in lines if line.startswith("dist_cifar: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], out.stderr[-3000:]
    assert str(path) in errors[0] and any(e in errors[0] for e in expect.split("|")), errors[0]


# ---- images: a decompression bomb, and the limit ----

def tiny_image_folder(data_root: Path, folder: Path) -> Path:
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (folder / split / name).mkdir(parents=True)
            for src in sorted((data_root / split / name).iterdir())[:3]:
                shutil.copy(src, folder / split / name)
    return folder


def test_a_decompression_bomb_in_an_image_folder_is_refused_in_one_line(data_root, tmp_path):
    folder = tiny_image_folder(data_root, tmp_path / "images")
    bomb = folder / "train" / "dog" / "huge.png"
    bomb.write_bytes(png_claiming(15000, 15000))  # 225 million pixels: PIL's DecompressionBombError
    cmd = [sys.executable, "-m", "dist_cifar.train", "--config", "configs/smoke.yaml", "data.name=imagefolder",
           f"data.root={folder}", "data.train_subset=0", f"data.cache_dir={tmp_path / 'cache'}",
           "tracking.plots=false", f"output_dir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.splitlines() == [
        f"dist_cifar: error: refused image {bomb}: 15,000 x 15,000 = 225,000,000 pixels is more than "
        f"data.max_image_pixels=89478485 (a guard against decompression bombs; raise it if your images really "
        f"are that large)"]


def test_the_decoding_pool_hands_its_workers_refusal_on(data_root, tmp_path):
    """4,000 files: decoded by a pool of worker processes (two or more cores); a bomb among them is the same one line."""
    from dist_cifar.data.sources import DataError, decode_images

    warn_size = tmp_path / "warns.png"  # above PIL's limit, below twice it: PIL would only warn, then decode 300 MB
    warn_size.write_bytes(png_claiming(10000, 10000))
    image = str(data_root / "test" / "cat" / "0000.jpg")
    with pytest.raises(DataError, match=f"^refused image {warn_size}: 10,000 x 10,000 = 100,000,000 pixels"):
        decode_images([image] * 3999 + [str(warn_size)], 32)
    assert decode_images([image] * 3, 32).shape == (3, 32, 32, 3)
    with pytest.raises(DataError, match=r"32 x 32 = 1,024 pixels is more than data.max_image_pixels=1000 "):
        decode_images([image], 32, max_pixels=1000)
