"""`modecl train`'s configuration: how a transformers host is loaded, measured and trained."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from modecl.core.config import ContinualSettings


@dataclass
class HostSettings:
    """How `modecl train` loads a transformers host and reads images."""

    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bfloat16 on a GPU, else float32
    image_size: int | None = None  # resize images to this square; None: the host's processor
    gradient_checkpointing: bool = False
    tokenize_batch_size: int = 16  # images per VQ-tokenizer batch
    # Chameleon's taming `vqgan.ckpt`, to decode drawings when the checkpoint has no
    # model.vqmodel.decoder.* weights (modecl.hosts.vqgan); None: the checkpoint's or none
    vqgan: str | None = None


@dataclass
class HostEvalSettings:
    """What `modecl train` measures after every task."""

    max_new_tokens: int = 16  # greedy answer length limit
    batch_size: int = 16
    max_test_samples: int | None = None  # per task; None = all
    draws: int = 8  # test pairs of the pairs file drawn per stage (image generation)
    temperature: float = 1.0
    top_k: int = 0
    clip_model: str | None = None  # a local CLIP directory (save_pretrained); None: no CLIP


@dataclass
class TrainConfig:
    """`modecl train`: continual training of a transformers host on JSONL tasks."""

    seed: int = 0
    continual: ContinualSettings = field(default_factory=ContinualSettings)
    host: HostSettings = field(default_factory=HostSettings)
    eval: HostEvalSettings = field(default_factory=HostEvalSettings)
    scoring: dict[str, str] = field(default_factory=dict)  # task name -> rule (overrides files)
    # task name -> its closed answer set, for constrained accuracy of an open-ended task
    answer_sets: dict[str, list[str]] = field(default_factory=dict)
