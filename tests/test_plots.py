"""The run pictures from a real trained run: real PNG files, wrong predictions marked in red, what each
picture says (panels, chance lines, sorted bars, the largest confusions, the most confident mistakes)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dist_cifar.observe import plots
from smoke_run import smoke_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_args):
    return smoke_run(tmp_path_factory, data_args)


@pytest.fixture(scope="module")
def trained(run_dir, data_root):
    """(results, history, network, config, test split) of the real run."""
    from dist_cifar.state.checkpoint import load_model
    from dist_cifar.config import DataConfig
    from dist_cifar.data.sources import load_dataset

    net, cfg, _ = load_model(run_dir / "model.safetensors")
    results = json.loads((run_dir / "results.json").read_text())
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    test = load_dataset(DataConfig(name="imagefolder", root=str(data_root))).test
    return results, history, net, cfg, test


@pytest.fixture(scope="module")
def predictions(run_dir, trained):
    """The run's gathered Predictions of the whole test set, read back from its predictions.csv."""
    from dist_cifar.engine.evaluation import Predictions

    classes = trained[0]["classes"]
    with open(run_dir / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return Predictions(labels=torch.tensor([classes.index(r["label"]) for r in rows]),
                       top_classes=torch.tensor([[classes.index(r["prediction"])] for r in rows]),
                       top_probs=torch.tensor([[float(r["confidence"])] for r in rows]))


def red_pixels(path) -> int:
    """Pixels drawn in the "wrong prediction" red."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    red = np.array([int(plots.WRONG[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - red).sum(-1) < 60).sum())


def test_run_pictures_are_written(trained, predictions, tmp_path):
    results, history, net, cfg, test = trained
    sample = plots.sample_predictions(net, test, results["classes"], mean=cfg.data.mean, std=cfg.data.std, n=32)
    assert len(sample["labels"]) == 32 and sample["images"].shape == (32, 32, 32, 3)
    assert len(set(sample["labels"])) > 3  # a draw over the class-sorted split, not its first images
    assert all(1 / len(results["classes"]) <= c <= 1 for c in sample["confidence"])  # the predicted class's softmax
    # a longer history, with epochs that were not evaluated, as eval_every_epochs > 1 gives
    history = history + [dict(history[-1], epoch=2, step=62, test_accuracy=None, lr=0.001),
                         dict(history[-1], epoch=3, step=93, train_loss=1.9, lr=0.0)]

    paths = plots.write_run_pictures(tmp_path, results, history, sample, curve=loss_curve(3 * results["steps"]),
                                     predictions=predictions, test_images=test.images)
    assert [p.name for p in paths] == ["training_curves.png", "confusion_matrix.png", "per_class_accuracy.png",
                                       "test_predictions.png", "most_confident_mistakes.png"]
    for p in paths:
        assert p.parent == tmp_path / "pictures"
        with Image.open(p) as img:
            assert img.format == "PNG" and img.width >= 400 and img.height >= 250
    assert not list((tmp_path / "pictures").glob(".*"))  # no temporary files left
    wrong = sum(t != p for t, p in zip(sample["labels"], sample["predicted"]))
    assert wrong > 0  # a 22 % model: some are wrong
    assert red_pixels(paths[3]) > 0
    assert red_pixels(paths[4]) > red_pixels(paths[3])  # every tile of the mistakes is titled in red


def test_sample_from_the_gathered_predictions_agrees_with_them(trained, predictions):
    results, _, net, cfg, test = trained
    sample = plots.sample_predictions(None, test, results["classes"], mean=None, std=None, n=32,
                                      predictions=predictions)  # no forward pass: the net is not needed
    drawn = plots.sample_predictions(net, test, results["classes"], mean=cfg.data.mean, std=cfg.data.std, n=32)
    assert sample["labels"] == drawn["labels"]  # the same seeded draw
    index = np.sort(np.random.default_rng(0).choice(len(test), 32, replace=False))
    assert sample["predicted"] == predictions.top_classes[index, 0].tolist()
    assert sample["confidence"] == pytest.approx(predictions.top_probs[index, 0].tolist())


def test_most_confident_mistakes(trained, predictions, tmp_path):
    results, _, _, _, test = trained
    index = plots.confident_mistakes(predictions, n=24)
    labels, predicted = predictions.labels.numpy(), predictions.top_classes[:, 0].numpy()
    confidence = predictions.top_probs[:, 0].numpy()
    wrong = predicted != labels
    assert len(index) == 24 and wrong[index].all()
    assert (np.diff(confidence[index]) <= 0).all()  # most confident first
    assert confidence[index[-1]] >= np.delete(confidence, index)[np.delete(wrong, index)].max()  # none left out
    path = plots.most_confident_mistakes(tmp_path / "mistakes.png", predictions, test.images, results["classes"])
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width >= 800
    from dist_cifar.engine.evaluation import Predictions
    all_right = Predictions(predictions.labels, predictions.labels[:, None], predictions.top_probs)
    assert plots.most_confident_mistakes(tmp_path / "none.png", all_right, test.images, results["classes"]) is None
    assert not (tmp_path / "none.png").exists()


def loss_curve(steps: int) -> list[list]:
    """A falling [step, mean loss] curve of 20 points, as progress.curve holds."""
    return [[s, 2.3 - s / (10 * steps)] for s in range(max(1, steps // 20), steps + 1, max(1, steps // 20))][:20]


def test_training_curves_draw_the_loss_every_few_steps_for_a_one_epoch_run(trained):
    results, history, *_ = trained
    assert results["epochs"] == 1 and len(history) == 1  # per epoch, this run is one point
    curve = loss_curve(results["steps"])
    fig = plots.curves_figure(history, curve, num_classes=10)
    loss, acc = fig.axes  # a constant learning rate: no panel for it, the value in the loss panel's title
    assert "constant" in loss.get_title() and acc.get_title() == "test accuracy"
    assert len(curve) == 20 and list(loss.lines[0].get_xdata()) == [s for s, _ in curve]
    assert list(loss.lines[0].get_ydata()) == [v for _, v in curve]
    assert list(acc.lines[0].get_xdata()) == [results["steps"]]  # one evaluation, at the end of the epoch
    y = acc.lines[0].get_ydata()[0]
    assert y == pytest.approx(100 * history[0]["test_accuracy"])
    assert "step" in loss.get_xlabel()
    # the single dot lies well inside the axes, not on an edge
    (x0, x1), (y0, y1) = acc.get_xlim(), acc.get_ylim()
    assert x0 < results["steps"] < x1 - 0.02 * (x1 - x0) and y0 < y < y1 - 0.05 * (y1 - y0)
    # the accuracy axis starts at chance, drawn dashed
    chance = [line for line in acc.lines if line.get_linestyle() == "--"]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == [10, 10]
    assert y0 <= 10 and (y0 >= 9 or y < 10)  # just below chance, unless the dot is below it


def test_training_curves_mark_each_evaluation_and_fall_back_to_epochs(trained):
    results, history, *_ = trained
    steps = results["steps"]
    history = history + [dict(history[-1], epoch=2, step=2 * steps, test_accuracy=None),
                         dict(history[-1], epoch=3, step=3 * steps, test_accuracy=0.3)]
    loss, acc = plots.curves_figure(history, loss_curve(3 * steps)).axes
    assert len(loss.lines[0].get_xdata()) == 20
    assert list(acc.lines[0].get_xdata()) == [steps, 3 * steps]  # evaluated epochs only, joined by a line
    assert acc.lines[0].get_marker() == "o" and acc.lines[0].get_linestyle() == "-"
    loss, acc = plots.curves_figure(history, None).axes  # no curve: per epoch, as before
    assert list(loss.lines[0].get_xdata()) == [1, 2, 3] and list(acc.lines[0].get_xdata()) == [1, 3]
    assert loss.get_xlabel() == "epoch"
    assert plots.curves_figure(history[:1], None).axes[0].get_xlim() == (0.5, 1.5)  # one epoch: centred


def test_training_curves_draw_a_changing_learning_rate(trained):
    _, history, *_ = trained
    history = [dict(history[0], epoch=e, step=10 * e, lr=0.1 / e) for e in (1, 2, 3)]
    axes = plots.curves_figure(history, None, num_classes=10).axes
    assert len(axes) == 3 and "learning rate" in axes[2].get_title()
    assert list(axes[2].lines[0].get_ydata()) == pytest.approx([0.1, 0.05, 0.1 / 3])
    assert "constant" not in axes[0].get_title()


def test_largest_confusions_are_listed_beside_the_matrix(trained):
    results, *_ = trained
    classes, cm = results["classes"], np.asarray(results["confusion_matrix"])
    lines = plots.largest_confusions(cm, classes)
    off = cm - np.diag(np.diag(cm))
    i, j = np.unravel_index(off.argmax(), off.shape)
    assert len(lines) == 5 and lines[0].startswith(f"{classes[i]} -> {classes[j]}: {off[i, j]} (")
    counts = [int(line.split(": ")[1].split(" ")[0]) for line in lines]
    assert counts == sorted(counts, reverse=True) and counts == sorted(off.ravel(), reverse=True)[:5]
    texts = [t.get_text() for ax in plots.confusion_figure(cm, classes).axes for t in ax.texts]
    assert any(all(line in t for line in lines) for t in texts)
    assert plots.largest_confusions(np.diag([3, 4]), ["a", "b"]) == []  # all right: nothing to list
    assert plots.largest_confusions([[5, 1], [0, 4]], ["a", "b"]) == ["a -> b: 1 (16.7 %)"]


def test_per_class_bars_are_sorted_with_chance_and_overall_lines(trained):
    results, *_ = trained
    per_class = results["per_class_accuracy"]
    ax = plots.per_class_figure(per_class, results["accuracy"]).axes[0]
    names = [t.get_text() for t in ax.get_yticklabels()]
    assert sorted(names) == sorted(per_class)
    assert [per_class[n] for n in names] == sorted(per_class.values(), reverse=True)  # best first
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # inverted: the first (best) bar on top
    vertical = sorted(line.get_xdata()[0] for line in ax.lines)
    assert vertical == pytest.approx(sorted([10.0, 100 * results["accuracy"]]))


def test_all_right_predictions_have_no_red(trained, tmp_path):
    results, _, net, cfg, test = trained
    sample = plots.sample_predictions(net, test, results["classes"], mean=cfg.data.mean, std=cfg.data.std, n=16)
    sample["predicted"] = list(sample["labels"])
    path = plots.predictions_grid(tmp_path / "right.png", sample)
    assert red_pixels(path) == 0


def test_pictures_without_sample_or_test_accuracy(trained, tmp_path):
    results, history, *_ = trained
    history = [dict(r, test_accuracy=None) for r in history]
    paths = plots.write_run_pictures(tmp_path, results, history, None)
    assert [p.name for p in paths] == ["training_curves.png", "confusion_matrix.png", "per_class_accuracy.png"]


def test_data_grid(trained, tmp_path):
    results, _, _, _, test = trained
    index = [0, 1000, 2000, 3000, 9999]
    path = plots.write_data_grid(tmp_path / "sub" / "grid.png", test.images[index], test.labels[index],
                                 results["classes"], title="five test images")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 300


def test_test_loss_is_drawn_beside_the_training_loss(trained):
    """Each evaluated epoch's test loss (metrics.jsonl's test_loss) on the loss panel, so a gap that opens
    between the two losses (over-fitting) shows; epochs without an evaluation have none."""
    results, history, *_ = trained
    steps = results["steps"]
    assert history[-1]["test_loss"] > 0  # written by the run itself
    history = history + [dict(history[-1], epoch=2, step=2 * steps, test_accuracy=None, test_loss=None),
                         dict(history[-1], epoch=3, step=3 * steps, test_accuracy=0.3, test_loss=2.5)]
    loss, _ = plots.curves_figure(history, loss_curve(3 * steps)).axes
    (test_line,) = [line for line in loss.lines if line.get_label() == "test loss"]
    assert list(test_line.get_xdata()) == [steps, 3 * steps] and test_line.get_ydata()[-1] == 2.5
