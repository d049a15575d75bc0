"""Evaluate a trained model on a test split: `dist-cifar-evaluate CHECKPOINT [--data-root DIR] [--output FILE]`.

CHECKPOINT is a run's model.safetensors or a checkpoint folder. Runs on one process or under
`accelerate launch` / `torchrun` on N: every rank evaluates its shard, the counts are summed once,
and the main process prints the per-class table and writes the results JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the package importable without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from dist_cifar import checkpoint as ckpt
from dist_cifar.config import DATA_ENV, ConfigError, from_dict, to_dict
from dist_cifar.data import DataError, load_dataset
from dist_cifar.evaluate import confusion_matrix, per_class_table, summarize
from dist_cifar.models import build_model
from dist_cifar.runtime import MainLog, NullLog, RunError, build_accelerator, versions


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="dist-cifar-evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run's model.safetensors, or a checkpoint folder")
    parser.add_argument("--data-root", help=f"the data (default: ${DATA_ENV}, else the checkpoint's data.root)")
    parser.add_argument("--data-name", choices=("imagefolder", "cifar10"),
                        help="layout of --data-root (default: imagefolder if it has train/ and test/ folders)")
    parser.add_argument("--output", default="results.json", help="results JSON written by the main process")
    parser.add_argument("--batch-size", type=int, help="images per process per batch (default: the run's eval_batch_size)")
    parser.add_argument("--tta-level", type=int, choices=(0, 1, 2), help="test-time augmentation (default: the run's)")
    return parser.parse_args(argv)


def data_source(args, saved: dict) -> tuple[str, str]:
    """(data.name, data.root): the command line, then $DIST_CIFAR_DATA, then the checkpoint's config."""
    root = args.data_root or os.environ.get(DATA_ENV)
    if root is None:
        return args.data_name or saved["data"]["name"], saved["data"]["root"]
    guessed = "imagefolder" if (Path(root) / "test").is_dir() else "cifar10"
    return args.data_name or guessed, root


def evaluate_checkpoint(args) -> dict:
    """(all ranks) Exact accuracy of the checkpoint on the test split; the main process reports it."""
    state, saved, classes = ckpt.load_weights(args.checkpoint)
    name, root = data_source(args, saved)
    saved = dict(saved, data=dict(saved["data"], name=name, root=root, train_subset=0))
    cfg = from_dict(saved)
    accelerator, info = build_accelerator(cfg, warn=lambda m: print(f"dist_cifar: warning: {m}", file=sys.stderr)
                                          if int(os.environ.get("RANK", "0")) == 0 else None)
    log = MainLog() if accelerator.is_main_process else NullLog()

    data = load_dataset(cfg.data, seed=cfg.seed)
    if data.classes != classes:
        raise DataError(f"{args.checkpoint} was trained on classes {classes}, but {data.source} has {data.classes}")
    net = build_model(cfg.model, len(classes), cfg.data.image_size)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise ckpt.CheckpointError(f"{args.checkpoint} does not fit a {cfg.model.name} model: "
                                   f"{str(err).splitlines()[0]}") from None
    if cfg.model.channels_last:
        net = net.to(memory_format=torch.channels_last)
    net.to(accelerator.device)

    cm = confusion_matrix(net, data.test, len(classes), accelerator=accelerator,
                          batch_size=args.batch_size or cfg.train.eval_batch_size, mean=cfg.data.mean,
                          std=cfg.data.std, tta_level=cfg.train.tta_level if args.tta_level is None else args.tta_level,
                          channels_last=cfg.model.channels_last)
    summary = summarize(cm, classes)
    results = dict(summary, classes=classes, checkpoint=str(Path(args.checkpoint).resolve()), data=data.source,
                   model=cfg.model.name, world_size=info["world_size"], backend=info["backend"],
                   device=info["device"], mixed_precision=info["mixed_precision"], config=to_dict(cfg),
                   versions=versions())
    log.print(per_class_table(summary))
    output = Path(args.output)
    if accelerator.is_main_process:
        output.parent.mkdir(parents=True, exist_ok=True)
        MainLog(output.parent).write_json(output.name, results)
    log.print(f"results in {output}")
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        print("dist_cifar: error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        evaluate_checkpoint(args)
        return 0
    except ConfigError as err:
        print(f"dist_cifar: error: the config saved in {args.checkpoint} is not valid here: {err}", file=sys.stderr)
        return 1
    except (DataError, ckpt.CheckpointError, RunError) as err:
        print(f"dist_cifar: error: {err}", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
