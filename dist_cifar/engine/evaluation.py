"""Exact distributed evaluation: per-rank confusion counts, summed over ranks once, divided last."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_cifar.data.batches import eval_batches
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


@torch.no_grad()
def confusion_matrix(model, split: Split, num_classes: int, *, accelerator, batch_size: int, mean, std,
                     tta_level: int = 0, channels_last: bool = False) -> torch.Tensor:
    """(all ranks) Rows = true class, columns = predicted; summed over every rank's shard of `split`.

    `model` must be the unwrapped network: the shards differ in length by up to one batch, so no
    collective may run inside the loop (a DDP forward can broadcast buffers).
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=accelerator.device)
    batches = eval_batches(split, batch_size=batch_size, rank=accelerator.process_index,
                           world_size=accelerator.num_processes, mean=mean, std=std,
                           device=accelerator.device, channels_last=channels_last)
    for x, y in batches:
        with accelerator.autocast():
            pred = predict_logits(model, x, tta_level).argmax(1)
        counts += torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes)
    model.train(was_training)
    counts = accelerator.reduce(counts, reduction="sum")  # one collective for the whole evaluation
    return counts.view(num_classes, num_classes).cpu()


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
    """(all ranks) Exact accuracy of a training run on its test split, with the averaged weights when EMA is on."""
    cfg = run.cfg
    with run.state.average.evaluation_weights():
        cm = confusion_matrix(run.state.net, run.data.test, len(run.data.classes), accelerator=run.accelerator,
                              batch_size=cfg.train.eval_batch_size, mean=cfg.data.mean, std=cfg.data.std,
                              tta_level=cfg.train.tta_level, channels_last=cfg.model.channels_last)
    return summarize(cm, run.data.classes)
