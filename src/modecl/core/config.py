"""Typed configuration: nested dataclasses loaded strictly from TOML.

Every section is a dataclass; a TOML file may set any subset of the fields. An unknown
key, a value of the wrong type, outside a ``Literal`` field's choices or outside a field's
range (:mod:`modecl.core.values`) stops with one message naming the file, the key path
(``pretrain.epochs``), the value and what is allowed, before any work starts.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from modecl.core.adapters import AdapterSettings
from modecl.core.distill import AverageOver
from modecl.core.files import read_text
from modecl.core.values import (
    ConfigError,
    Count,
    Fraction,
    NonEmpty,
    NonNegative,
    Positive,
    Probability,
    Range,
    Size,
)

T = TypeVar("T")


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is Annotated:
        base, *rules = typing.get_args(tp)
        value = _check_type(value, base, where)
        for rule in rules:
            if isinstance(rule, Range) and not rule.contains(value):
                raise ConfigError(f"{where}: {value!r} is out of range (allowed: {rule.allowed()})")
            if isinstance(rule, NonEmpty) and not value:
                raise ConfigError(f"{where}: must not be empty")
        return value
    if origin in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(tp) if o is not type(None)]
        if value is None and len(options) < len(typing.get_args(tp)):
            return None
        if len(options) == 1:  # X | None: X's own message
            return _check_type(value, options[0], where)
        for option in options:
            try:
                return _check_type(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not match {tp}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is dict:
        key_type, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return {
            _check_type(k, key_type, where): _check_type(v, item, f"{where}.{k}")
            for k, v in value.items()
        }
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected none")
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Any:
        return value
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown key '{path}' (valid: {', '.join(sorted(names))})")
        kwargs[key] = _check_type(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a check across fields (__post_init__): name the section
        raise ConfigError(f"{where}: {err}" if where else str(err)) from None


def toml_keys(path: str | Path | None) -> set[str]:
    """The dotted keys a TOML file sets (``continual.train.epochs``); empty for None."""
    if path is None:
        return set()

    def walk(table: dict[str, Any], prefix: str) -> set[str]:
        keys = set()
        for key, value in table.items():
            dotted = f"{prefix}{key}"
            keys |= walk(value, f"{dotted}.") if isinstance(value, dict) else {dotted}
        return keys

    return walk(tomllib.loads(read_text(Path(path), ConfigError, limit=2**20)), "")


def load_toml(cls: type[T], path: str | Path | None) -> T:
    """Load ``cls`` from a TOML file (``None``: defaults). Errors name the file."""
    if path is None:
        return cls()
    path = Path(path)
    text = read_text(path, ConfigError, limit=2**20)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


@dataclass
class TrainSettings:
    """One training recipe for every method: never tuned per method."""

    epochs: Count = 10
    lr: Positive = 3e-3
    batch_size: Count = 32
    warmup_fraction: Fraction = 0.1
    # "adamw" (the paper's); "sgd": plain SGD, each step -lr x gradient, the optimizer the
    # paper's first-order gradient-conflict argument assumes; "sgd-momentum": SGD with
    # `momentum` (heavy ball). Schedule, clipping and weight decay apply to each alike
    # (AdamW decouples its weight decay, SGD adds it to the gradient).
    optimizer: Literal["adamw", "sgd", "sgd-momentum"] = "adamw"
    momentum: Probability = 0.9  # sgd-momentum only
    weight_decay: NonNegative = 0.0
    grad_clip: Positive = 10.0
    max_train_samples: Count | None = None  # per task; None = all
    checkpoint_every: Size = 0  # write a step checkpoint every N steps (0: at task ends only)
    # "bf16": the step's forward under torch.autocast(bfloat16); adapters stay float32
    mixed_precision: Literal["no", "bf16"] = "no"
    # Batches of samples of similar length (runs of 50 batches of the shuffled order, each
    # sorted by length): less padding where lengths vary (README, "Batching").
    group_by_length: bool = False


@dataclass
class DistillSettings:
    """Distillation from the frozen host (:mod:`modecl.core.methods.distillation`)."""

    weight: NonNegative = 0.3  # lambda
    temperature: Positive = 2.0
    top_k: Count = 256
    average_over: AverageOver = "image"  # "attended", or "all" (the paper's code)
    batch_size: Count = 16  # image-generation pairs beside each task batch
    chunk_size: Count = 1024


@dataclass
class ReplaySettings:
    """Experience replay (:mod:`modecl.core.methods.replay`)."""

    buffer_size: Size = 100  # samples kept over all earlier tasks, equal share per task
    per_batch: Size = 8  # buffer samples mixed into each task batch


@dataclass
class EWCSettings:
    """EWC's penalty and Fisher estimate (:mod:`modecl.core.methods.ewc`)."""

    weight: NonNegative = 1000.0
    fisher_batches: Count = 16
    fisher_batch_size: Count = 8


@dataclass
class CLMoESettings:
    """CL-MoE's task-level router and momentum merge (:mod:`modecl.core.methods.cl_moe`)."""

    task_gate: Fraction = 0.5  # w: the task-level router's share (the paper's 1 - beta)
    top_k: Count = 2  # experts each token counts for the task-level router
    task_experts: Count = 2  # E_t: the most counted experts of a task
    momentum: Fraction = 0.7  # the share of theta_{t-1} kept in experts a task still uses
    samples: Count = 64  # training samples of a task counted and averaged (prototype)
    batch_size: Count = 16


@dataclass
class OLoRASettings:
    """O-LoRA's loss weights (:mod:`modecl.core.methods.o_lora`)."""

    orthogonal_weight: NonNegative = 0.5  # lambda_1
    l2_weight: NonNegative = 0.0  # lambda_2


@dataclass
class AGEMSettings:
    """A-GEM's episodic memory (:mod:`modecl.core.methods.a_gem`)."""

    memory_size: Size = 100  # samples kept over all earlier tasks, equal share per task
    batch_size: Count = 8  # memory samples of each step's reference gradient


@dataclass
class MonitorSettings:
    """The gradient-conflict monitor (:mod:`modecl.core.conflict`)."""

    enabled: bool = True
    every: Count = 10  # monitor one training step in this many; each costs about two probe passes
    probe_size: Size = 64  # held-out ("draw a <digit>", image) pairs from the test pool


@dataclass
class TrackingSettings:
    """Experiment tracking (:mod:`modecl.core.tracking`): accelerate trackers to log to."""

    # e.g. "tensorboard" or ["tensorboard", "wandb"] (a string or a list, as accelerate
    # takes it); held as a list
    log_with: str | list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.log_with, str):
            self.log_with = [self.log_with]


@dataclass
class ContinualSettings:
    """What a continual run of any method needs besides the host model and the tasks."""

    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    replay: ReplaySettings = field(default_factory=ReplaySettings)
    ewc: EWCSettings = field(default_factory=EWCSettings)
    cl_moe: CLMoESettings = field(default_factory=CLMoESettings)
    o_lora: OLoRASettings = field(default_factory=OLoRASettings)
    a_gem: AGEMSettings = field(default_factory=AGEMSettings)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
