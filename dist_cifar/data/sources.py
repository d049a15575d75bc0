"""Datasets as compact uint8 arrays: torchvision CIFAR-10 or an image folder, decoded once into a cache."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_cifar.config import DataConfig
from dist_cifar.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
CACHE_VERSION = 1


@dataclass
class Split:
    images: np.ndarray  # N x H x W x 3 uint8 (possibly a read-only memory map shared by all local ranks)
    labels: np.ndarray  # N int64
    paths: list[str] | None = None  # image folders: each image's file, relative to the data root

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    train: Split
    test: Split
    classes: list[str]
    source: str  # where it came from, for the run log


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("DIST_CIFAR_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dist_cifar"


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_image_folder(split_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted sub-folders) and (file, class index) pairs of one split."""
    if not split_dir.is_dir():
        raise DataError(f"image folder split not found: {split_dir} (expected {split_dir}/<class>/<image files>)")
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {split_dir} (expected {split_dir}/<class>/<image files>)")
    files = []
    for index, name in enumerate(classes):
        entries = sorted((e for e in os.scandir(split_dir / name) if e.is_file() and is_image_file(e.name)),
                         key=lambda e: e.name)
        if not entries:
            raise DataError(f"class folder has no images: {split_dir / name}")
        files += [(e.path, index) for e in entries]
    return classes, files


def _fingerprint(files: list[tuple[str, int]], image_size: int) -> str:
    digest = hashlib.sha1(f"v{CACHE_VERSION} size={image_size}".encode())
    for path, label in files:
        st = os.stat(path)
        digest.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def to_rgb8(img, path):
    """An 8-bit RGB copy of a PIL image. High-bit-depth images are scaled, never clipped: PIL's own
    convert("RGB") clips a 16-bit grey value of 40,000 to 255, turning a normal picture almost white."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit grey (PNG, TIFF), or PIL's 32-bit int mode
        values = np.asarray(img).astype(np.int64)
        if img.mode == "I" and values.max(initial=0) <= 255:
            grey = values  # an 8-bit image that PIL widened
        elif values.min(initial=0) >= 0 and values.max(initial=0) <= 65535:
            grey = values >> 8
        else:
            raise DataError(f"cannot read image {path}: {img.mode} pixel values outside 0..65535")
        img = Image.fromarray(grey.astype(np.uint8))
    elif img.mode == "F":  # 32-bit float grey: only the 0..1 convention is unambiguous
        values = np.asarray(img)
        if not (np.isfinite(values).all() and values.min(initial=0) >= 0 and values.max(initial=0) <= 1):
            raise DataError(f"cannot read image {path}: floating-point pixels outside 0..1 (convert it to 8 bits)")
        img = Image.fromarray(np.round(values * 255).astype(np.uint8))
    return img.convert("RGB")


MAX_IMAGE_PIXELS = DataConfig.max_image_pixels  # PIL's own default: above it, PIL warns of a decompression bomb


def _decode(args: tuple[list[str], int, int]) -> np.ndarray:
    """(a decoding worker, or the caller) The images of `paths`, RGB, resized; DataError naming a bad file.

    Image.open reads only the header, so the pixel count is checked before any pixel is decoded: a
    small file that claims 15,000 x 15,000 pixels (a decompression bomb) costs nothing to refuse. PIL's
    own check, a warning at its limit and an error at twice it, is replaced by this one line."""
    from PIL import Image

    paths, size, max_pixels = args
    out = np.empty((len(paths), size, size, 3), np.uint8)
    pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        for i, path in enumerate(paths):
            try:
                with Image.open(path) as img:
                    width, height = img.size
                    if width * height > max_pixels:
                        raise DataError(
                            f"refused image {path}: {width:,} x {height:,} = {width * height:,} pixels is more than "
                            f"data.max_image_pixels={max_pixels} (a guard against decompression bombs; raise it "
                            f"if your images really are that large)")
                    img = to_rgb8(img, path)
                    if img.size != (size, size):
                        img = img.resize((size, size), Image.BILINEAR)
                    out[i] = np.asarray(img)
            except DataError:
                raise
            except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, struct.error... for damaged files
                raise DataError(f"cannot read image {path}: {err.__class__.__name__}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit
    return out


def decode_images(paths: list[str], size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode image files into one N x size x size x 3 uint8 array, on all available cores; DataError
    (one line naming the file) for the first file that cannot be read or is larger than `max_pixels`."""
    if not paths:
        return np.empty((0, size, size, 3), np.uint8)
    workers = max(1, min(len(os.sched_getaffinity(0)), 16, len(paths) // 2000))
    chunk = -(-len(paths) // (workers * 4))
    jobs = [(paths[i : i + chunk], size, max_pixels) for i in range(0, len(paths), chunk)]
    if workers == 1:
        return np.concatenate([_decode(job) for job in jobs])
    from concurrent.futures import ProcessPoolExecutor  # multiprocessing: only when decoding
    from concurrent.futures.process import BrokenProcessPool

    try:
        with ProcessPoolExecutor(workers) as pool:
            return np.concatenate(list(pool.map(_decode, jobs)))  # a worker's DataError is raised here, as it is
    except BrokenProcessPool:
        raise DataError(f"an image decoding worker died while decoding {len(paths)} images from "
                        f"{os.path.dirname(os.path.dirname(paths[0]))} (out of memory?)") from None


def _load_cached(folder: Path) -> tuple[Split, Split, list[str]]:
    meta = json.loads((folder / "meta.json").read_text())
    splits = [
        Split(np.load(folder / f"{name}_images.npy", mmap_mode="r"), np.load(folder / f"{name}_labels.npy"))
        for name in ("train", "test")
    ]
    return splits[0], splits[1], meta["classes"]


def load_image_folder(cfg: DataConfig) -> Dataset:
    root = Path(cfg.root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data folder not found: {root} (data.root; expected {root}/train/<class>/ and {root}/test/<class>/)")
    classes, train_files = list_image_folder(root / "train")
    test_classes, test_files = list_image_folder(root / "test")
    if test_classes != classes:
        raise DataError(f"class folders differ between {root / 'train'} and {root / 'test'}: {classes} vs {test_classes}")
    key = _fingerprint(train_files + test_files, cfg.image_size)
    base = cache_root(cfg)
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the data cache folder {base}: {err.strerror} (set data.cache_dir)") from None
    folder = base / f"imagefolder-{key}"
    # One process decodes; the others (local ranks, other jobs) block on the lock, then read its result.
    with open(base / f"imagefolder-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "meta.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".imagefolder-{key}-", dir=base))
            try:
                for name, files in (("train", train_files), ("test", test_files)):
                    np.save(tmp / f"{name}_images.npy", decode_images([f for f, _ in files], cfg.image_size,
                                                                      cfg.max_image_pixels))
                    np.save(tmp / f"{name}_labels.npy", np.array([c for _, c in files], np.int64))
                meta = {"classes": classes, "root": str(root), "image_size": cfg.image_size, "version": CACHE_VERSION}
                (tmp / "meta.json").write_text(json.dumps(meta))
                os.replace(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    train, test, classes = _load_cached(folder)
    # The listing is the cache's key, in the cache's order: it names each cached image's file.
    train.paths, test.paths = ([os.path.relpath(f, root) for f, _ in files] for files in (train_files, test_files))
    return Dataset(train, test, classes, f"imagefolder {root} (cache {folder})")


CIFAR10_HELP = (
    "pass data.download=true to download it (about 170 MB), or point data.name=imagefolder "
    "data.root=DIR (or the DIST_CIFAR_DATA environment variable) at an image-folder copy"
)


def load_cifar10(cfg: DataConfig) -> Dataset:
    import torchvision

    root = Path(cfg.root).expanduser()
    splits = []
    for train in (True, False):
        try:
            ds = torchvision.datasets.CIFAR10(str(root), train=train, download=cfg.download)
        except RuntimeError as err:
            raise DataError(f"CIFAR-10 not found under {root} ({err}); {CIFAR10_HELP}") from None
        except OSError as err:  # e.g. no network during a download
            raise DataError(f"cannot download CIFAR-10 into {root}: {err}; {CIFAR10_HELP}") from None
        splits.append(Split(np.ascontiguousarray(ds.data), np.asarray(ds.targets, np.int64)))
        classes = list(ds.classes)
    return Dataset(splits[0], splits[1], classes, f"torchvision CIFAR-10 at {root}")


def subset(split: Split, n: int, seed: int) -> Split:
    """A seeded draw of n images (kept in their original order)."""
    if n > len(split):
        raise DataError(f"data.train_subset={n} is larger than the training set ({len(split)} images)")
    index = np.sort(np.random.default_rng(seed).choice(len(split), n, replace=False))
    paths = None if split.paths is None else [split.paths[i] for i in index]
    return Split(np.ascontiguousarray(split.images[index]), split.labels[index], paths)


def load_dataset(cfg: DataConfig, seed: int = 0) -> Dataset:
    ds = load_image_folder(cfg) if cfg.name == "imagefolder" else load_cifar10(cfg)
    size = ds.train.images.shape[1]
    if cfg.name == "cifar10" and size != cfg.image_size:
        raise DataError(f"data.image_size={cfg.image_size} but CIFAR-10 images are {size}x{size}")
    if cfg.train_subset:
        ds.train = subset(ds.train, cfg.train_subset, seed)
    return ds
