"""The digits benchmark's configuration: its host model and a run."""

from __future__ import annotations

from dataclasses import dataclass, field

from modecl.core.config import ContinualSettings


@dataclass
class DataConfig:
    seed: int = 0  # the one fixed split; independent of the run seed
    pretrain_fraction: float = 0.6
    train_fraction: float = 0.2  # continual-learning train pool; the rest is the test pool
    val_fraction: float = 0.15  # share of the pre-training pool held out for validation


@dataclass
class CodebookConfig:
    codes: int = 64
    seed: int = 0


@dataclass
class ModelConfig:
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 64


@dataclass
class PretrainConfig:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    preview_digits: list[int] = field(default_factory=lambda: [0, 1, 2])
    preview_per_task: int = 120  # preview samples drawn per task per epoch
    caption_copies: int = 2  # augmented captioning copies of each image per epoch
    shift_prob: float = 0.8  # captioning inputs only: random 1-pixel shift
    noise_std: float = 1.0  # captioning inputs only: pixel noise (pixel range 0..16)
    eval_from_epoch: int = 20  # validation-based checkpoint selection starts here
    eval_every: int = 2
    ema_decay: float = 0.995  # per step


@dataclass
class GenerationConfig:
    temperature: float = 0.7
    top_k: int = 8
    samples_per_digit: int = 20


@dataclass
class GateConfig:
    captioning: float = 0.95
    generation: float = 0.90


@dataclass
class DigitsConfig:
    """Every setting of the embedded digits host model (keyed by ``pretrain.cache_key``)."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    spatial_margin: float = 0.1  # |top - bottom| ink below this share of all ink: ambiguous


@dataclass
class EvalSettings:
    samples_per_digit: int = 20  # drawn images per digit for generation accuracy and FD
    grid_per_digit: int = 2  # drawn images per digit kept for the report's picture grid
    max_test_samples: int | None = None  # per task; None = the whole test pool


@dataclass
class RunConfig:
    """A benchmark run: host model, task sequence, methods, and the shared recipe."""

    host: DigitsConfig = field(default_factory=DigitsConfig)
    tasks: list[str] = field(
        default_factory=lambda: ["parity", "comparison", "arithmetic", "mirrored", "spatial"]
    )
    methods: list[str] = field(
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
    seeds: int = 1
    continual: ContinualSettings = field(default_factory=ContinualSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
