"""Exact distributed evaluation: per-rank confusion counts, summed over ranks once, divided last; and the
per-image predictions, gathered once, in test-set order."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dist_cifar.data.batches import eval_batches, eval_shard
from dist_cifar.data.sources import Split


def predict_logits(model, x: torch.Tensor, tta_level: int = 0) -> torch.Tensor:
    """Logits, optionally averaged over test-time augmentations (1: mirror; 2: mirror and 1-pixel shifts)."""
    logits = model(x)
    if tta_level == 0:
        return logits
    logits = 0.5 * logits + 0.5 * model(x.flip(3))
    if tta_level == 1:
        return logits
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    h, w = x.shape[2:]
    up_left, down_right = padded[:, :, :h, :w], padded[:, :, 2:, 2:]
    shifted = 0.25 * sum(model(v) for v in (up_left, up_left.flip(3), down_right, down_right.flip(3)))
    return 0.5 * logits + 0.5 * shifted


@dataclass
class Predictions:
    """Every test image's true class and its top classes (best first) with their softmax probabilities,
    in test-set order: row i is image i of the split."""
    labels: torch.Tensor  # N int64
    top_classes: torch.Tensor  # N x K int64
    top_probs: torch.Tensor  # N x K float32

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def accuracy(self) -> float:
        return float((self.top_classes[:, 0] == self.labels).double().mean()) if len(self) else 0.0


@torch.no_grad()
def evaluate(model, split: Split, num_classes: int, *, accelerator, batch_size: int, mean, std,
             tta_level: int = 0, channels_last: bool = False,
             top_k: int = 0) -> tuple[torch.Tensor, Predictions | None, float]:
    """(all ranks) The confusion matrix (rows = true class, columns = predicted) summed over every rank's
    shard of `split`, with top_k >= 1 the Predictions of every image, on every rank, and the mean
    cross-entropy loss over the split; one pass.

    `model` must be the unwrapped network: the shards differ in length by up to one batch, so no
    collective may run inside the loop (a DDP forward can broadcast buffers).
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=accelerator.device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=accelerator.device)
    top_k = min(top_k, num_classes)
    rows = []  # per batch: label, top classes, top probabilities
    batches = eval_batches(split, batch_size=batch_size, rank=accelerator.process_index,
                           world_size=accelerator.num_processes, mean=mean, std=std,
                           device=accelerator.device, channels_last=channels_last)
    for x, y in batches:
        with accelerator.autocast():
            logits = predict_logits(model, x, tta_level)
        pred = logits.argmax(1)
        counts += torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        if top_k:
            top = logits.float().softmax(1).topk(top_k, dim=1)
            # the argmax decides a tie the same way as the confusion counts
            classes = torch.cat([pred[:, None], top.indices[:, 1:]], 1) if top_k > 1 else pred[:, None]
            rows.append(torch.cat([y[:, None].double(), classes.double(), top.values.double()], 1))
    model.train(was_training)
    # one collective for the counts and the loss: float64 holds counts up to 2^53 exactly
    totals = accelerator.reduce(torch.cat([counts.double(), loss_sum]), reduction="sum").cpu()
    counts, loss = totals[:-1].round().long(), float(totals[-1]) / max(len(split), 1)
    predictions = _gather(rows, len(split), batch_size, top_k, accelerator) if top_k else None
    return counts.view(num_classes, num_classes), predictions, loss


def _gather(rows: list[torch.Tensor], n: int, batch_size: int, top_k: int, accelerator) -> Predictions:
    """(all ranks) One all-gather of every rank's rows, each shard padded to the longest; the padding is
    dropped by the shards' known lengths (eval_shard), so every image appears once, in order.

    One float64 tensor: class indices and float32 probabilities are both exact in it."""
    world, rank = accelerator.num_processes, accelerator.process_index
    shards = [eval_shard(n, batch_size, r, world) for r in range(world)]
    longest = max(hi - lo for lo, hi in shards)
    mine = torch.cat(rows) if rows else torch.zeros(0, 1 + 2 * top_k, dtype=torch.float64, device=accelerator.device)
    assert len(mine) == shards[rank][1] - shards[rank][0], "a rank's evaluated images differ from its shard"
    padded = torch.zeros(longest, 1 + 2 * top_k, dtype=torch.float64, device=accelerator.device)
    padded[: len(mine)] = mine
    every = accelerator.gather(padded).view(world, longest, -1).cpu()  # one collective for the predictions
    table = torch.cat([every[r, : hi - lo] for r, (lo, hi) in enumerate(shards)])
    return Predictions(labels=table[:, 0].long(), top_classes=table[:, 1 : 1 + top_k].long(),
                       top_probs=table[:, 1 + top_k :].float())


def confusion_matrix(model, split: Split, num_classes: int, **kwargs) -> torch.Tensor:
    """(all ranks) Rows = true class, columns = predicted; summed over every rank's shard of `split`."""
    return evaluate(model, split, num_classes, **kwargs)[0]


def predictions_csv(predictions: Predictions, classes: list[str], paths: list[str] | None, top_k: int = 0) -> str:
    """The CSV text of `predictions`: a header line, then one row per test image in test-set order:
    index, path (relative to the data root; empty for CIFAR-10), label, prediction, confidence (its softmax
    probability) and, with top_k, the top_k classes and probabilities. Probabilities have 6 decimals, so
    the same weights give the same bytes from any number of processes."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    top_k = min(top_k, predictions.top_classes.shape[1])
    writer.writerow(["index", "path", "label", "prediction", "confidence",
                     *(f"top{j}_{what}" for j in range(1, top_k + 1) for what in ("class", "probability"))])
    labels, top, probs = predictions.labels.tolist(), predictions.top_classes.tolist(), predictions.top_probs.tolist()
    for i, (label, c, p) in enumerate(zip(labels, top, probs)):
        writer.writerow([i, paths[i] if paths else "", classes[label], classes[c[0]], f"{p[0]:.6f}",
                         *(v for j in range(top_k) for v in (classes[c[j]], f"{p[j]:.6f}"))])
    return out.getvalue()


def summarize(cm: torch.Tensor, classes: list[str]) -> dict:
    """Global and per-class accuracy from a confusion matrix."""
    total = int(cm.sum())
    correct = int(cm.diag().sum())
    per_class_total = cm.sum(1)
    per_class = {
        name: (float(cm[i, i]) / float(per_class_total[i])) if per_class_total[i] else 0.0
        for i, name in enumerate(classes)
    }
    return {
        "accuracy": correct / total if total else 0.0,
        "num_eval_samples": total,
        "per_class_accuracy": per_class,
        "confusion_matrix": cm.tolist(),
    }


def per_class_table(summary: dict) -> str:
    """The tutorial's report: one line per class, then the whole."""
    width = max(len(c) for c in summary["per_class_accuracy"])
    lines = [f"Accuracy for class: {name:<{width}s} is {100 * acc:.1f} %"
             for name, acc in summary["per_class_accuracy"].items()]
    lines.append(f"Accuracy of the network on the {summary['num_eval_samples']} test images: "
                 f"{100 * summary['accuracy']:.2f} %")
    return "\n".join(lines)


def evaluate_now(run) -> dict:
    """(all ranks) Exact accuracy of a training run on its test split, with the averaged weights when EMA is on.
    With train.write_predictions, summary["predictions"] holds the Predictions of the same pass (results.py
    writes them to predictions.csv and keeps them out of results.json)."""
    cfg = run.cfg
    with run.state.average.evaluation_weights():
        cm, predictions, loss = evaluate(run.state.net, run.data.test, len(run.data.classes), accelerator=run.accelerator,
                                   batch_size=cfg.train.eval_batch_size, mean=cfg.data.mean, std=cfg.data.std,
                                   tta_level=cfg.train.tta_level, channels_last=cfg.model.channels_last,
                                   top_k=1 if cfg.train.write_predictions else 0)
    summary = summarize(cm, run.data.classes)
    summary["test_loss"] = round(loss, 6)
    if predictions is not None:
        summary["predictions"] = predictions
    return summary
