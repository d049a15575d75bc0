"""The run pictures from a real trained run: real PNG files, wrong predictions marked in red."""

from __future__ import annotations

import json

import numpy as np
import pytest
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


def red_pixels(path) -> int:
    """Pixels drawn in the "wrong prediction" red."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    red = np.array([int(plots.WRONG[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - red).sum(-1) < 60).sum())


def test_run_pictures_are_written(trained, tmp_path):
    results, history, net, cfg, test = trained
    sample = plots.sample_predictions(net, test, results["classes"], mean=cfg.data.mean, std=cfg.data.std, n=32)
    assert len(sample["labels"]) == 32 and sample["images"].shape == (32, 32, 32, 3)
    assert len(set(sample["labels"])) > 3  # a draw over the class-sorted split, not its first images
    # a longer history, with epochs that were not evaluated, as eval_every_epochs > 1 gives
    history = history + [dict(history[-1], epoch=2, step=62, test_accuracy=None, lr=0.001),
                         dict(history[-1], epoch=3, step=93, train_loss=1.9, lr=0.0)]

    paths = plots.write_run_pictures(tmp_path, results, history, sample, curve=loss_curve(3 * results["steps"]))
    assert [p.name for p in paths] == ["training_curves.png", "confusion_matrix.png", "per_class_accuracy.png",
                                       "test_predictions.png"]
    for p in paths:
        assert p.parent == tmp_path / "pictures"
        with Image.open(p) as img:
            assert img.format == "PNG" and img.width >= 400 and img.height >= 250
    assert not list((tmp_path / "pictures").glob(".*"))  # no temporary files left
    wrong = sum(t != p for t, p in zip(sample["labels"], sample["predicted"]))
    assert wrong > 0  # a 22 % model: some are wrong
    assert red_pixels(paths[3]) > 0


def loss_curve(steps: int) -> list[list]:
    """A falling [step, mean loss] curve of 20 points, as progress.curve holds."""
    return [[s, 2.3 - s / (10 * steps)] for s in range(max(1, steps // 20), steps + 1, max(1, steps // 20))][:20]


def test_training_curves_draw_the_loss_every_few_steps_for_a_one_epoch_run(trained):
    results, history, *_ = trained
    assert results["epochs"] == 1 and len(history) == 1  # per epoch, this run is one point
    curve = loss_curve(results["steps"])
    loss, acc, lr = plots.curves_figure(history, curve).axes
    assert len(curve) == 20 and list(loss.lines[0].get_xdata()) == [s for s, _ in curve]
    assert list(loss.lines[0].get_ydata()) == [v for _, v in curve]
    assert list(acc.lines[0].get_xdata()) == [results["steps"]]  # one evaluation, at the end of the epoch
    assert acc.lines[0].get_ydata()[0] == pytest.approx(100 * history[0]["test_accuracy"])
    assert "step" in loss.get_xlabel()


def test_training_curves_mark_each_evaluation_and_fall_back_to_epochs(trained):
    results, history, *_ = trained
    steps = results["steps"]
    history = history + [dict(history[-1], epoch=2, step=2 * steps, test_accuracy=None),
                         dict(history[-1], epoch=3, step=3 * steps, test_accuracy=0.3)]
    loss, acc, _ = plots.curves_figure(history, loss_curve(3 * steps)).axes
    assert len(loss.lines[0].get_xdata()) == 20
    assert list(acc.lines[0].get_xdata()) == [steps, 3 * steps]  # evaluated epochs only
    loss, acc, _ = plots.curves_figure(history, None).axes  # no curve: per epoch, as before
    assert list(loss.lines[0].get_xdata()) == [1, 2, 3] and list(acc.lines[0].get_xdata()) == [1, 3]
    assert loss.get_xlabel() == "epoch"


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
