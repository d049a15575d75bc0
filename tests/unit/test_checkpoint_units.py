"""dist_cifar.state.checkpoint in-process, on a temporary folder: atomic writes, verification, keep-last plus keep-best pruning."""

from __future__ import annotations

import json

import torch

from dist_cifar.state import checkpoint as ckpt


def write(folder, step: int, accuracy=None):
    return ckpt.write_checkpoint(folder, step, model_state={"w": torch.full((3,), float(step))},
                                 state={"progress": {"step": step}}, meta={"step": step, "test_accuracy": accuracy},
                                 config={"seed": 0}, classes=["a", "b"])


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_and_read_back(tmp_path):
    folder = write(tmp_path, 12, 0.5)
    assert folder.name == "step-00000012" and ckpt.verify(folder) is None
    model_state, state, meta = ckpt.read_checkpoint(folder)
    assert model_state["w"].tolist() == [12.0] * 3 and state["progress"]["step"] == 12 and meta["test_accuracy"] == 0.5
    weights, config, classes = ckpt.load_weights(folder)
    assert torch.equal(weights["w"], model_state["w"]) and config == {"seed": 0} and classes == ["a", "b"]
    assert names(tmp_path) == ["step-00000012"]  # no temporary folder left behind


def test_verify_finds_a_changed_byte(tmp_path):
    folder = write(tmp_path, 3)
    data = bytearray((folder / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "state.pt").write_bytes(bytes(data))
    assert "checksum" in ckpt.verify(folder)
    assert ckpt.find_latest(tmp_path, warn=lambda m: None) is None


def test_prune_keeps_the_newest_and_the_most_accurate(tmp_path):
    accuracies = {1: 0.30, 2: 0.90, 3: None, 4: 0.50, 5: 0.40, 6: None}
    for step, acc in accuracies.items():
        write(tmp_path, step, acc)
        ckpt.prune(tmp_path, keep_last=2)
    # newest two: 6 and 5; best scored: 2 (0.9); 1, 3 and 4 removed
    assert names(tmp_path) == ["step-00000002", "step-00000005", "step-00000006"]
    ckpt.prune(tmp_path, keep_last=1)
    assert names(tmp_path) == ["step-00000002", "step-00000006"]


def test_prune_without_scores_keeps_only_the_newest(tmp_path):
    for step in range(1, 5):
        write(tmp_path, step)
    ckpt.prune(tmp_path, keep_last=3)
    assert names(tmp_path) == ["step-00000002", "step-00000003", "step-00000004"]


def test_prune_leaves_broken_checkpoints_and_clears_stale_temporaries(tmp_path):
    for step in (1, 2, 3):
        write(tmp_path, step, 0.1 * step)
    broken = tmp_path / "step-00000009"  # newer but incomplete (no manifest): not counted, not deleted
    broken.mkdir()
    (broken / "meta.json").write_text(json.dumps({"test_accuracy": 0.99}))
    (tmp_path / ".tmp-step-00000010-abc").mkdir()
    (tmp_path / ".del-step-00000000-1").mkdir()
    ckpt.prune(tmp_path, keep_last=1)
    assert names(tmp_path) == ["step-00000003", "step-00000009"]
    assert ckpt.find_latest(tmp_path, warn=lambda m: None).name == "step-00000003"


def test_writing_the_same_step_again_replaces_it(tmp_path):
    write(tmp_path, 5, 0.1)
    write(tmp_path, 5, 0.7)
    assert names(tmp_path) == ["step-00000005"]
    assert json.loads((tmp_path / "step-00000005" / "meta.json").read_text())["test_accuracy"] == 0.7
