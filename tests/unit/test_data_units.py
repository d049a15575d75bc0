"""dist_cifar.data.sources helpers in-process: seeded subsets, image-folder listing, 16-bit scaling, cache location."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dist_cifar.config import DataConfig
from dist_cifar.data.sources import DataError, Split, cache_root, list_image_folder, subset, to_rgb8


def test_subset_is_a_seeded_draw_in_the_original_order():
    split = Split(np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1).repeat(3, axis=3), np.arange(100, dtype=np.int64))
    a, b, c = subset(split, 10, 0), subset(split, 10, 0), subset(split, 10, 1)
    assert len(a) == 10 and a.labels.tolist() == b.labels.tolist() and a.labels.tolist() != c.labels.tolist()
    assert a.labels.tolist() == sorted(set(a.labels.tolist()))  # distinct and in the original order
    assert a.images[:, 0, 0, 0].tolist() == a.labels.tolist()  # images travel with their labels
    with pytest.raises(DataError, match="larger than the training set"):
        subset(split, 101, 0)


def test_list_image_folder_sorts_classes_and_files(tmp_path):
    for cls, files in {"dog": ["b.png", "a.JPG", ".hidden.jpg", "notes.txt"], "cat": ["z.jpeg"]}.items():
        (tmp_path / cls).mkdir()
        for name in files:
            (tmp_path / cls / name).write_bytes(b"")
    (tmp_path / ".cache").mkdir()
    classes, files = list_image_folder(tmp_path)
    assert classes == ["cat", "dog"]
    assert [(p.split("/")[-2:], c) for p, c in files] == [
        (["cat", "z.jpeg"], 0), (["dog", "a.JPG"], 1), (["dog", "b.png"], 1)]


def test_list_image_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        list_image_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="no class folders"):
        list_image_folder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class"):
        list_image_folder(tmp_path)


def test_16_bit_images_are_scaled_not_clipped():
    grey = Image.fromarray(np.array([[0, 40000], [65535, 256]], np.uint16))
    rgb = np.asarray(to_rgb8(grey, "x.png"))
    assert rgb.shape == (2, 2, 3) and rgb[:, :, 0].tolist() == [[0, 156], [255, 1]]  # value >> 8
    floats = Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], np.float32))
    assert np.asarray(to_rgb8(floats, "x.tif"))[:, :, 1].tolist() == [[0, 128], [255, 64]]
    with pytest.raises(DataError, match="outside 0..1"):
        to_rgb8(Image.fromarray(np.array([[2.0]], np.float32)), "y.tif")


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("DIST_CIFAR_CACHE", str(tmp_path / "env"))
    assert cache_root(DataConfig(cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    assert cache_root(DataConfig()) == tmp_path / "env"
    monkeypatch.delenv("DIST_CIFAR_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root(DataConfig()) == tmp_path / "xdg" / "dist_cifar"
