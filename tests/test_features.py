"""Training features end to end: real trainer processes on real CIFAR-10 images, checked through what a run
leaves on disk (metrics.jsonl, results.json, checkpoints, model.safetensors) and the test-only sample ledger.

Seven runs carry all the features; each is started once, the first time a test needs it:
  A  tutorial_net, batch 32, cosine schedule, evaluation every 2 epochs     (the reference)
  B  A as batch 8 x 4 accumulation steps                                    grad_accum_steps
  C  A as 2 ranks x batch 8 x 2 accumulation steps, channels_last           gloo group, channels_last
  G  A with target_accuracy (and torch.compile where a C++ compiler exists) target_accuracy, compile
  D  SGD without momentum, clipping, lr per 64 images, EMA, TTA level 2,    grad_clip_norm, lr_reference_batch,
     a checkpoint after every step                                          ema_decay, tta_level
  E  fastnet (whitening, bias frozen after epoch 1), lookahead every 3,     fastnet, lookahead
     airbench-like augmentation, a checkpoint after every step
  F  a learning rate that rises until training falls apart, keep_last=1    keep-best pruning
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import run_train, tail
from dist_cifar.state.checkpoint import load_state
from dist_cifar.config import DataConfig, ModelConfig
from dist_cifar.data.sources import load_dataset
from dist_cifar.engine.evaluation import predict_logits
from dist_cifar.models import build_model
from dist_cifar.data.batches import normalize

COMMON = ["--config", "configs/smoke.yaml", "tracking.plots=false", "train.threads=1"]
# A and everything compared with it: 640 images, 20 optimizer steps of 32 images per epoch
REFERENCE = ["data.train_subset=640", "train.epochs=3", "schedule.name=cosine", "schedule.final_lr_fraction=0.1",
             "train.eval_every_epochs=2"]
AIRBENCH_MEAN, AIRBENCH_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
RUNS = {
    "A": REFERENCE + ["train.per_device_batch_size=32"],
    "B": REFERENCE + ["train.per_device_batch_size=8", "train.grad_accum_steps=4"],
    "C": REFERENCE + ["train.per_device_batch_size=8", "train.grad_accum_steps=2", "model.channels_last=true"],
    "G": REFERENCE + ["train.per_device_batch_size=32", "train.target_accuracy=0.2"],
    # 10 steps of 2 x 16 images; lr 0.2 per 64 images = 0.1 for 32; every step's gradient clipped to norm 0.05
    "D": ["data.train_subset=320", "optim.name=sgd", "optim.momentum=0", "optim.lr=0.2", "optim.lr_reference_batch=64",
          "train.per_device_batch_size=16", "train.grad_accum_steps=2", "train.grad_clip_norm=0.05",
          "train.ema_decay=0.8", "train.tta_level=2", "checkpoint.every_steps=1", "checkpoint.keep_last=100"],
    # 2 epochs of 8 steps of 64 images
    "E": ["data.train_subset=512", f"data.mean={AIRBENCH_MEAN}", f"data.std={AIRBENCH_STD}",
          "data.augment.crop_padding=2", "data.augment.flip=true", "data.augment.flip_alternate=true",
          "model.name=fastnet", "model.widths=[8, 16, 16]", "model.channels_last=true", "model.whiten_bias_epochs=1",
          "optim.name=sgd", "optim.lr=0.2", "optim.momentum=0.85", "optim.nesterov=true", "optim.weight_decay=0.001",
          "optim.norm_lr_scale=4", "optim.decay_norm=true", "schedule.name=onecycle", "schedule.warmup_fraction=0.23",
          "schedule.initial_lr_fraction=0.2", "schedule.final_lr_fraction=0.07", "train.label_smoothing=0.2",
          "train.lookahead_every=3", "train.lookahead_decay=0.95", "train.epochs=2", "train.per_device_batch_size=64",
          "train.eval_every_epochs=0", "train.eval_batch_size=1000", "checkpoint.every_steps=1",
          "checkpoint.keep_last=100"],
    # AdamW lr rising linearly from 0.003 to 0.05 over 3 epochs: measured test accuracy 9.3 %, 15.5 %, 10.0 %
    "F": ["data.train_subset=640", "train.per_device_batch_size=32", "train.epochs=3", "optim.lr=0.05",
          "schedule.name=onecycle", "schedule.warmup_fraction=1.0", "schedule.initial_lr_fraction=0.06",
          "checkpoint.keep_last=1"],
}
NPROCS = {"C": 2}
# Largest |difference| of any weight between A and a run that splits A's global batch differently,
# measured on this machine (2 CPU cores, torch 2.14.1): B 5.6e-6, C 5.7e-6, G (compiled) 1.3e-6, for weights
# up to 0.16 in size. Summation order is all that differs; a wrong accumulation or averaging is far above this.
WEIGHT_TOLERANCE = 3e-5


def compiler_found() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_args):
    """run name -> its folder; each run happens once, on first use, with a sample ledger beside it."""
    root = tmp_path_factory.mktemp("features")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            out = root / name
            extra = list(RUNS[name])
            env = {"DIST_CIFAR_LEDGER": out / "ledger"}
            if name == "G" and compiler_found():
                extra.append("model.compile=true")
                env["TORCH_LOGS"] = "graph_code"  # prints what torch.compile captured: proof that it ran
            proc = run_train([*COMMON, *data_args, *extra, f"output_dir={out / 'run'}"], nprocs=NPROCS.get(name, 1),
                             env=env, timeout=300, launcher="ranks")
            assert proc.returncode == 0, f"run {name} failed:\n{tail(proc.stdout)}"
            (out / "output.txt").write_text(proc.stdout)
            done[name] = out
        return done[name]

    return get


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]


def results(out: Path) -> dict:
    return json.loads((out / "run" / "results.json").read_text())


def checkpoints(out: Path) -> list[Path]:
    return sorted((out / "run" / "checkpoints").glob("step-*"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def ledger(out: Path) -> dict[tuple[int, int], list[list[int]]]:
    """(epoch, optimizer step) -> the sample lists of its micro-steps on every rank."""
    files = sorted((out / "ledger").glob("rank*-pid*.jsonl"))
    assert files, f"no sample ledger in {out / 'ledger'} (DIST_CIFAR_LEDGER)"
    steps: dict[tuple[int, int], list[list[int]]] = {}
    for path in files:
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            steps.setdefault((entry["epoch"], entry["step"]), []).append(entry["indices"])
    return steps


def assert_same_samples_per_step(reference: dict, other: dict, micro_batches: int, batch: int) -> None:
    assert reference.keys() == other.keys()
    for key, lists in other.items():
        assert len(lists) == micro_batches and all(len(part) == batch for part in lists), key
        flat = [i for part in lists for i in part]
        assert len(set(flat)) == len(flat), f"step {key}: a sample twice in one optimizer step"
        assert sorted(flat) == sorted(reference[key][0]), f"step {key}: other samples than one big batch"


# ---- gradient accumulation, on one process and on a 2-rank gloo group ----

def test_grad_accumulation_on_one_process_is_one_big_batch(runs):
    a, b = runs("A"), runs("B")
    big, accumulated = ledger(a), ledger(b)
    assert len(big) == 60 and all(len(v) == 1 and len(v[0]) == 32 for v in big.values())
    assert_same_samples_per_step(big, accumulated, micro_batches=4, batch=8)
    difference = max_difference(load_file(a / "run" / "model.safetensors"), load_file(b / "run" / "model.safetensors"))
    assert difference < WEIGHT_TOLERANCE, difference
    assert [r["lr"] for r in records(b)] == [r["lr"] for r in records(a)]  # one scheduler step per optimizer step
    assert [r["step"] for r in records(b)] == [20, 40, 60]


def test_grad_accumulation_on_two_ranks_is_one_big_batch(runs):
    a, c = runs("A"), runs("C")
    spread = ledger(c)
    assert_same_samples_per_step(ledger(a), spread, micro_batches=4, batch=8)  # 2 ranks x 2 micro-steps each
    ranks = {json.loads(p.read_text().splitlines()[0])["rank"] for p in (c / "ledger").glob("*.jsonl")}
    assert ranks == {0, 1}
    difference = max_difference(load_file(a / "run" / "model.safetensors"), load_file(c / "run" / "model.safetensors"))
    assert difference < WEIGHT_TOLERANCE, difference  # channels_last as well: the same arithmetic in another layout
    assert results(c)["world_size"] == 2 and results(c)["num_eval_samples"] == 10000
    assert [r["test_accuracy"] for r in records(c)] == [r["test_accuracy"] for r in records(a)]


# ---- schedule, evaluation cadence, early stop, compile ----

def test_cosine_schedule_as_logged(runs):
    # after epoch e of 3 the schedule is at e/3: 0.1 + 0.9 (1 + cos(pi e / 3)) / 2 of AdamW's lr 0.003
    expected = [0.003 * f for f in (0.775, 0.325, 0.1)]
    assert [r["lr"] for r in records(runs("A"))] == pytest.approx(expected, rel=1e-9)


def test_evaluation_every_second_epoch_and_at_the_end(runs):
    a = records(runs("A"))
    assert [r["epoch"] for r in a] == [1, 2, 3]
    assert a[0]["test_accuracy"] is None
    assert 0.15 < a[1]["test_accuracy"] < 1 and 0.15 < a[2]["test_accuracy"] < 1
    assert results(runs("A"))["accuracy"] == a[2]["test_accuracy"]


def test_target_accuracy_stops_at_the_first_evaluation_that_reaches_it(runs):
    g, a = runs("G"), records(runs("A"))
    assert a[1]["test_accuracy"] >= 0.2, "the reference no longer reaches the target at epoch 2: retune"
    mine = records(g)
    # epoch 1 is not evaluated (every 2 epochs), so the run can only stop after epoch 2 of 3
    assert [r["epoch"] for r in mine] == [1, 2]
    assert [r["test_accuracy"] for r in mine] == [None, a[1]["test_accuracy"]]
    res = results(g)
    assert (res["target_accuracy"], res["target_reached_at_epoch"], res["epochs"], res["steps"]) == (0.2, 2, 2, 40)
    assert res["target_reached_elapsed_seconds"] == mine[1]["elapsed_seconds"]
    assert res["target_reached_train_seconds"] == mine[1]["train_seconds"]
    assert [p.name for p in checkpoints(g)] == ["step-00000020", "step-00000040"]


def test_compiled_model_trains_like_the_eager_one(runs):
    if not compiler_found():
        pytest.skip("torch.compile on the CPU needs a C++ compiler (g++, c++ or clang++): none on PATH")
    g, a = runs("G"), runs("A")
    output = (g / "output.txt").read_text()
    assert "__compiled_fn" in output and "[__graph_code]" in output, "torch.compile did not capture the model"
    # G stopped at step 40 (target): A's checkpoint of step 40 holds the eager weights of the same moment
    difference = max_difference(load_file(a / "run" / "checkpoints" / "step-00000040" / "model.safetensors"),
                                load_file(g / "run" / "model.safetensors"))
    assert difference < WEIGHT_TOLERANCE, difference


# ---- clipping, lr per reference batch, EMA, test-time augmentation (run D) ----

def tutorial_keys() -> list[str]:
    """state_dict order of the tutorial net: the order of the averaged tensors in state.pt."""
    return list(build_model(ModelConfig(name="tutorial_net"), 10).state_dict())


def test_clipped_steps_have_length_lr_times_clip_norm(runs):
    """SGD without momentum: each step moves the weights by lr x the clipped gradient, so its length is
    0.1 (0.2 per 64 images at 32) x 0.05 = 0.005; unclipped steps here are about 20x longer, and an
    unscaled lr would give 0.01."""
    d = runs("D")
    live = [load_file(c / "model.safetensors") for c in checkpoints(d)]
    assert len(live) == 10
    lengths = [math.sqrt(sum(((b[k] - a[k]).double() ** 2).sum().item() for k in a)) for a, b in zip(live, live[1:])]
    assert lengths == pytest.approx([0.005] * 9, rel=1e-4)  # measured within 7e-6 relative


def test_ema_weights_are_the_average_and_the_final_model(runs):
    d = runs("D")
    keys = tutorial_keys()
    folders = checkpoints(d)
    live = [load_file(c / "model.safetensors") for c in folders]  # checkpoints hold the live weights
    avg = [dict(zip(keys, load_state(c / "state.pt")["average"]["avg"])) for c in folders]
    for t in range(1, len(folders)):  # avg_t = 0.8 avg_t-1 + 0.2 w_t
        expected = {k: 0.8 * avg[t - 1][k] + 0.2 * live[t][k] for k in keys}
        assert max_difference(expected, avg[t]) < 1e-6, t  # measured 7.5e-9
    final = load_file(d / "run" / "model.safetensors")
    assert max_difference(final, avg[-1]) == 0.0
    assert max_difference(final, live[-1]) > 1e-3  # measured 3.3e-3: the average is not the last weights


def evaluate_here(weights: dict, split, tta_level: int, mean, std) -> list[list[int]]:
    """The confusion matrix of the tutorial net with `weights` on `split`, computed in this process."""
    net = build_model(ModelConfig(name="tutorial_net"), 10)
    net.load_state_dict(weights)
    net.eval()
    counts = torch.zeros(100, dtype=torch.int64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trainer (train.threads=1): the same arithmetic, to the last bit
    try:
        with torch.no_grad():
            for start in range(0, len(split), 500):
                x = normalize(torch.from_numpy(np.array(split.images[start:start + 500])), mean, std)
                y = torch.from_numpy(np.array(split.labels[start:start + 500]))
                counts += torch.bincount(y * 10 + predict_logits(net, x, tta_level).argmax(1), minlength=100)
    finally:
        torch.set_num_threads(threads)
    return counts.view(10, 10).tolist()


def test_evaluation_used_tta_level_2_and_the_ema_weights(runs, data_root):
    d = runs("D")
    test = load_dataset(DataConfig(name="imagefolder", root=str(data_root))).test
    final = load_file(d / "run" / "model.safetensors")
    reported = results(d)["confusion_matrix"]
    assert sum(map(sum, reported)) == 10000
    assert reported == evaluate_here(final, test, 2, [0.5] * 3, [0.5] * 3)
    assert reported != evaluate_here(final, test, 0, [0.5] * 3, [0.5] * 3)


# ---- fastnet and lookahead (run E) ----

def test_fastnet_whitens_the_training_patches_and_freezes_the_bias_after_epoch_1(runs, data_root):
    e = runs("E")
    folders = checkpoints(e)
    assert [int(f.name[5:]) for f in folders] == list(range(1, 17))
    weights = [load_file(c / "model.safetensors") for c in folders]
    whiten = weights[-1]["whiten.weight"]
    assert all(torch.equal(w["whiten.weight"], whiten) for w in weights)  # fixed: never trained
    train = load_dataset(DataConfig(name="imagefolder", root=str(data_root), train_subset=512), seed=0).train
    x = normalize(torch.from_numpy(np.array(train.images)), AIRBENCH_MEAN, AIRBENCH_STD)
    out = F.conv2d(x, whiten.float())
    assert torch.allclose(out[:, 12:], -out[:, :12], atol=1e-5)
    flat = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    moment = flat.T @ flat / len(flat)
    off_diagonal = moment - torch.diag(torch.diag(moment))
    # white: uncorrelated directions (1e-6 measured; 1.2e-3 when the moments were summed in float32), of
    # unit variance where the patches vary strongly; a direction of variance v comes out at v / (v + 5e-4)
    # (the eps), so the weakest are damped: measured 0.18 .. 1.0
    assert off_diagonal.abs().max() < 1e-5 and torch.diag(moment).max() == pytest.approx(1.0, abs=1e-3)
    assert (torch.diag(moment) > 0.1).all() and (torch.diag(moment) > 0.95).sum() >= 6
    bias = [w["whiten.bias"] for w in weights]
    assert bias[0].abs().max() > 0  # starts at zero (whitening init) and learns in epoch 1
    assert not torch.equal(bias[3], bias[7])
    assert all(torch.equal(b, bias[7]) for b in bias[8:])  # lr 0 from epoch 2 (steps 9..16)
    assert results(e)["model"] == "fastnet" and results(e)["accuracy"] > 0.12


def test_lookahead_resets_to_the_slow_weights_every_3_steps_and_at_each_epoch_end(runs):
    e = runs("E")
    keys = list(build_model(ModelConfig(name="fastnet", widths=[8, 16, 16]), 10).state_dict())
    floating = [k for k in keys if not k.endswith("num_batches_tracked")]
    folders = checkpoints(e)
    live = [load_file(c / "model.safetensors") for c in folders]
    slow = [dict(zip(floating, load_state(c / "state.pt")["average"]["avg"])) for c in folders]
    for step in range(1, 17):
        here, weights = slow[step - 1], {k: live[step - 1][k] for k in floating}
        if step % 3 == 0 or step in (8, 16):  # a lookahead step, or an epoch end (8 steps per epoch)
            assert max_difference(here, weights) == 0.0, step
        else:
            assert max_difference(here, weights) > 0, step  # the fast weights have moved on
        if step % 3 and step > 1:
            assert max_difference(here, slow[step - 2]) == 0.0, step  # the slow weights wait
        if step % 3 == 0:
            assert max_difference(here, slow[step - 2]) > 0, step  # and move toward the fast ones
    final = load_file(e / "run" / "model.safetensors")
    assert max_difference({k: final[k] for k in floating}, slow[-1]) == 0.0


# ---- pruning that keeps the best checkpoint (run F) ----

def test_keep_last_one_keeps_the_best_checkpoint_as_well(runs):
    f = runs("F")
    accuracy = {r["step"]: r["test_accuracy"] for r in records(f)}
    assert list(accuracy) == [20, 40, 60]
    best = max(accuracy, key=accuracy.get)
    assert best != 60, f"the last epoch is the best ({accuracy}): the run no longer tests keep-best; retune"
    assert [p.name for p in checkpoints(f)] == sorted([f"step-{best:08d}", "step-00000060"])
    for folder in checkpoints(f):
        assert json.loads((folder / "meta.json").read_text())["test_accuracy"] == accuracy[int(folder.name[5:])]
