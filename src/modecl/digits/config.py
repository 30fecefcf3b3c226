"""The digits benchmark's configuration: its host model and a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from modecl.core.config import ConfigError, ContinualSettings, TrackingSettings
from modecl.core.values import (
    Count,
    Fraction,
    NonEmpty,
    NonNegative,
    Positive,
    Probability,
    Range,
    Seed,
    Size,
)

OpenFraction = Annotated[float, Range(low=0, high=1, low_open=True, high_open=True)]


@dataclass
class DataConfig:
    seed: Seed = 0  # the one fixed split; independent of the run seed
    pretrain_fraction: OpenFraction = 0.6
    train_fraction: OpenFraction = 0.2  # continual-learning train pool; the rest is the test pool
    val_fraction: OpenFraction = 0.15  # share of the pre-training pool held out for validation

    def __post_init__(self) -> None:
        if self.pretrain_fraction + self.train_fraction >= 1:
            raise ConfigError(
                "pretrain_fraction + train_fraction must be below 1 (the rest is the test pool), "
                f"got {self.pretrain_fraction} + {self.train_fraction}"
            )


@dataclass
class CodebookConfig:
    codes: Annotated[int, Range(low=2)] = 64
    seed: Seed = 0


@dataclass
class ModelConfig:
    hidden_size: Count = 128
    intermediate_size: Count = 352
    num_layers: Count = 4
    num_heads: Count = 4
    max_positions: Count = 64

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} must be a multiple of num_heads {self.num_heads}"
            )


@dataclass
class PretrainConfig:
    epochs: Count = 10
    batch_size: Count = 32
    lr: Positive = 2e-3
    weight_decay: NonNegative = 0.1
    warmup_fraction: Fraction = 0.05
    preview_digits: list[int] = field(default_factory=lambda: [0, 1, 2])
    preview_per_task: Size = 120  # preview samples drawn per task per epoch
    caption_copies: Size = 4  # augmented captioning copies of each image per epoch
    shift_prob: Fraction = 0.5  # captioning inputs only: random 1-pixel shift
    noise_std: NonNegative = 2.0  # captioning inputs only: pixel noise (pixel range 0..16)
    eval_from_epoch: Count = 5  # validation-based checkpoint selection starts here
    eval_every: Count = 1
    ema_decay: Probability = 0.995  # per step

    def __post_init__(self) -> None:
        if self.eval_from_epoch > self.epochs:
            raise ConfigError(
                f"eval_from_epoch {self.eval_from_epoch} is after the last epoch {self.epochs}"
            )


@dataclass
class GenerationConfig:
    temperature: NonNegative = 0.7
    top_k: Size = 8  # 0: every code
    samples_per_digit: Count = 20


@dataclass
class GateConfig:
    # 0.02 below the lowest test captioning of host seeds 0-2 under three CPU kernel paths
    # (benchmarks/pretrain_seeds.py; docs/digits-study.md): the aim of 0.95 sits on the plateau
    captioning: Fraction = 0.93
    generation: Fraction = 0.90


@dataclass
class DigitsConfig:
    """Every setting of the embedded digits host model (keyed by ``pretrain.cache_key``)."""

    seed: Seed = 0
    data: DataConfig = field(default_factory=DataConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    spatial_margin: Fraction = 0.1  # |top - bottom| ink below this share of all ink: ambiguous


@dataclass
class EvalSettings:
    samples_per_digit: Count = 20  # drawn images per digit for generation accuracy and FD
    grid_per_digit: Count = 2  # drawn images per digit kept for the report's picture grid
    max_test_samples: Count | None = None  # per task; None = the whole test pool

    def __post_init__(self) -> None:
        if self.grid_per_digit > self.samples_per_digit:
            raise ConfigError(
                f"grid_per_digit {self.grid_per_digit} exceeds samples_per_digit "
                f"{self.samples_per_digit} (the grid shows some of the drawn images)"
            )


@dataclass
class RunConfig:
    """A benchmark run: host model, task sequence, methods, and the shared recipe."""

    host: DigitsConfig = field(default_factory=DigitsConfig)
    tasks: Annotated[list[str], NonEmpty()] = field(
        default_factory=lambda: ["parity", "comparison", "arithmetic", "mirrored", "spatial"]
    )
    methods: Annotated[list[str], NonEmpty()] = field(
        default_factory=lambda: [
            "seq-lora",
            "moe-lora",
            "lwf",
            "replay",
            "ewc",
            "mode",
            "mode-task",
            "mode-sample",
            "mode-no-kd",
            "mode-text-lora",
        ]
    )
    seeds: Count = 1  # run seeds 0..seeds-1 on every host
    # Hosts the study repeats on: host seeds host.seed .. host.seed + hosts - 1 (a trained
    # host is a sample too: the findings are stated over hosts and seeds)
    hosts: Count = 1
    continual: ContinualSettings = field(default_factory=ContinualSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
