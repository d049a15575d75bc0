"""Evaluate a trained model on a test split: `dist-cifar-evaluate MODEL [--out FILE] [--predictions FILE]`.

MODEL is a run's model.safetensors or a checkpoint folder. The results JSON goes next to the model
(MODEL's folder/evaluation.json; a checkpoint folder: into it), or to --out; the training run's own
results.json is never touched, and the last line printed says where it went. Runs on one process
or on N, each evaluating its shard; the counts are summed once and the main process prints the
per-class table and writes the JSON. --predictions writes one CSV row per test image, in test-set
order (index, path, label, prediction, confidence; with --top-k K the top K classes and probabilities),
gathered from every process once: the same bytes from any number of processes.

    dist-cifar-evaluate runs/X/model.safetensors --predictions runs/X/test-predictions.csv --top-k 3
    torchrun --nproc_per_node 2 -m dist_cifar.evaluate_cli runs/X/model.safetensors
    accelerate launch --config_file launch/cpu_multi.yaml --num_processes 2 -m dist_cifar.evaluate_cli runs/X/model.safetensors
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the package importable without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from dist_cifar.state import checkpoint as ckpt
from dist_cifar.config import DATA_ENV, data_layout, to_dict
from dist_cifar.data.sources import DataError, load_dataset
from dist_cifar.engine.evaluation import evaluate, per_class_table, predictions_csv, summarize
from dist_cifar.dist.accelerator import build_accelerator
from dist_cifar.dist.exit import run_and_leave, run_in_group
from dist_cifar.errors import RunError
from dist_cifar.observe.log import MainLog, NullLog
from dist_cifar.versions import versions

EVALUATION_NAME = "evaluation.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="dist-cifar-evaluate", description=__doc__.splitlines()[0],
                                     epilog="\n".join(__doc__.splitlines()[2:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="MODEL", help="a run's model.safetensors, or a checkpoint folder")
    parser.add_argument("--data-root", help=f"the data (default: ${DATA_ENV}, else the model's data.root)")
    parser.add_argument("--data-name", choices=("imagefolder", "cifar10"),
                        help="layout of --data-root (default: imagefolder if it has train/ or test/ folders, "
                             "else cifar10)")
    parser.add_argument("--out", "--output", dest="out", metavar="FILE",
                        help=f"where the main process writes the results JSON (default: {EVALUATION_NAME} "
                             f"next to MODEL, replacing an earlier one there)")
    parser.add_argument("--batch-size", type=int, help="images per process per batch (default: the run's eval_batch_size)")
    parser.add_argument("--tta-level", type=int, choices=(0, 1, 2), help="test-time augmentation (default: the run's)")
    parser.add_argument("--predictions", metavar="FILE",
                        help="also write every test image's prediction to this CSV file (main process)")
    parser.add_argument("--top-k", type=int, default=0, metavar="K",
                        help="with --predictions: also the top K classes and their probabilities per image")
    return parser.parse_args(argv)


def output_path(args) -> Path:
    """--out, else evaluation.json beside the model file (inside a checkpoint folder)."""
    if args.out:
        return Path(args.out)
    model = Path(args.checkpoint)
    return (model if model.is_dir() else model.parent) / EVALUATION_NAME


def data_source(args, cfg) -> tuple[str, str]:
    """(data.name, data.root): the command line, then $DIST_CIFAR_DATA, then the model's config."""
    root = args.data_root or os.environ.get(DATA_ENV)
    if root is None:
        return args.data_name or cfg.data.name, cfg.data.root
    return args.data_name or data_layout(root), root


def evaluate_checkpoint(args) -> dict:
    """(all ranks) Exact accuracy of the model on the test split; the main process reports it."""
    net, cfg, classes = ckpt.load_model(args.checkpoint)
    cfg.data.name, cfg.data.root = data_source(args, cfg)
    cfg.data.train_subset = 0
    batch_size = args.batch_size or cfg.train.eval_batch_size
    accelerator, info = build_accelerator(cfg, warn=lambda m: print(f"dist_cifar: warning: {m}", file=sys.stderr)
                                          if int(os.environ.get("RANK", "0")) == 0 else None, batch_size=batch_size)
    log = MainLog() if accelerator.is_main_process else NullLog()

    data = load_dataset(cfg.data, seed=cfg.seed)
    if data.classes != classes:
        raise DataError(f"{args.checkpoint} was trained on classes {classes}, but {data.source} has {data.classes}")
    net.to(accelerator.device)

    cm, predictions, _ = evaluate(net, data.test, len(classes), accelerator=accelerator, batch_size=batch_size,
                               mean=cfg.data.mean, std=cfg.data.std,
                               tta_level=cfg.train.tta_level if args.tta_level is None else args.tta_level,
                               channels_last=cfg.model.channels_last,
                               top_k=max(1, args.top_k) if args.predictions else 0)
    summary = summarize(cm, classes)
    results = dict(summary, classes=classes, checkpoint=str(Path(args.checkpoint).resolve()), data=data.source,
                   model=cfg.model.name, world_size=info["world_size"], backend=info["backend"],
                   device=info["device"], mixed_precision=info["mixed_precision"], config=to_dict(cfg),
                   versions=versions())
    log.print(per_class_table(summary))
    output = output_path(args)
    if accelerator.is_main_process:  # (only on the main process) the files; the other ranks are done
        if predictions is not None:
            write_file(Path(args.predictions), "predictions", predictions_csv(predictions, classes, data.test.paths,
                                                                              top_k=args.top_k))
        write_file(output, "results", None, results)
    if predictions is not None:
        log.print(f"predictions of {len(predictions)} images written to {args.predictions}")
    log.print(f"evaluation written to {output}")
    return results


def write_file(path: Path, what: str, text: str | None, data: dict | None = None) -> None:
    """(main process) Write the CSV `text` or the JSON `data` to `path` atomically; RunError naming it when it cannot."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is not None:
            MainLog(path.parent).write_text(path.name, text)
        else:
            MainLog(path.parent).write_json(path.name, data)
    except OSError as err:
        raise RunError(f"cannot write the {what} to {path}: {err.strerror or err}") from None


def main(argv=None) -> int:
    """Evaluate as the command line says; the exit code (0 done, 1 error, 2 usage error)."""
    args = parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        print("dist_cifar: error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    if args.top_k < 0 or (args.top_k and not args.predictions):
        print("dist_cifar: error: --top-k K needs --predictions FILE and K >= 1", file=sys.stderr)
        return 2
    def work() -> int:
        try:
            evaluate_checkpoint(args)
            return 0
        except (DataError, ckpt.CheckpointError, RunError) as err:
            print(f"dist_cifar: error: {err}", file=sys.stderr)
            return 1
    return run_in_group(work)


def cli() -> None:
    """Leave the way the trainer does (dist_cifar/dist/exit.py): after a process group, without interpreter
    shutdown, which can race a gloo worker thread and abort a finished evaluation."""
    run_and_leave(main)


if __name__ == "__main__":
    cli()
