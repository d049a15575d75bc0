"""dist_cifar.engine.evaluation in-process on one CPU process: test-time augmentation, confusion counts, accuracies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dist_cifar.data.batches import eval_shard
from dist_cifar.data.sources import Split
from dist_cifar.engine.evaluation import (Predictions, confusion_matrix, evaluate, per_class_table, predict_logits,
                                          predictions_csv, summarize)


class PixelWeights(nn.Module):
    """Two logits, each a fixed weighting of every pixel: linear, so an average of views is easy to predict."""

    def __init__(self, h: int, w: int):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.weight = nn.Parameter(torch.randn(2, 3, h, w, generator=g))

    def forward(self, x):
        return torch.einsum("nchw,kchw->nk", x, self.weight)


def shifted(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """N x C x H x W moved by up to one pixel: a window of the 1-pixel reflect-padded image at (dy, dx)."""
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    return padded[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]


def test_tta_levels_average_the_promised_views():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 6)
    model = PixelWeights(5, 6)
    w = model.weight.detach().numpy()
    logits = lambda views: np.einsum("nchw,kchw->nk", views, w)  # noqa: E731
    plain = logits(x.numpy())
    mirrored = logits(x.numpy()[:, :, :, ::-1])
    with torch.no_grad():
        assert np.allclose(predict_logits(model, x, 0).numpy(), plain, atol=1e-4)
        level1 = predict_logits(model, x, 1).numpy()
        level2 = predict_logits(model, x, 2).numpy()
    assert np.allclose(level1, (plain + mirrored) / 2, atol=1e-4)
    views = [shifted(x.numpy(), 0, 0), shifted(x.numpy(), 2, 2)]
    views += [v[:, :, :, ::-1] for v in views]
    expected = 0.5 * (plain + mirrored) / 2 + 0.5 * sum(logits(v) for v in views) / 4
    assert np.allclose(level2, expected, atol=1e-4)
    assert not np.allclose(level2, level1, atol=1e-2)  # the shifts do change this model's logits


class TopLeftPixel(nn.Module):
    """Predicts class round(red value / 20) of the top-left pixel: the data decides every prediction."""

    def forward(self, x):
        value = x[:, 0, 0, 0] * 255  # mean 0, std 1: x is pixel / 255
        classes = torch.clamp(torch.round(value / 20), 0, 2).long()
        return nn.functional.one_hot(classes, 3).float() * 5 + x.mean() * 0


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.mark.parametrize("tta_level", [0, 1, 2])
def test_confusion_matrix_counts_every_image_once(accelerator, tta_level):
    # 7 images, each one colour all over (so mirrors and shifts show the same pixel): red 0, 20 or 40
    red = [0, 0, 20, 40, 40, 20, 0]
    labels = [0, 1, 1, 2, 0, 1, 2]
    images = np.zeros((7, 4, 4, 3), np.uint8)
    images[:, :, :, 0] = np.array(red, np.uint8)[:, None, None]
    split = Split(images, np.array(labels, np.int64))
    model = TopLeftPixel()
    model.train()
    cm = confusion_matrix(model, split, 3, accelerator=accelerator, batch_size=3, mean=[0.0] * 3, std=[1.0] * 3,
                          tta_level=tta_level)
    # predictions 0 0 1 2 2 1 0 against labels 0 1 1 2 0 1 2
    assert cm.tolist() == [[1, 0, 1], [1, 2, 0], [1, 0, 1]]
    assert model.training  # put back in training mode
    summary = summarize(cm, ["r0", "r20", "r40"])
    assert summary["accuracy"] == pytest.approx(4 / 7) and summary["num_eval_samples"] == 7
    assert summary["per_class_accuracy"] == pytest.approx({"r0": 0.5, "r20": 2 / 3, "r40": 0.5})


def test_summary_of_an_empty_class_and_the_table():
    cm = torch.tensor([[3, 1], [0, 0]])
    summary = summarize(cm, ["cat", "dog"])
    assert summary["accuracy"] == 0.75 and summary["per_class_accuracy"] == {"cat": 0.75, "dog": 0.0}
    table = per_class_table(summary)
    assert "Accuracy for class: cat is 75.0 %" in table
    assert table.splitlines()[-1] == "Accuracy of the network on the 4 test images: 75.00 %"


@pytest.mark.parametrize("n", [1, 7, 10, 499, 10000])
@pytest.mark.parametrize("batch", [1, 3, 33, 500, 20000])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_eval_shards_are_whole_batches_of_one_grid(n, batch, world):
    """Contiguous, in rank order, covering the split once; cut on the same batch grid for every world size
    (so every batch, and each image's logits, is the same from any number of processes); balanced to a batch."""
    shards = [eval_shard(n, batch, r, world) for r in range(world)]
    assert shards[0][0] == 0 and shards[-1][1] == n
    assert all(shards[r][1] == shards[r + 1][0] for r in range(world - 1))
    assert all(lo % batch == 0 and (hi % batch == 0 or hi == n) for lo, hi in shards)
    sizes = [hi - lo for lo, hi in shards]
    assert max(sizes) - min(sizes) <= batch


def test_predictions_of_one_pass_match_its_confusion_counts(accelerator):
    red = [0, 0, 20, 40, 40, 20, 0]
    labels = [0, 1, 1, 2, 0, 1, 2]
    images = np.zeros((7, 4, 4, 3), np.uint8)
    images[:, :, :, 0] = np.array(red, np.uint8)[:, None, None]
    split = Split(images, np.array(labels, np.int64))
    cm, predictions, _ = evaluate(TopLeftPixel(), split, 3, accelerator=accelerator, batch_size=3, mean=[0.0] * 3,
                               std=[1.0] * 3, top_k=2)
    assert predictions.labels.tolist() == labels
    assert predictions.top_classes[:, 0].tolist() == [0, 0, 1, 2, 2, 1, 0]
    assert predictions.accuracy == pytest.approx(4 / 7) == summarize(cm, ["a", "b", "c"])["accuracy"]
    p_top = float(torch.tensor([5.0, 0, 0]).softmax(0)[0])
    assert predictions.top_probs[:, 0].tolist() == pytest.approx([p_top] * 7)
    assert evaluate(TopLeftPixel(), split, 3, accelerator=accelerator, batch_size=3, mean=[0.0] * 3,
                    std=[1.0] * 3)[1] is None  # top_k=0: the counts alone


def test_predictions_csv_quotes_names_and_fixes_the_digits():
    predictions = Predictions(labels=torch.tensor([1, 0]), top_classes=torch.tensor([[1, 0], [1, 0]]),
                              top_probs=torch.tensor([[0.75, 0.25], [0.5000004, 0.4999996]]))
    classes = ["cat", "dog, big"]
    text = predictions_csv(predictions, classes, ["test/dog, big/a.png", "test/cat/b.png"], top_k=2)
    assert text.splitlines() == [
        "index,path,label,prediction,confidence,top1_class,top1_probability,top2_class,top2_probability",
        '0,"test/dog, big/a.png","dog, big","dog, big",0.750000,"dog, big",0.750000,cat,0.250000',
        '1,test/cat/b.png,cat,"dog, big",0.500000,"dog, big",0.500000,cat,0.500000']
    assert predictions_csv(predictions, classes, None).splitlines()[1] == '0,,"dog, big","dog, big",0.750000'
