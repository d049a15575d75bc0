"""Config loading: YAML + dotted overrides, and the one-line errors for user mistakes."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_cifar.config import Config, ConfigError, dump_yaml, from_dict, load_config, to_dict

REPO = Path(__file__).resolve().parent.parent


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\ntrain:\n  epochs: 5\noptim:\n  lr: 0.1\n")
    cfg = load_config(path, ["train.epochs=7", "optim.lr=1e-3", "data.mean=[0.4, 0.5, 0.6]", "output_dir=/x"])
    assert cfg.seed == 3 and cfg.train.epochs == 7 and cfg.optim.lr == 0.001
    assert cfg.data.mean == [0.4, 0.5, 0.6] and cfg.output_dir == "/x"
    assert isinstance(cfg.optim.lr, float)


def test_integer_lr_is_widened_to_float():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0


def test_round_trip_through_yaml():
    cfg = load_config(REPO / "configs" / "tutorial.yaml", ["seed=9"])
    again = from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert to_dict(again) == to_dict(cfg)


def test_repository_configs_load():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert len(configs) >= 2
    for path in configs:
        assert isinstance(load_config(path), Config)


def test_tutorial_config_is_the_tutorial():
    cfg = load_config(REPO / "configs" / "tutorial.yaml")
    assert (cfg.model.name, cfg.train.per_device_batch_size, cfg.train.epochs) == ("tutorial_net", 4, 2)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.nesterov) == ("sgd", 0.001, 0.9, False)
    assert cfg.data.mean == [0.5] * 3 and cfg.data.std == [0.5] * 3
    assert cfg.optim.weight_decay == 0 and cfg.train.label_smoothing == 0 and cfg.schedule.name == "constant"
    assert not cfg.data.augment.flip and cfg.data.augment.crop_padding == 0


def test_data_environment_variable(monkeypatch, tmp_path):
    (tmp_path / "train").mkdir()
    monkeypatch.setenv("DIST_CIFAR_DATA", str(tmp_path))
    cfg = load_config(REPO / "configs" / "tutorial.yaml")
    assert (cfg.data.name, cfg.data.root) == ("imagefolder", str(tmp_path))
    assert load_config(None, ["data.name=cifar10"]).data.name == "cifar10"  # overrides still win


@pytest.mark.parametrize("override, named", [
    ("train.epochs=0", "train.epochs"),
    ("train.epochs=-3", "train.epochs"),
    ("train.epochs=1.5", "train.epochs"),
    ("train.per_device_batch_size=0", "train.per_device_batch_size"),
    ("optim.lr=fast", "optim.lr"),
    ("optim.lr=-0.1", "optim.lr"),
    ("optim.lr=.nan", "optim.lr"),
    ("train.epochs=true", "train.epochs"),
    ("data.download=yes please", "data.download"),
    ("model.name=vgg", "model.name"),
    ("data.pipeline=gpu", "data.pipeline"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("trian.epochs=2", "trian"),
    ("train.epoch=2", "train.epoch"),
    ("train=3", "train"),
    ("data.mean=[0.5]", "data.mean"),
    ("preempt.signals=[SIGFOO]", "preempt.signals"),
    ("noequals", "noequals"),
])
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert named in message and "\n" not in message


@pytest.mark.parametrize("args", [
    ["--config", "configs/smoke.yaml", "train.epochs=0"],
    ["--config", "configs/smoke.yaml", "optim.lr=abc"],
    ["--config", "configs/smoke.yaml", "bogus.key=1"],
    ["--config", "configs/nope.yaml"],
])
def test_cli_reports_one_line_and_fails_before_any_work(args, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "dist_cifar/train.py", *args, f"output_dir={out}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dist_cifar: config error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # nothing was started


@pytest.mark.parametrize("command", [[sys.executable, "dist_cifar/train.py"], [str(Path(sys.executable).parent / "dist-cifar-train")]])
def test_print_config_shows_every_key_resolved_and_trains_nothing(command, tmp_path):
    """--print-config: the whole config as YAML (every key, the file and the overrides applied), exit 0,
    without importing torch or touching a run folder."""
    proc = subprocess.run([*command, "--print-config", "--config", "configs/tutorial.yaml", "train.epochs=7",
                           f"output_dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in __import__("os").environ.items() if k != "DIST_CIFAR_DATA"})
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    expected = to_dict(load_config(REPO / "configs" / "tutorial.yaml", ["train.epochs=7", f"output_dir={tmp_path / 'run'}"]))
    assert printed == expected and printed["train"]["epochs"] == 7
    assert not (tmp_path / "run").exists()


def test_print_config_with_a_bad_override_is_one_line():
    proc = subprocess.run([sys.executable, "dist_cifar/train.py", "--print-config", "train.epochz=3"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "train.epochz" in proc.stderr, proc.stderr
