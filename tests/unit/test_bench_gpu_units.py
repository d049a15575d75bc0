"""dist_cifar.bench.gpu in-process: airbench's cifar10/*.pt files from a tiny image folder, the ratios and
targets from known medians, and the one-line stop when the airbench package is missing."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dist_cifar.bench import cpu as bench, gpu as bench_gpu

CLASSES = {"cat": 3, "ant": 2, "bee": 4}  # folder name: training images; sorted, the labels are ant 0, bee 1, cat 2


def make_folder(root):
    """PNG images (lossless) whose pixels say which file they are: red = class index, green = file index."""
    for split, extra in (("train", 0), ("test", -1)):
        for c, name in enumerate(sorted(CLASSES)):
            (root / split / name).mkdir(parents=True)
            for i in range(CLASSES[name] + extra):
                pixels = np.zeros((32, 32, 3), np.uint8)
                pixels[..., 0], pixels[..., 1], pixels[..., 2] = c, i, np.arange(32, dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}.png")


def test_airbench_files_have_its_layout_and_the_folders_labels(tmp_path, monkeypatch):
    monkeypatch.setenv("DIST_CIFAR_CACHE", str(tmp_path / "cache"))  # not the session's: it holds CIFAR-10 alone
    make_folder(tmp_path / "images")
    info = bench_gpu.write_airbench_data(tmp_path / "images", tmp_path / "cifar10")
    assert info["classes"] == ["ant", "bee", "cat"] and (info["train_images"], info["test_images"]) == (9, 6)
    order = np.load(tmp_path / "cifar10" / "train_order.npy")
    assert sorted(order.tolist()) == list(range(9)) and order.tolist() != list(range(9))  # shuffled, every image once
    files = {"train": [(c, i) for c, n in enumerate(sorted(CLASSES)) for i in range(CLASSES[n])],
             "test": [(c, i) for c, n in enumerate(sorted(CLASSES)) for i in range(CLASSES[n] - 1)]}
    for split, rows in (("train", order), ("test", np.arange(6))):
        data = torch.load(tmp_path / "cifar10" / f"{split}.pt")
        assert set(data) == {"images", "labels", "classes"} and data["classes"] == ["ant", "bee", "cat"]
        images, labels = data["images"], data["labels"]
        assert images.dtype == torch.uint8 and images.shape == (len(rows), 32, 32, 3) and images.is_contiguous()
        assert labels.dtype == torch.int64 and labels.shape == (len(rows),)
        for row, index in enumerate(rows):  # row `row` is the folder's file number `index`
            c, i = files[split][index]
            assert labels[row] == c and images[row, 5, 7].tolist() == [c, i, 7], (split, row)


def test_a_cache_that_disagrees_with_the_folders_is_refused(tmp_path):
    make_folder(tmp_path)
    labels = np.array([0, 0, 1, 1, 1, 1, 2, 2, 2])
    good = SimpleNamespace(classes=["ant", "bee", "cat"], train=SimpleNamespace(labels=labels),
                           test=SimpleNamespace(labels=np.array([0, 1, 1, 1, 2, 2])))
    bench_gpu.check_against_folders(good, tmp_path)
    for bad in (SimpleNamespace(**{**vars(good), "classes": ["bee", "ant", "cat"]}),
                SimpleNamespace(**{**vars(good), "train": SimpleNamespace(labels=labels[::-1])})):
        with pytest.raises(bench.BenchError, match="does not match its"):
            bench_gpu.check_against_folders(bad, tmp_path)


def summary_of(**values) -> dict:
    """{row: {key: a spread (or for accuracy a mean) of one value}} from row__key=value."""
    out: dict = {}
    for key, value in values.items():
        name, field = key.split("__")
        out.setdefault(name, {})[field] = {"mean" if field == "accuracy" else "median": value}
    return out


def test_ratios_divide_the_right_medians_and_targets_use_the_issue_limits():
    summary = summary_of(airbench94__train_seconds=3.0, airbench94__run_seconds=3.5, airbench94__accuracy=0.9059,
                         dist_cifar_airbench94__train_seconds=3.0, dist_cifar_airbench94__run_seconds=4.5,
                         dist_cifar_airbench94__accuracy=0.9077, tutorial_gpu__images_per_second=1000.0,
                         dist_cifar_tutorial_gpu__images_per_second=3000.0)
    ratio = bench_gpu.ratios(summary)
    assert ratio == pytest.approx({"dist_cifar_airbench94_over_airbench94_train_seconds": 1.0,
                                   "accuracy_difference_points": 0.18,
                                   "dist_cifar_airbench94_run_wall_over_train_seconds": 1.5,
                                   "dist_cifar_airbench94_run_wall_over_airbench94_run_seconds": 4.5 / 3.5,
                                   "dist_cifar_tutorial_over_tutorial_gpu_images_per_second": 3.0})
    assert [t["met"] for t in bench_gpu.targets(ratio, measured=True)] == [True, True, True, True]  # all at the limit
    assert [t["met"] for t in bench_gpu.targets(ratio, measured=False)] == [None] * 4  # a CPU plumbing check
    worse = bench_gpu.ratios({**summary, **summary_of(dist_cifar_airbench94__train_seconds=3.1,
                                                      dist_cifar_airbench94__run_seconds=4.7,
                                                      dist_cifar_airbench94__accuracy=0.9038)})
    assert worse["accuracy_difference_points"] == pytest.approx(-0.21)
    assert [t["met"] for t in bench_gpu.targets(worse, measured=True)] == [False, False, False, True]
    partial = bench_gpu.ratios({"airbench94": summary["airbench94"]})  # a run that stopped early
    assert set(partial.values()) == {None}


def test_gpu_bench_without_airbench_stops_at_once_naming_the_install(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "airbench" else real(name, *a))
    code = bench.main(["--gpu", "--quick", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.json"),
                       "--work", str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "airbench==0.1.8" in err and "pip install -e '.[bench]'" in err
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "work").exists()
