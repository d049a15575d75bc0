"""Classify image files with a trained model: `dist-cifar-predict CHECKPOINT PATH [PATH...] [--top-k 3] [--json]`.

PATHs are image files or folders (searched recursively). Each image is prepared exactly as in
training: decoded to RGB, resized to the run's data.image_size, normalised with its mean and std.
A file that cannot be read gets one line on stderr and the others are still classified; the exit
status is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the package importable without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from dist_cifar.state import checkpoint as ckpt
from dist_cifar.data.sources import DataError, decode_images, is_image_file
from dist_cifar.data.batches import normalize


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="dist-cifar-predict", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run's model.safetensors, or a checkpoint folder")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    parser.add_argument("--top-k", type=int, default=3, help="classes shown per image (default 3)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be at least 1")
    return args


def expand(paths: list[str], errors: list[str]) -> list[str]:
    """Files to classify, in the order given (folders: their image files, recursively, sorted)."""
    files = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            found = sorted(str(Path(root) / name) for root, _, names in os.walk(path)
                           for name in names if is_image_file(name))
            if not found:
                errors.append(f"{text}: no image files in this folder")
            files += found
        elif path.is_file():
            files.append(text)  # whatever its name: decoding decides whether it is an image
        else:
            errors.append(f"{text}: no such file or folder")
    return files


@torch.no_grad()
def classify(net, cfg, files: list[str], *, top_k: int, batch_size: int, errors: list[str]):
    """Yield (file, [(class index, probability), ...]) for each readable file, in order."""
    device = next(net.parameters()).device
    size = cfg.data.image_size
    for start in range(0, len(files), batch_size):
        batch, images = [], []
        for f in files[start : start + batch_size]:
            try:  # the training decoder: RGB, resized to image_size, no larger than data.max_image_pixels
                images.append(decode_images([f], size, cfg.data.max_image_pixels))
                batch.append(f)
            except DataError as err:
                text = str(err)
                errors.append(text if text.startswith("refused") else f"{f}: not a readable image ({text.rsplit(': ', 1)[-1]})")
        if not batch:
            continue
        x = normalize(torch.from_numpy(np.concatenate(images)).to(device), cfg.data.mean, cfg.data.std)
        if cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        probs = net(x).float().softmax(1)
        top = probs.topk(min(top_k, probs.shape[1]), dim=1)
        for f, p, i in zip(batch, top.values.tolist(), top.indices.tolist()):
            yield f, list(zip(i, p))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        net, cfg, classes = ckpt.load_model(args.checkpoint, args.device)
    except ckpt.CheckpointError as err:
        print(f"dist_cifar: error: {err}", file=sys.stderr)
        return 1
    errors: list[str] = []
    files = expand(args.paths, errors)
    for message in errors:
        print(f"dist_cifar: error: {message}", file=sys.stderr)
    reported = len(errors)
    width = max((len(f) for f in files), default=0)
    for path, top in classify(net, cfg, files, top_k=args.top_k, batch_size=args.batch_size, errors=errors):
        for message in errors[reported:]:  # unreadable files of this batch, before its results
            print(f"dist_cifar: error: {message}", file=sys.stderr)
        reported = len(errors)
        if args.json:
            print(json.dumps({"path": path, "top": [{"class": classes[i], "probability": round(p, 6)}
                                                    for i, p in top]}), flush=True)
        else:
            print(f"{path:<{width}s}  " + "  ".join(f"{classes[i]} {100 * p:5.1f} %" for i, p in top), flush=True)
    for message in errors[reported:]:
        print(f"dist_cifar: error: {message}", file=sys.stderr)
    return 1 if errors else 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
