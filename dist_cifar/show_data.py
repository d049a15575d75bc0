"""Look at the data a config trains on: `dist-cifar-show-data --config FILE [key.sub=value ...] --out grid.png`.

Saves a grid of a seeded draw of training (or test) images, each titled with its class, as the
training run would load them (same data source, image size and train_subset).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the package importable without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from dist_cifar.config import ConfigError, load_config
from dist_cifar.data.sources import DataError, load_dataset
from dist_cifar.observe.plots import write_data_grid


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="dist-cifar-show-data", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML run config (configs/*.yaml); defaults apply without one")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--n", type=int, default=32, help="number of images (default 32)")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--seed", type=int, default=0, help="which images are drawn")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    if args.n < 1:
        parser.error("--n must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        data = load_dataset(cfg.data, seed=cfg.seed)
    except ConfigError as err:
        print(f"dist_cifar: config error: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"dist_cifar: error: {err}", file=sys.stderr)
        return 1
    split = data.train if args.split == "train" else data.test
    # a draw, not the first n: image-folder splits are sorted by class
    index = np.sort(np.random.default_rng(args.seed).choice(len(split), min(args.n, len(split)), replace=False))
    size = split.images.shape[1]
    title = f"{len(index)} of {len(split)} {args.split} images ({size}x{size}), {data.source.split(' (cache')[0]}"
    try:
        out = write_data_grid(args.out, split.images[index], split.labels[index], data.classes, title=title)
    except OSError as err:
        print(f"dist_cifar: error: cannot write {args.out}: {err.strerror or err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
