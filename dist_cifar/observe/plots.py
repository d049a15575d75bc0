"""The run's pictures (PNG): training curves, confusion matrix, per-class accuracy, labelled image grids.

Figures are drawn with matplotlib's object API on the Agg canvas: no pyplot, no global backend,
no display needed. Called on the main process only.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from dist_cifar.data.sources import Split
from dist_cifar.data.batches import normalize

WRONG = "#d62728"  # red: a wrong prediction
RIGHT = "#2ca02c"  # green: a right one


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)  # a reader never sees half a picture
    return path


def training_curves(path: Path, history: list[dict], curve: list | None = None) -> Path:
    """Train loss, test accuracy and learning rate over the run (see curves_figure)."""
    return _save(curves_figure(history, curve), path)


def curves_figure(history: list[dict], curve: list | None = None) -> Figure:
    """Three panels: train loss, test accuracy, learning rate.

    With `curve` ([step, mean train loss since the previous point], about 20 points an epoch) the x
    axis is the step: the loss is that curve, test accuracy a point per evaluation, the learning rate
    a point per epoch end (dotted lines). Without it, everything per epoch from `history`.
    """
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    by_step = bool(curve)
    unit = "step" if by_step else "epoch"
    epochs = [r["epoch"] for r in history]
    if by_step:
        loss = [(step, value) for step, value in curve]
    else:
        loss = [(r["epoch"], r["train_loss"]) for r in history if r.get("train_loss") is not None]
    acc = [(r[unit], 100 * r["test_accuracy"]) for r in history if r.get("test_accuracy") is not None]
    lr = [(r[unit], r["lr"]) for r in history if r.get("lr") is not None]
    for ax, points, title, ylabel in ((ax_loss, loss, "training loss", "cross-entropy"),
                                      (ax_acc, acc, "test accuracy", "%"),
                                      (ax_lr, lr, "learning rate (end of epoch)", "lr")):
        if points:
            x, y = zip(*points)
            ax.plot(x, y, marker="." if ax is ax_loss and by_step else "o")
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.margins(y=0.15)
        if by_step:
            ax.set_xlabel("step (dotted: end of an epoch)")
            ax.set_xlim(0, max([p[0] for p in loss] + [r["step"] for r in history]) * 1.02)
            for r in history[:50]:
                ax.axvline(r["step"], color="gray", linestyle=":", linewidth=0.8)
        else:
            ax.set_xlabel("epoch")
            if epochs:
                ax.set_xticks(sorted(set(epochs)) if len(set(epochs)) <= 12 else ax.get_xticks())
    if acc:
        ax_acc.annotate(f"{acc[-1][1]:.2f} %", acc[-1], textcoords="offset points", xytext=(0, 6), ha="center")
    return fig


def confusion_matrix(path: Path, cm: list[list[int]], classes: list[str]) -> Path:
    """Counts with rows = true class, columns = predicted; each cell annotated when there are few classes."""
    counts = np.asarray(cm)
    n = len(classes)
    size = max(5.0, 0.55 * n + 2)
    fig = Figure(figsize=(size + 1, size), layout="constrained")
    ax = fig.subplots()
    # colour by the fraction of the true class, so rare classes are as readable as common ones
    rows = counts.sum(1, keepdims=True)
    fraction = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    image = ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = counts.sum()
    ax.set_title(f"confusion matrix: {int(np.trace(counts))} / {int(total)} right "
                 f"({100 * np.trace(counts) / max(total, 1):.2f} %)")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if fraction[i, j] > 0.5 else "black")
    return _save(fig, path)


def per_class_accuracy(path: Path, per_class: dict[str, float], accuracy: float) -> Path:
    """One bar per class, the overall accuracy as a line."""
    names = list(per_class)
    values = [100 * per_class[c] for c in names]
    fig = Figure(figsize=(7, max(3.0, 0.35 * len(names) + 1.2)), layout="constrained")
    ax = fig.subplots()
    bars = ax.barh(range(len(names)), values, color="#1f77b4")
    ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], padding=3, fontsize=8)
    ax.axvline(100 * accuracy, color="black", linestyle="--", linewidth=1, label=f"all classes {100 * accuracy:.2f} %")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()  # first class on top, as in the per-class table
    ax.set_xlim(0, 110)
    ax.set_xlabel("test accuracy (%)")
    ax.set_title("accuracy per class")
    ax.legend(loc="lower right")
    return _save(fig, path)


def image_grid(path: Path, images: np.ndarray, titles: list[str], colors: list[str] | None = None,
               title: str = "") -> Path:
    """uint8 N x H x W x 3 images in a grid of up to 8 columns, each with its title (and title colour).

    One mosaic on one axes: a grid of 32 separate axes takes matplotlib about ten times longer to lay out
    and draw (1.3 s against 0.16 s here), and the pictures are written at the end of every run."""
    n = len(images)
    cols = min(8, max(n, 1))
    rows = max(1, math.ceil(n / cols))
    height, width = images.shape[1:3] if n else (32, 32)
    lines = max([t.count("\n") + 1 for t in titles] or [1])
    gap = max(2, width // 8)  # white between tiles
    cell_w = width + gap
    inches = 1.45 / cell_w  # per mosaic pixel: a tile 1.45 inches wide, the figure shaped like the mosaic
    head = math.ceil((0.14 * lines + 0.03) / inches)  # room for a 7-point title above each tile
    cell_h = head + height + gap
    mosaic = np.full((rows * cell_h, cols * cell_w, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = (i // cols) * cell_h + head, (i % cols) * cell_w + gap // 2
        mosaic[top:top + height, left:left + width] = image[..., :3]
    top = 0.45 if title else 0.05
    fig = Figure(figsize=(cols * cell_w * inches + 0.1, rows * cell_h * inches + top + 0.05))
    ax = fig.add_axes((0.05 / fig.get_figwidth(), 0.05 / fig.get_figheight(),
                       1 - 0.1 / fig.get_figwidth(), 1 - (top + 0.05) / fig.get_figheight()))
    ax.set_axis_off()
    ax.imshow(mosaic, interpolation="nearest")
    for i in range(n):
        x, y = (i % cols) * cell_w + gap // 2 + width / 2, (i // cols) * cell_h + head - 1
        ax.text(x, y, titles[i], ha="center", va="bottom", fontsize=7, color=colors[i] if colors else "black")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def write_data_grid(path: str | Path, images: np.ndarray, labels, classes: list[str], title: str = "") -> Path:
    """A grid of images, each titled with its class name."""
    return image_grid(Path(path), np.asarray(images), [classes[int(y)] for y in labels], title=title)


def predictions_grid(path: Path, sample: dict) -> Path:
    """Test images titled "true / predicted"; wrong predictions in red."""
    classes = sample["classes"]
    truth, predicted = list(sample["labels"]), list(sample["predicted"])
    titles = [classes[t] if t == p else f"{classes[t]}\nas {classes[p]}" for t, p in zip(truth, predicted)]
    colors = [RIGHT if t == p else WRONG for t, p in zip(truth, predicted)]
    right = sum(t == p for t, p in zip(truth, predicted))
    return image_grid(path, np.asarray(sample["images"]), titles, colors,
                      title=f"{right} of {len(truth)} test images predicted right (red: wrong, with the predicted class)")


@torch.no_grad()
def sample_predictions(net: torch.nn.Module, split: Split, classes: list[str], *, mean, std, n: int = 32,
                       seed: int = 0) -> dict:
    """(main process) `sample` for write_run_pictures: a seeded draw of n images of `split` and the net's predictions.

    A draw, not the first n: an image-folder test split is sorted by class.
    """
    index = np.sort(np.random.default_rng(seed).choice(len(split), min(n, len(split)), replace=False))
    images = np.ascontiguousarray(split.images[index])
    param = next(net.parameters())
    was_training = net.training
    net.eval()
    x = normalize(torch.from_numpy(images).to(param.device), mean, std).to(param.dtype)
    predicted = net(x).argmax(1).cpu().tolist()
    net.train(was_training)
    return {"images": images, "labels": [int(y) for y in split.labels[index]], "predicted": predicted,
            "classes": list(classes)}


def write_run_pictures(run_dir: str | Path, results: dict, history: list[dict], sample: dict | None,
                       curve: list | None = None) -> list[Path]:
    """(main process) The run's pictures in run_dir/pictures/; returns their paths. `curve`: the train
    loss every few steps ([step, mean loss], progress.curve); None draws the loss per epoch."""
    out = Path(run_dir) / "pictures"
    classes = results["classes"]
    paths = [
        training_curves(out / "training_curves.png", history, curve),
        confusion_matrix(out / "confusion_matrix.png", results["confusion_matrix"], classes),
        per_class_accuracy(out / "per_class_accuracy.png", results["per_class_accuracy"], results["accuracy"]),
    ]
    if sample is not None and len(sample["labels"]):
        paths.append(predictions_grid(out / "test_predictions.png", sample))
    return paths
