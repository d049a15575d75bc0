"""The run pictures from a real trained run: real PNG files, wrong predictions marked in red."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dist_cifar import plots
from smoke_run import smoke_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_args):
    return smoke_run(tmp_path_factory, data_args)


@pytest.fixture(scope="module")
def trained(run_dir, data_root):
    """(results, history, network, config, test split) of the real run."""
    from dist_cifar.checkpoint import load_weights
    from dist_cifar.config import DataConfig, from_dict
    from dist_cifar.data import load_dataset
    from dist_cifar.models import build_model

    state, config, classes = load_weights(run_dir / "model.safetensors")
    cfg = from_dict(config)
    net = build_model(cfg.model, len(classes))
    net.load_state_dict(state)
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

    paths = plots.write_run_pictures(tmp_path, results, history, sample)
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
