"""`modecl train`'s configuration: how a transformers host is loaded, measured and trained."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from modecl.core.config import ContinualSettings, TrackingSettings
from modecl.core.scoring import Rule
from modecl.core.values import Count, NonEmpty, NonNegative, Seed, Size


@dataclass
class HostSettings:
    """How `modecl train` loads a transformers host and reads images."""

    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bfloat16 on a GPU, else float32
    image_size: Count | None = None  # resize images to this square; None: the host's processor
    gradient_checkpointing: bool = False
    # routed adapter layers by torch.compile (modecl.core.adapters.compile_adapters): about
    # peft LoRA's ops per step; each layer shape compiles once (seconds to a minute)
    compile_adapters: bool = False
    tokenize_batch_size: Count = 16  # images per VQ-tokenizer batch
    # Chameleon's taming `vqgan.ckpt`, to decode drawings when the checkpoint has no
    # model.vqmodel.decoder.* weights (modecl.hosts.vqgan); None: the checkpoint's or none
    vqgan: str | None = None


@dataclass
class HostEvalSettings:
    """What `modecl train` measures after every task."""

    max_new_tokens: Count = 16  # greedy answer length limit
    batch_size: Count = 16
    max_test_samples: Count | None = None  # per task; None = all
    # per stage: test pairs of the pairs file drawn, and images drawn per concept prompt
    draws: Size = 8
    temperature: NonNegative = 1.0  # 0: greedy
    top_k: Size = 0  # 0: every code
    clip_model: str | None = None  # a local CLIP directory (save_pretrained); None: no CLIP


@dataclass
class TrainConfig:
    """`modecl train`: continual training of a transformers host on JSONL or CoIN tasks."""

    seed: Seed = 0
    continual: ContinualSettings = field(default_factory=ContinualSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    host: HostSettings = field(default_factory=HostSettings)
    eval: HostEvalSettings = field(default_factory=HostEvalSettings)
    # task name -> rule (overrides a task file's; a CoIN folder's default is the paper's rule)
    scoring: dict[str, Rule] = field(default_factory=dict)
    # task name -> its closed answer set, for constrained accuracy of an open-ended task
    answer_sets: dict[str, Annotated[list[str], NonEmpty()]] = field(default_factory=dict)
