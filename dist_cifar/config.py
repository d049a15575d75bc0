"""The run configuration: typed dataclasses, loaded from YAML, then dotted command-line overrides."""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dist_cifar.errors import ConfigError


def option(default=dataclasses.MISSING, *, factory=dataclasses.MISSING, low=None, high=None, choices=None,
           resume=False):
    """A config field and the facts about it, declared once: its allowed values (`low`/`high` bounds,
    checked on every item of a list, or `choices`), and `resume=True` when a checkpoint written with
    another value cannot continue this run (the data order, the model or the optimizer would change)."""
    meta = {"low": low, "high": high, "choices": choices, "resume": resume}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class AugmentConfig:
    crop_padding: int = option(0, low=0, resume=True)  # pixels of padding before a random crop back to image_size (0 = no crop)
    flip: bool = option(False, resume=True)  # random horizontal flip
    flip_alternate: bool = option(False, resume=True)  # flip every other epoch instead of at random (airbench's trick)


@dataclass
class DataConfig:
    # cifar10 (torchvision) | imagefolder (root/train/<class>/*, root/test/<class>/*)
    name: str = option("cifar10", choices=("cifar10", "imagefolder"))
    root: str = "data"
    download: bool = False  # cifar10 only
    # device (dataset held on the training device) | loader (torch DataLoader)
    pipeline: str = option("device", choices=("device", "loader"))
    num_workers: int = option(2, low=0)  # loader pipeline only
    train_subset: int = option(0, low=0, resume=True)  # train on this many images (a seeded draw); 0 = all
    image_size: int = option(32, low=8)  # pixels; imagefolder images are resized to this
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    cache_dir: str = ""  # decoded uint8 cache; "" = $DIST_CIFAR_CACHE or ~/.cache/dist_cifar
    max_image_pixels: int = option(89_478_485, low=1)  # imagefolder: refuse larger images (width x height; PIL's decompression-bomb guard)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    name: str = option("tutorial_net", choices=("tutorial_net", "cpu_net", "resnet18", "fastnet"), resume=True)
    # fastnet conv-group / cpu_net stage widths
    widths: list[int] = option(factory=lambda: [64, 256, 256], low=1, resume=True)
    channels_last: bool = False
    compile: bool = False  # torch.compile the model
    sync_batchnorm: bool = False  # GPU only: BatchNorm statistics over all ranks
    # fastnet: train the whitening layer's bias for this many epochs, then freeze it; 0 = always
    whiten_bias_epochs: int = option(0, low=0)


@dataclass
class OptimConfig:
    name: str = option("sgd", choices=("sgd", "adamw"), resume=True)
    lr: float = option(0.001, low=0.0)  # peak learning rate for the mean loss of one optimizer step (see lr_reference_batch)
    lr_reference_batch: int = option(0, low=0)  # >0: lr is per this many images, scaled linearly to the global batch; 0: as given
    momentum: float = option(0.9, low=0.0, high=1.0)  # sgd
    nesterov: bool = False  # sgd
    weight_decay: float = option(0.0, low=0.0)  # sgd: decoupled (p -= lr * wd * p); adamw: its own decoupled decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    norm_lr_scale: float = option(1.0, low=0.0)  # lr multiplier for normalisation-layer (BatchNorm) parameters
    decay_norm: bool = False  # apply weight_decay to normalisation-layer parameters too


@dataclass
class ScheduleConfig:
    name: str = option("constant", choices=("constant", "linear", "cosine", "onecycle"))
    # of all optimizer steps, linear from initial_lr_fraction to the peak lr
    warmup_fraction: float = option(0.0, low=0.0, high=1.0)
    initial_lr_fraction: float = option(0.0, low=0.0, high=1.0)  # lr at step 0 during warmup, as a fraction of the peak
    final_lr_fraction: float = option(0.0, low=0.0, high=1.0)  # lr at the last step, as a fraction of the peak


@dataclass
class TrainConfig:
    epochs: int = option(2, low=1, resume=True)
    # Images per optimizer step, all processes and accumulation steps together; 0 = per_device_batch_size
    # x processes x grad_accum_steps. When set, the per-process batch is derived from it and the world
    # size: the same run on any number of processes that divides it, and a checkpoint continues on any
    # of them.
    global_batch_size: int = option(0, low=0)
    # Images per process per micro-step; null = derived from global_batch_size, or 4 when neither is set.
    per_device_batch_size: typing.Optional[int] = option(None, low=1)
    grad_accum_steps: int = option(1, low=1)  # micro-steps per optimizer step
    # no | fp16 | bf16; null = as launched (accelerate --mixed_precision), else no
    mixed_precision: typing.Optional[str] = option(None, choices=("no", "fp16", "bf16", None))
    label_smoothing: float = option(0.0, low=0.0, high=1.0)
    grad_clip_norm: float = option(0.0, low=0.0)  # 0 = no clipping
    ema_decay: float = option(0.0, low=0.0, high=1.0)  # exponential moving average of the weights, per optimizer step; 0 = off
    lookahead_every: int = option(0, low=0)  # lookahead: pull fast weights toward slow ones every k optimizer steps; 0 = off
    lookahead_decay: float = option(0.95, low=0.0, high=1.0)  # per step; the pull every k steps is decay^k x (t / T)^3
    resume: str = ""  # "" = fresh run | auto = newest complete checkpoint in output_dir | a checkpoint path
    max_steps: int = option(0, low=0)  # stop after this many optimizer steps (benchmarks); 0 = run all epochs
    eval_every_epochs: int = option(1, low=0)  # 0 = evaluate only at the end
    eval_batch_size: int = option(500, low=1)  # images per process
    tta_level: int = option(0, low=0, high=2)  # test-time augmentation: 0 none, 1 mirror, 2 mirror and 1-pixel shifts
    target_accuracy: float = option(0.0, low=0.0, high=1.0)  # stop early once test accuracy reaches this (0..1); 0 = never
    threads: int = option(0, low=0)  # torch intra-op threads per process on CPU; 0 = cores / local processes
    # stop with an error (exit 1) once a loss, gradient norm or weight is NaN or inf, checked on the device and
    # read where the ranks meet anyway (every preempt.check_every_steps steps, checkpoints, the epoch's end)
    stop_on_nonfinite: bool = True
    write_predictions: bool = True  # predictions.csv in the run folder: one row per test image (index, path, label, prediction, confidence)


@dataclass
class CheckpointConfig:
    every_steps: int = option(0, low=0)  # full-state checkpoint every N optimizer steps; 0 = off
    every_epochs: int = option(1, low=0)  # and at the end of every N epochs; 0 = off
    keep_last: int = option(2, low=1)  # newest checkpoints kept (the best one is kept as well)


@dataclass
class PreemptConfig:
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    requeue: bool = True  # under SLURM the main process runs `scontrol requeue $SLURM_JOB_ID`
    check_every_steps: int = option(10, low=1)  # how often ranks agree on stopping (a collective), multi-process runs


@dataclass
class DistConfig:
    # Longest wait, in seconds, in one collective (all-reduce, barrier, broadcast) before the job ends
    # with an error naming the rank and phase: a stuck or vanished rank. The longest legitimate wait is
    # the main process writing a checkpoint or the final results while the others wait (seconds);
    # loading data gets its own, longer limit (decoding an image folder on one node).
    timeout_seconds: int = option(300, low=5)
    # At every epoch's end (multi-process runs) the main process names the slowest rank when its busy
    # seconds per step (training time less time spent waiting for the others) exceed this many times the median.
    straggler_ratio: float = option(1.3, low=1.0)


@dataclass
class WandbConfig:
    mode: str = option("disabled", choices=("online", "offline", "disabled"))
    project: str = "dist_cifar"
    entity: str = ""
    run_name: str = ""
    tags: list[str] = field(default_factory=list)


@dataclass
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    plots: bool = True  # write training curves and confusion matrix pictures at the end
    tensorboard: bool = False  # TensorBoard event files in run_dir/tensorboard/ (pip install dist_cifar[tensorboard])


@dataclass
class ProfileConfig:
    # torch.profiler over one window of optimizer steps on every rank: a Chrome trace per rank in
    # run_dir/profile/ and a summary printed by the main process. Counted from the start (or resume).
    enabled: bool = False
    wait_steps: int = option(5, low=0)  # optimizer steps run unprofiled first (start-up, first-touch allocations)
    warmup_steps: int = option(2, low=0)  # optimizer steps profiled and discarded (the profiler's own start-up)
    active_steps: int = option(5, low=1)  # optimizer steps recorded into the trace and the summary
    memory: bool = False  # record tensor allocations and frees (profile_memory): slower steps, a larger trace
    with_stack: bool = False  # the Python source line of every op: much slower steps, a much larger trace
    top_ops: int = option(10, low=1)  # operations listed in the summary, by self time


@dataclass
class Config:
    seed: int = option(0, low=0, resume=True)
    output_dir: str = ""  # the run folder; "" = runs/<config name>-<timestamp>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preempt: PreemptConfig = field(default_factory=PreemptConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


def fields_with_facts(cls=Config, prefix: str = ""):
    """(dotted key, metadata) of every leaf field declared with `option`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from fields_with_facts(tp, f"{prefix}{f.name}.")
        elif f.metadata:
            yield prefix + f.name, f.metadata


FACTS = tuple(fields_with_facts())  # the declared facts, collected once
RESUME_KEYS = tuple(key for key, meta in FACTS if meta["resume"])


SIGNAL_NAMES = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")

# Points any config at a local copy of the data: an image folder (with train/ and test/) or a
# torchvision CIFAR-10 root. Command-line overrides still win.
DATA_ENV = "DIST_CIFAR_DATA"


def data_layout(root: str | os.PathLike) -> str:
    """The one rule for a data folder given without its layout ($DIST_CIFAR_DATA, --data-root):
    an image folder when it has train/ or test/ class folders, else a torchvision CIFAR-10 root."""
    root = Path(root)
    return "imagefolder" if (root / "train").is_dir() or (root / "test").is_dir() else "cifar10"


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, value, tp):
    """Check `value` against the annotated type `tp`; return it (ints widened to floats)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string: accept numeric text
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return value
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare no/yes as a boolean: mixed_precision=no
            value = "yes" if value else "no"
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp} for {key}")


def _merge(obj, data: dict, prefix: str = "") -> None:
    """Write the (nested) mapping `data` into the dataclass instance `obj`, type-checking each key."""
    hints = typing.get_type_hints(type(obj))
    for name, value in data.items():
        key = f"{prefix}{name}"
        if not isinstance(name, str) or name not in hints:
            known = ", ".join(prefix + n for n in hints)
            raise ConfigError(f"unknown config key {key!r} (known here: {known})")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a mapping of its sub-keys, got {value!r}")
            _merge(getattr(obj, name), value, key + ".")
        else:
            setattr(obj, name, _coerce(key, value, tp))


def _get(cfg: Config, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> None:
    """Reject impossible values, naming the key."""
    for key, meta in FACTS:
        value, allowed, low, high = _get(cfg, key), meta["choices"], meta["low"], meta["high"]
        if allowed is not None and value not in allowed:
            shown = ", ".join("null" if a is None else a for a in allowed)
            raise ConfigError(f"{key} must be one of {shown}; got {value!r}")
        if low is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            if item is not None and item < low or (high is not None and item > high):
                rng = f">= {low}" if high is None else f"between {low} and {high}"
                raise ConfigError(f"{key} must be {rng}, got {item!r}")
    if len(cfg.data.mean) != 3 or len(cfg.data.std) != 3:
        raise ConfigError("data.mean and data.std must each have 3 values (R, G, B)")
    if any(s <= 0 for s in cfg.data.std):
        raise ConfigError(f"data.std must be > 0, got {cfg.data.std}")
    if len(cfg.model.widths) != 3:
        raise ConfigError(f"model.widths must have 3 values, got {cfg.model.widths}")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {cfg.optim.betas}")
    for sig in cfg.preempt.signals:
        if sig not in SIGNAL_NAMES:
            raise ConfigError(f"preempt.signals: unknown signal {sig!r} (use {', '.join(SIGNAL_NAMES)})")
    if cfg.optim.nesterov and cfg.optim.momentum == 0:
        raise ConfigError("optim.nesterov needs optim.momentum > 0")


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep the literal text, the type check decides
    return key, value


def _nest(key: str, value) -> dict:
    out: dict = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- $DIST_CIFAR_DATA <- dotted overrides; then validated."""
    cfg = Config()
    if path is not None:
        _merge(cfg, read_yaml(path))
    data_env = os.environ.get(DATA_ENV)
    if data_env:
        cfg.data.root = data_env
        cfg.data.name = data_layout(data_env)
    for text in overrides:
        key, value = _parse_override(text)
        _merge(cfg, _nest(key, value))
    validate(cfg)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """Rebuild a config saved by `to_dict` (checkpoints, config.yaml)."""
    cfg = Config()
    _merge(cfg, data)
    validate(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
