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


def training_curves(path: Path, history: list[dict], curve: list | None = None,
                    num_classes: int | None = None) -> Path:
    """Train loss, test accuracy and (when it changed) learning rate over the run (see curves_figure)."""
    return _save(curves_figure(history, curve, num_classes), path)


def curves_figure(history: list[dict], curve: list | None = None, num_classes: int | None = None) -> Figure:
    """Train and test loss beside test accuracy on one x axis, so that over-fitting shows (the training loss
    still falling while the test loss rises and the accuracy stalls); a third panel for the learning rate
    only when it changed.

    With `curve` ([step, mean train loss since the previous point], about 20 points an epoch) the x
    axis is the step: the loss is that curve with each epoch's mean, test accuracy a point per evaluated
    epoch, the learning rate a point per epoch end (dotted lines). Without it, everything per epoch from
    `history`. With `num_classes`, the accuracy axis starts at chance (1 / num_classes), drawn dashed.
    """
    by_step = bool(curve)
    unit = "step" if by_step else "epoch"
    if by_step:
        loss = [(step, value) for step, value in curve]
    else:
        loss = [(r["epoch"], r["train_loss"]) for r in history if r.get("train_loss") is not None]
    acc = [(r[unit], 100 * r["test_accuracy"]) for r in history if r.get("test_accuracy") is not None]
    lr = [(r[unit], r["lr"]) for r in history if r.get("lr") is not None]
    lr_changed = len({v for _, v in lr}) > 1
    fig = Figure(figsize=(4.4 * (3 if lr_changed else 2), 3.6), layout="constrained")
    axes = list(fig.subplots(1, 3 if lr_changed else 2, sharex=True))
    ax_loss, ax_acc = axes[:2]
    lr_note = f" (lr {lr[0][1]:.3g}, constant)" if lr and not lr_changed else ""
    panels = [(ax_loss, loss, "loss" + lr_note, "cross-entropy"), (ax_acc, acc, "test accuracy", "%")]
    if lr_changed:
        panels.append((axes[2], lr, "learning rate (end of epoch)", "lr"))
    for ax, points, title, ylabel in panels:
        if points:
            x, y = zip(*points)
            ax.plot(x, y, marker="." if ax is ax_loss and by_step else "o", clip_on=False, zorder=3,
                    label="every ~1/20 epoch" if ax is ax_loss and by_step else None)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.margins(y=0.15)
    if by_step:  # each epoch's mean loss, at the epoch's middle: the trend under the noise
        ends = [0] + [r["step"] for r in history]
        means = [((a + r["step"]) / 2, r["train_loss"]) for a, r in zip(ends, history)
                 if r.get("train_loss") is not None]
        if means:
            ax_loss.plot(*zip(*means), "s", color="#ff7f0e", markersize=5, zorder=4, label="epoch mean")
    test_loss = [(r[unit], r["test_loss"]) for r in history if r.get("test_loss") is not None]
    if test_loss:  # beside the training loss: a gap that opens between them is over-fitting
        ax_loss.plot(*zip(*test_loss), "D-", color="#2ca02c", markersize=5, zorder=4, label="test loss")
    if by_step or test_loss:
        ax_loss.legend(loc="upper right", fontsize=8)
    # x limits by hand: a one-epoch run is one point, which autoscaling would put on the axes' edge
    if by_step:
        last = max([p[0] for p in loss] + [r["step"] for r in history] + [1])
        ax_loss.set_xlim(0, last * 1.04)
    else:
        last = max([r["epoch"] for r in history] + [1])
        ax_loss.set_xlim(0.5, last + 0.5)
    for ax in axes:
        if by_step:
            ax.set_xlabel("step (dotted: end of an epoch)")
            for r in history[:50]:
                ax.axvline(r["step"], color="gray", linestyle=":", linewidth=0.8)
        else:
            ax.set_xlabel("epoch")
            ax.xaxis.get_major_locator().set_params(integer=True)
    if num_classes:
        chance = 100 / num_classes
        ax_acc.axhline(chance, color="gray", linestyle="--", linewidth=1, label=f"chance {chance:.3g} %")
        ax_acc.legend(loc="lower right", fontsize=8)
        if acc:
            low, high = min(y for _, y in acc), max(y for _, y in acc)
            span = max(high - min(low, chance), 2.0)  # a little below chance, so its line is not the spine
            ax_acc.set_ylim(min(chance - 0.03 * span, low - 0.1 * span), min(100.5, high + 0.2 * span))
        else:
            ax_acc.set_ylim(chance - 2, 100.5)
    if acc:
        ax_acc.annotate(f"{acc[-1][1]:.2f} %", acc[-1], textcoords="offset points", xytext=(-4, 6), ha="right")
    return fig


def largest_confusions(cm, classes: list[str], k: int = 5) -> list[str]:
    """The k largest off-diagonal counts, largest first, as "true -> predicted: count (share of the true class)"."""
    counts = np.asarray(cm)
    off = [(int(counts[i, j]), i, j) for i in range(len(classes)) for j in range(len(classes))
           if i != j and counts[i, j] > 0]
    off.sort(key=lambda c: (-c[0], c[1], c[2]))
    rows = counts.sum(1)
    return [f"{classes[i]} -> {classes[j]}: {n} ({100 * n / rows[i]:.1f} %)" for n, i, j in off[:k]]


def confusion_matrix(path: Path, cm: list[list[int]], classes: list[str]) -> Path:
    """The confusion matrix with its largest confusions listed beside it (see confusion_figure)."""
    return _save(confusion_figure(cm, classes), path)


def confusion_figure(cm: list[list[int]], classes: list[str]) -> Figure:
    """Counts with rows = true class, columns = predicted; each cell annotated when there are few classes;
    the five largest confusions listed on the right."""
    counts = np.asarray(cm)
    n = len(classes)
    size = max(5.0, 0.55 * n + 2)
    fig = Figure(figsize=(size + 4.2, size), layout="constrained")
    ax, side = fig.subplots(1, 2, width_ratios=[size + 1, 3.2])
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
    side.set_axis_off()
    side.set_title("largest confusions", loc="left")
    side.text(0, 1, "true -> predicted: count (% of the true class)", transform=side.transAxes, va="top",
              fontsize=8, color="gray")
    side.text(0, 0.95, "\n".join(largest_confusions(counts, classes) or ["none"]), transform=side.transAxes,
              va="top", fontsize=9, linespacing=1.8)
    return fig


def per_class_accuracy(path: Path, per_class: dict[str, float], accuracy: float) -> Path:
    """One bar per class, best first; the overall accuracy and chance as lines (see per_class_figure)."""
    return _save(per_class_figure(per_class, accuracy), path)


def per_class_figure(per_class: dict[str, float], accuracy: float) -> Figure:
    """Horizontal bars sorted by accuracy (best on top), with chance (1 / classes) and the overall accuracy."""
    names = sorted(per_class, key=lambda c: -per_class[c])  # stable: ties keep the class order
    values = [100 * per_class[c] for c in names]
    chance = 100 / max(len(names), 1)
    fig = Figure(figsize=(7, max(3.0, 0.35 * len(names) + 1.2)), layout="constrained")
    ax = fig.subplots()
    bars = ax.barh(range(len(names)), values, color="#1f77b4")
    for label in ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], padding=3, fontsize=8):
        label.set_bbox(dict(facecolor="white", edgecolor="none", pad=0.5))  # readable over the lines
        label.set_zorder(5)
    ax.axvline(100 * accuracy, color="black", linestyle="--", linewidth=1, label=f"all classes {100 * accuracy:.2f} %")
    ax.axvline(chance, color="gray", linestyle=":", linewidth=1.5, label=f"chance {chance:.3g} %")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()  # best class on top
    ax.set_xlim(0, 110)
    ax.set_xlabel("test accuracy (%)")
    ax.set_title("accuracy per class, best first")
    ax.legend(loc="lower right", fontsize=8)
    return fig


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
    """Test images titled with the true class, "as" the predicted one when wrong (red; right ones green),
    and the confidence: the softmax probability of the predicted class."""
    classes = sample["classes"]
    truth, predicted = list(sample["labels"]), list(sample["predicted"])
    confidence = sample.get("confidence") or [None] * len(truth)
    titles = [(classes[t] if t == p else f"{classes[t]}\nas {classes[p]}") + ("" if c is None else f" {c:.2f}")
              for t, p, c in zip(truth, predicted, confidence)]
    colors = [RIGHT if t == p else WRONG for t, p in zip(truth, predicted)]
    right = sum(t == p for t, p in zip(truth, predicted))
    return image_grid(path, np.asarray(sample["images"]), titles, colors,
                      title=f"{right} of {len(truth)} test images predicted right (green: right; red: wrong, as the "
                            f"predicted class{'; the number: its confidence' * bool(sample.get('confidence'))})")


def confident_mistakes(predictions, n: int = 24) -> np.ndarray:
    """Indices of the test images wrongly predicted with the highest confidence, most confident first."""
    labels = np.asarray(predictions.labels)
    predicted, confidence = np.asarray(predictions.top_classes[:, 0]), np.asarray(predictions.top_probs[:, 0])
    wrong = np.flatnonzero(predicted != labels)
    return wrong[np.argsort(-confidence[wrong], kind="stable")[:n]]


def most_confident_mistakes(path: Path, predictions, images: np.ndarray, classes: list[str],
                            n: int = 24) -> Path | None:
    """The test images the net got wrong most confidently (from the gathered `predictions`), each titled
    with its test-set index (the row of predictions.csv), true class, predicted class and confidence.
    None (nothing drawn) when no prediction is wrong."""
    index = confident_mistakes(predictions, n)
    if not len(index):
        return None
    labels, predicted = predictions.labels.tolist(), predictions.top_classes[:, 0].tolist()
    confidence = predictions.top_probs[:, 0].tolist()
    titles = [f"#{i} {classes[labels[i]]}\nas {classes[predicted[i]]} {confidence[i]:.2f}" for i in index]
    wrong = sum(p != y for p, y in zip(predicted, labels))
    return image_grid(path, np.asarray(images[index]), titles, [WRONG] * len(index),
                      title=f"the {len(index)} most confident of {wrong} mistakes in {len(labels)} test images "
                            f"(#index true class, as predicted class, confidence)")


@torch.no_grad()
def sample_predictions(net: torch.nn.Module, split: Split, classes: list[str], *, mean, std, n: int = 32,
                       seed: int = 0, predictions=None) -> dict:
    """(main process) `sample` for write_run_pictures: a seeded draw of n images of `split` with the net's
    predictions and confidences (softmax probability of the predicted class). Taken from `predictions`
    (the run's gathered Predictions of `split`) when given, so the grid agrees with predictions.csv;
    else the net predicts them.

    A draw, not the first n: an image-folder test split is sorted by class.
    """
    index = np.sort(np.random.default_rng(seed).choice(len(split), min(n, len(split)), replace=False))
    images = np.ascontiguousarray(split.images[index])
    if predictions is not None and len(predictions) == len(split):
        predicted = predictions.top_classes[index, 0].tolist()
        confidence = predictions.top_probs[index, 0].tolist()
    else:
        param = next(net.parameters())
        was_training = net.training
        net.eval()
        x = normalize(torch.from_numpy(images).to(param.device), mean, std).to(param.dtype)
        top = net(x).float().softmax(1).max(1)
        predicted, confidence = top.indices.cpu().tolist(), top.values.cpu().tolist()
        net.train(was_training)
    return {"images": images, "labels": [int(y) for y in split.labels[index]], "predicted": predicted,
            "confidence": confidence, "classes": list(classes)}


def write_run_pictures(run_dir: str | Path, results: dict, history: list[dict], sample: dict | None,
                       curve: list | None = None, predictions=None,
                       test_images: np.ndarray | None = None) -> list[Path]:
    """(main process) The run's pictures in run_dir/pictures/; returns their paths. `curve`: the train
    loss every few steps ([step, mean loss], progress.curve); None draws the loss per epoch. With the
    gathered `predictions` of the test set and its `test_images`, also the most confident mistakes."""
    out = Path(run_dir) / "pictures"
    classes = results["classes"]
    paths = [
        training_curves(out / "training_curves.png", history, curve, len(classes)),
        confusion_matrix(out / "confusion_matrix.png", results["confusion_matrix"], classes),
        per_class_accuracy(out / "per_class_accuracy.png", results["per_class_accuracy"], results["accuracy"]),
    ]
    if sample is not None and len(sample["labels"]):
        paths.append(predictions_grid(out / "test_predictions.png", sample))
    if predictions is not None and test_images is not None and len(predictions) == len(test_images):
        mistakes = most_confident_mistakes(out / "most_confident_mistakes.png", predictions, test_images, classes)
        if mistakes is not None:
            paths.append(mistakes)
    return paths
