"""dist_cifar.config in-process: YAML quirks coerced, and every kind of mistake refused with the key named."""

from __future__ import annotations

import pytest

from dist_cifar.config import ConfigError, dump_yaml, from_dict, load_config, to_dict


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    monkeypatch.delenv("DIST_CIFAR_DATA", raising=False)


def test_yaml_1_1_reads_1e_3_as_text_and_the_config_takes_it_as_a_number(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  weight_decay: 5e-4\nschedule:\n  final_lr_fraction: 1\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 0.001 and type(cfg.optim.lr) is float
    assert cfg.optim.weight_decay == 0.0005
    assert cfg.schedule.final_lr_fraction == 1.0 and type(cfg.schedule.final_lr_fraction) is float
    assert load_config(None, ["optim.lr=2e-2"]).optim.lr == 0.02


@pytest.mark.parametrize("text, value", [("no", "no"), ("bf16", "bf16"), ("null", None), ("fp16", "fp16")])
def test_mixed_precision_no_is_the_string_no(text, value):
    assert load_config(None, [f"train.mixed_precision={text}"]).train.mixed_precision == value


@pytest.mark.parametrize("override, words", [
    ("train.epoch=3", ["unknown config key", "train.epoch"]),
    ("modle.name=fastnet", ["unknown config key", "modle"]),
    ("train.epochs=0", ["train.epochs", ">= 1"]),
    ("optim.momentum=1.5", ["optim.momentum", "between 0.0 and 1.0"]),
    ("train.tta_level=3", ["train.tta_level", "between 0 and 2"]),
    ("model.widths=[8, 0, 8]", ["model.widths", ">= 1"]),
    ("model.name=vgg", ["model.name", "tutorial_net", "fastnet"]),
    ("schedule.name=step", ["schedule.name", "cosine"]),
    ("train.mixed_precision=yes", ["train.mixed_precision", "bf16"]),
    ("train.epochs=2.5", ["train.epochs", "integer"]),
    ("train.epochs=two", ["train.epochs", "integer"]),
    ("train.epochs=true", ["train.epochs", "integer"]),
    ("model.compile=1", ["model.compile", "true or false"]),
    ("optim.lr=fast", ["optim.lr", "number"]),
    ("optim.lr=.inf", ["optim.lr", "finite"]),
    ("data.mean=0.5", ["data.mean", "list"]),
    ("train=5", ["train", "mapping"]),
    ("optim.betas=[0.9, 1.0]", ["optim.betas"]),
    ("preempt.signals=[SIGKILL]", ["SIGKILL"]),
    ("noequals", ["key.sub=value"]),
])
def test_mistakes_are_one_config_error_naming_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_nesterov_needs_momentum():
    with pytest.raises(ConfigError, match="nesterov"):
        load_config(None, ["optim.nesterov=true", "optim.momentum=0"])
    assert load_config(None, ["optim.nesterov=true", "optim.momentum=0.9"]).optim.nesterov is True


def test_bad_yaml_files(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  epochs: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty).train.epochs == load_config(None).train.epochs
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError):  # safe loader: no Python objects from YAML
        load_config(unsafe)


def test_overrides_win_over_the_file_and_survive_a_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 5\n  label_smoothing: 0.1\nmodel:\n  widths: [8, 16, 32]\n")
    cfg = load_config(path, ["train.epochs=7", "model.widths=[4, 4, 4]"])
    assert (cfg.train.epochs, cfg.train.label_smoothing, cfg.model.widths) == (7, 0.1, [4, 4, 4])
    import yaml

    again = from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert to_dict(again) == to_dict(cfg)
    saved = to_dict(cfg)
    saved["train"]["epochs"] = 0
    with pytest.raises(ConfigError, match="train.epochs"):
        from_dict(saved)  # a saved config is checked like a fresh one
