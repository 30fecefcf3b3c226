r"""The adapter layer: MoDE, LoRA, MoE-LoRA and the MoDE ablation as configurations of one layer.

Each target `nn.Linear` of the frozen host model is replaced by an `AdapterLinear` holding
it as `base`. All experts of all branches live in one stacked pair of matrices::

      x ─┬──────────────── base (frozen W) ───────────────────────────────┐
         │                                                                ▼
         ├─ dropout ─► A (E·r × in) ─► h ─► h ⊙ gate ─► B (out × E·r) ─► (+) ─► y
         │                                     ▲
         └─ router R (N × in), softmax in f32 ─┘   (only for a branch with N > 1 experts)

    y      = W x + alpha/r · B (gate ⊙ A dropout(x))
    A      = [A_1; ...; A_E],  B = [B_1, ..., B_E]       (expert e owns r rows of A, r columns of B)
    gate   = softmax(l),  l_e = -inf if expert e is not of the token's branch, else
             (R x)_e in a routed branch, 0 in a one-expert branch;  repeated over e's r components

so gate_e is the router's weight p_e = softmax(R x)_e in a routed branch, exactly 1 in a
one-expert branch and exactly 0 outside the token's branch (one expert in all: no gate);
a token's adapter output is alpha/r · Σ_e p_e B_e A_e dropout(x) over the experts of the
branch it is routed to: the router-weighted sum of that branch's LoRA experts. One `A` matmul,
one `B` matmul, no loop over experts. A branch not in play for a token multiplies its
components by an exact 0, so it receives exactly zero gradient from that token (and the
router none from tokens of the other branch). One dropout mask is shared by all experts.

Two implementations, the same floats. Where a router is in play, by default the layer's whole
delta (dropout, A, router, gate, B, the add) is one autograd node with its backward written
out (`_FusedDelta`), each product and elementwise op computed as autograd computes it for the
plain ops (the reference: elsewhere, under autocast, and with `RoutingContext.fused = False`),
bit for bit. It keeps the layer input as given and the dropout mask, and recomputes the
float32 input and the dropped-out input in the backward: under a bf16 host it keeps no
float32 copy of the input (peft's LoRA keeps its dropped-out input; the reference keeps that
and the float32 copy its router reads). Without a router the reference keeps what peft's
LoRA keeps, and its plain ops cost the host less than a Python autograd node would
(`benchmarks/adapter_speed.py --tiny --reference`).

A third, by choice: `compile_adapters(model)` runs the routed delta through torch.compile
(inductor; `_compiled`), the same math with the scaling on the gate and the add inside the B
product, so that a training step adds about as many ops as peft's LoRA
(`benchmarks/adapter_ops.py`); its floats are the reference's to float32 rounding, not bit for
bit, and its dropout masks inductor's. Each layer shape compiles once per process; where
inductor cannot compile, a warning and the eager fused path.

Configurations (`AdapterConfig.kind`)::

    kind              text tokens                      image tokens
    mode              T-MoE: N experts + router        V-Adapter: one LoRA
    lora              one LoRA shared by all tokens (branch `shared`)
    moe-lora          N experts + router shared by all tokens (branch `shared`)
    mode-text-lora    one LoRA                         one separate LoRA
    o-lora            one LoRA per task (O-LoRA), shared by all tokens; no router
    cl-moe            N experts + router shared by all tokens, and a task gate (CL-MoE)

Per-task adapters and task gates read the task in training, ``routing_context(model).task``
(set by ``with training_task(model, k)``), and `AdapterConfig.tasks`, the sequence's length:

- `o-lora`: task k's LoRA is expert k. While task k trains, the experts of earlier tasks
  take part through detached copies (their LoRAs are frozen: exactly zero gradient), later
  ones are left out (exactly zero gradient); out of training every expert adds up (an
  untrained one has B = 0 and adds exactly 0).
- `cl-moe`: its routed branch's gate mixes the instance-level router with a task-level
  gate, ``gate = (1 - w) softmax(R x) + w task_gates[t]`` (w = `AdapterConfig.task_gate`),
  where `task_gates` (tasks x N, a buffer filled by the method after each task) is the
  task-level router. In training (a task set) the instance router alone routes, as CL-MoE's
  code trains; out of training each sample's task t is indexed: the task whose prototype
  (`RoutingContext.prototypes`, the mean `prompt_embedding` of its training prompts) is
  nearest by cosine to the sample's, over the tasks trained so far (no task gate before
  the first). A cached decoding step keeps its prompt's tasks.

Init: A kaiming-uniform (a=sqrt(5)), B zeros, so at step 0 the adapted model equals the host.

Routing: a forward pre-hook on the top-level model reads `input_ids`, derives each token's
modality (`modality.image_mask`) and stores one immutable `RoutingState` (adapters on?,
forced branch, image mask) in the model's `RoutingContext`, which every layer reads. The
routing policy and the pass kind decide the forced branch::

    pass        token      task (train / eval)     sample
    (none)      per token  per token               per token
    understand  per token  per token / text        text
    draw        per token  image                   image
    student     per token  image                   image
    teacher     adapters off, whatever the policy

`task` and `sample` apply only to kinds that split modality (mode, mode-text-lora); a
one-branch kind (lora, moe-lora) takes `token` only, and any other policy is refused.

Public API::

    AdapterSettings(rank=8, alpha=16.0, dropout=0.05, num_experts=4,
                    target_modules=["gate_proj", "up_proj", "down_proj"], expert_rank="full")
    AdapterConfig(kind="mode", routing="token", tasks=1, task_gate=0.5, **shared settings)
    AdapterConfig.of(settings, kind="mode", ...)   # a run's AdapterSettings, a method's choices
    attach_adapters(model, config=AdapterConfig(), image_token_ids=None) -> model
    detach_adapters(model) -> model;  has_adapters(model) -> bool
    with pass_kind(model, "understand" | "draw" | "teacher" | "student"): ...
    with adapters_off(model): ...                  # the distillation teacher
    with image_mask_override(model, mask): ...     # for callers passing inputs_embeds
    with training_task(model, k): ...              # task k trains (per-task adapters, gates)
    prompt_embedding(model, input_ids, attention_mask=None) -> (batch, hidden)
    adapter_layers(model) -> {name: AdapterLinear}
    adapter_state_dict(model) -> {name: tensor}
    save_adapters(model, directory); load_adapters(model, directory) -> model
    trainable_parameters(model) -> {"text"|"image"|"shared"|"router": count}
    expert_shares(model) -> {layer name: mean router weight per expert, last forward}
    routed_weights(model, valid=None) -> {layer name: (routed tokens, experts) weights}
    router_entropy(weights) -> each row's entropy / log(experts), in [0, 1]
    lm_logits(model, last_only=False, **inputs) -> lm_head over the final hidden states
    routing_context(model) -> RoutingContext    # .fused = False: the reference path
    enable_gradient_checkpointing(model) -> model   # HF checkpointing, routing-safe
    compile_adapters(model, enabled=True) -> model  # routed layers by torch.compile

Gradient checkpointing: everything a layer reads per forward is the one object
`routing_context(model).state`. A checkpointed layer is recomputed during the backward, when
the state may belong to a later forward (the distillation teacher, a draw pass, the next
batch); `enable_gradient_checkpointing` gives torch's checkpoint a `context_fn` that captures
the state at forward time and puts it back for the recomputation.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn
from torch.autograd.function import once_differentiable

from modecl.core import modality
from modecl.core.values import ConfigError, Count, NonEmpty, Positive, Probability

__all__ = [
    "KINDS",
    "PASS_KINDS",
    "POLICIES",
    "TASK_KINDS",
    "AdapterConfig",
    "AdapterLinear",
    "AdapterSettings",
    "RoutingContext",
    "RoutingState",
    "adapter_layers",
    "adapter_state_dict",
    "adapters_off",
    "attach_adapters",
    "compile_adapters",
    "detach_adapters",
    "enable_gradient_checkpointing",
    "expert_shares",
    "has_adapters",
    "image_mask_override",
    "lm_logits",
    "load_adapters",
    "pass_kind",
    "prompt_embedding",
    "routed_weights",
    "router_entropy",
    "routing_context",
    "save_adapters",
    "trainable_parameters",
    "training_task",
]

KINDS = ("mode", "lora", "moe-lora", "mode-text-lora", "o-lora", "cl-moe")
TASK_KINDS = ("o-lora", "cl-moe")  # sized by the sequence, reading the task in training
POLICIES = ("token", "task", "sample")
ExpertRank = Literal["full", "split"]
PASS_KINDS = ("understand", "draw", "teacher", "student")

_ATTACHMENT = "_modecl_adapters"
_COMPILED = "_modecl_compiled"  # compile_adapters' choice, read by attach_adapters
_WEIGHTS_FILE = "adapters.safetensors"
_CONFIG_FILE = "adapter_config.json"


@dataclass(frozen=True)
class AdapterSettings:
    """LoRA hyper-parameters shared by every method (the paper's defaults): a run's
    ``[continual.adapter]``, and the part of every :class:`AdapterConfig` that a method
    does not choose."""

    rank: Count = 8
    alpha: Positive = 16.0
    dropout: Probability = 0.05
    num_experts: Count = 4
    target_modules: Annotated[list[str], NonEmpty()] = field(
        default_factory=lambda: ["gate_proj", "up_proj", "down_proj"]
    )
    # "full": every expert rank `rank` (the paper's code); "split": rank / num_experts per
    # expert of a routed branch (T-MoE, moe-lora), one LoRA's parameters (CoIN's MoELoRA)
    expert_rank: ExpertRank = "full"

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ConfigError(f"rank must be positive, got {self.rank}")
        if self.num_experts < 1:
            raise ConfigError(f"num_experts must be at least 1, got {self.num_experts}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.expert_rank not in get_args(ExpertRank):
            raise ConfigError(
                f"unknown expert_rank {self.expert_rank!r}; expected one of {get_args(ExpertRank)}"
            )
        if self.expert_rank == "split" and self.rank % self.num_experts:
            raise ConfigError(
                f"expert_rank 'split' gives each of num_experts {self.num_experts} experts "
                f"rank / num_experts, but rank {self.rank} is not divisible by it"
            )


@dataclass(frozen=True)
class AdapterConfig(AdapterSettings):
    """A method's adapters: the shared :class:`AdapterSettings`, the adapter ``kind``, its
    routing policy and what per-task adapters are sized by."""

    kind: str = "mode"
    # A tuple: the config is hashable and compares equal to its JSON round trip.
    target_modules: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    routing: str = "token"
    tasks: int = 1  # the sequence's length: o-lora's LoRAs, cl-moe's task gates (else 1)
    task_gate: float = 0.5  # cl-moe: the task-level gate's share w of each expert's weight

    @classmethod
    def of(cls, settings: AdapterSettings, **choices: Any) -> AdapterConfig:
        """A method's adapters: ``settings`` (a run's shared hyper-parameters) with the
        method's ``choices`` (``kind``, ``routing``, ``tasks``, ...; any shared field too)."""
        shared = {f.name: getattr(settings, f.name) for f in fields(AdapterSettings)}
        return cls(**(shared | choices))

    def __post_init__(self) -> None:
        # JSON gives lists back; a tuple keeps the config hashable and comparable.
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        super().__post_init__()
        if self.kind not in KINDS:
            raise ValueError(f"unknown adapter kind {self.kind!r}; expected one of {KINDS}")
        if self.routing not in POLICIES:
            raise ValueError(f"unknown routing policy {self.routing!r}; expected one of {POLICIES}")
        if self.routing != "token" and not self.splits_modality:
            splitting = tuple(k for k in KINDS if AdapterConfig(kind=k).splits_modality)
            raise ValueError(
                f"routing: {self.routing!r} is only for kinds that split modality {splitting}; "
                f"kind {self.kind!r} has one branch, so routing must be 'token'"
            )
        if self.tasks < 1:
            raise ValueError(f"tasks must be at least 1, got {self.tasks}")
        if self.tasks > 1 and not self.uses_tasks:
            raise ValueError(f"kind {self.kind!r} has no per-task adapters: tasks must be 1")
        if not 0.0 <= self.task_gate <= 1.0:
            raise ValueError(f"task_gate must be in [0, 1], got {self.task_gate}")
        if self.expert_rank == "split" and not self.routed:
            raise ValueError(
                f"expert_rank 'split' divides the rank among the experts of a routed branch; "
                f"kind {self.kind!r} with num_experts {self.num_experts} has none: use 'full'"
            )

    @property
    def branches(self) -> tuple[tuple[str, int], ...]:
        """(branch name, number of experts) in stacking order; > 1 expert means a router."""
        n = self.num_experts
        return {
            "mode": (("text", n), ("image", 1)),
            "lora": (("shared", 1),),
            "moe-lora": (("shared", n),),
            "mode-text-lora": (("text", 1), ("image", 1)),
            "o-lora": (("shared", self.tasks),),
            "cl-moe": (("shared", n),),
        }[self.kind]

    @property
    def uses_tasks(self) -> bool:
        """Whether the adapters are sized by the sequence (`tasks`) and read the task in
        training: o-lora's LoRAs, cl-moe's task gates."""
        return self.kind in TASK_KINDS

    @property
    def routed(self) -> bool:
        """Whether a branch of several experts has a router (all but o-lora's, one per task)."""
        return self.kind != "o-lora" and any(n > 1 for _, n in self.branches)

    @property
    def reads_modality(self) -> bool:
        """Whether the layers need each token's modality: to split branches, or for
        cl-moe's task index (the prompt's text tokens)."""
        return self.splits_modality or self.kind == "cl-moe"

    def expert_rank_of(self, experts: int) -> int:
        """The rank of each expert of a branch of ``experts`` experts: `rank`, or with
        `expert_rank = "split"` and a router, rank / experts (the branch then has one LoRA's
        parameters, as CoIN's MoELoRA). alpha / rank scales every expert alike."""
        split = self.expert_rank == "split" and experts > 1 and self.routed
        return self.rank // experts if split else self.rank

    @property
    def splits_modality(self) -> bool:
        """Whether text and image tokens take different branches."""
        return len(self.branches) == 2


@dataclass(frozen=True, eq=False)
class RoutingState:
    """Everything an adapter layer needs to know about the forward in progress.

    `branch` forces one branch for every token; None routes each token by `image_mask`
    (batch, seq; True = image). `task`: the task in training (per-task adapters);
    `task_ids` (batch,): each sample's indexed task (cl-moe's task gate), out of training.
    Replaced, never mutated, so it can be captured and restored.
    """

    enabled: bool = True
    branch: str | None = None
    image_mask: torch.Tensor | None = None
    task: int | None = None
    task_ids: torch.Tensor | None = None
    _outside: dict[tuple[bool | str, ...], torch.Tensor] = field(default_factory=dict, repr=False)

    def outside(self, image_experts: tuple[bool, ...]) -> torch.Tensor:
        """(batch, seq, experts): True where an expert is not of the token's branch, given
        whether each expert is an image one; derived once per forward for every layer."""
        if image_experts not in self._outside:
            layout = torch.tensor(image_experts, device=self.image_mask.device)
            self._outside[image_experts] = self.image_mask.unsqueeze(-1) != layout
        return self._outside[image_experts]

    def flat_outside(self, image_experts: tuple[bool, ...]) -> torch.Tensor:
        """`outside` flattened to (tokens, experts), for the fused path."""
        key = (*image_experts, "flat")
        if key not in self._outside:
            self._outside[key] = self.outside(image_experts).flatten(0, -2)
        return self._outside[key]


@dataclass(eq=False)
class RoutingContext:
    """The routing policy, the pass in progress, the task in training, and the state of the
    current forward; for cl-moe, the task prototypes (tasks x hidden; a row of zeros: not
    yet trained) and the host's input embeddings that index a sample's task."""

    config: AdapterConfig
    image_token_ids: list[int] | None
    pass_kind: str | None = None
    off_depth: int = 0
    mask_override: torch.Tensor | None = None
    state: RoutingState = field(default_factory=RoutingState)
    task: int | None = None
    prototypes: torch.Tensor | None = None
    embed: nn.Module | None = None
    fused: bool = True  # routed layers' fused path (`_FusedDelta`); False: the reference
    compiled: bool = False  # the fused path by torch.compile (`_compiled`), if it compiles

    def forced_branch(self, training: bool) -> str | None:
        """The branch every token takes under the policy and pass, None for per token."""
        if self.pass_kind is None or self.config.routing == "token":
            return None
        if self.pass_kind in ("draw", "student"):
            return "image"
        if self.config.routing == "sample" or not training:
            return "text"
        return None

    def prepare(
        self,
        training: bool,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        cached: bool = False,
    ) -> None:
        """Set the state for a forward over `input_ids` (only the new tokens under a cache:
        `cached`, whose prompt's indexed tasks are kept)."""
        enabled = self.off_depth == 0 and self.pass_kind != "teacher"
        branch = self.forced_branch(training) if enabled else None
        mask, task_ids = None, None
        if enabled and branch is None and self.config.splits_modality:
            if self.mask_override is not None:
                mask = self.mask_override
            elif input_ids is not None:
                mask = modality.image_mask(input_ids, self.image_token_ids)
            else:
                raise ValueError(
                    "per-token routing needs each token's modality: call the model with "
                    "input_ids, or wrap a forward on inputs_embeds in image_mask_override()"
                )
        if enabled and self.task is None and self.prototypes is not None:
            kept = self.state.task_ids
            task_ids = kept if cached else self.index_tasks(input_ids, attention_mask)
        self.state = RoutingState(enabled, branch, mask, self.task, task_ids)

    def index_tasks(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Each sample's task: the trained task whose prototype has the largest cosine with
        the sample's `prompt_embedding`; None before any task is trained."""
        trained = self.prototypes.ne(0).any(-1).nonzero().flatten()
        if len(trained) == 0:
            return None
        if input_ids is None:
            raise ValueError("indexing a sample's task needs the model called with input_ids")
        rows = _prompt_embedding(self, input_ids, attention_mask)
        similarity = F.cosine_similarity(rows[:, None], self.prototypes[trained][None], dim=-1)
        return trained[similarity.argmax(-1)]

    def pre_forward_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Forward pre-hook of the top-level model: route by its `input_ids`."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.prepare(module.training, ids, kwargs.get("attention_mask"), _cached(kwargs))


def _cached(inputs: dict[str, Any]) -> bool:
    """Whether a forward's inputs continue a KV cache that already holds tokens."""
    cache = inputs.get("past_key_values", inputs.get("cache"))
    return cache is not None and cache.get_seq_length() > 0


def _prompt_embedding(
    routing: RoutingContext, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """(batch, hidden): the mean input embedding of each row's attended text tokens."""
    keep = ~modality.image_mask(input_ids, routing.image_token_ids)
    if attention_mask is not None:
        keep &= attention_mask.bool()
    embeds = routing.embed(input_ids).float() * keep.unsqueeze(-1)
    return embeds.sum(1) / keep.sum(1, keepdim=True).clamp(min=1)


class AdapterLinear(nn.Module):
    """A frozen `nn.Linear` (`base`) plus the stacked experts of every branch (see module doc).

    Two implementations of one layer, the same floats: the fused path (`_FusedDelta`: the
    whole adapter delta as one autograd node, its backward written out), by default where a
    router is in play, and the reference (`_reference`: autograd over plain ops) elsewhere,
    under autocast and where `RoutingContext.fused` is off. With `RoutingContext.compiled`
    (`compile_adapters`) the fused path runs compiled (`_compiled`), within float32 rounding.
    """

    def __init__(self, base: nn.Linear, config: AdapterConfig, routing: RoutingContext) -> None:
        super().__init__()
        self.base = base
        self.routing = routing
        self.branches = config.branches
        self.rank = config.rank
        self.scaling = config.alpha / config.rank
        # Each expert's rank, per branch, and over all experts in stacking order.
        self.ranks = {name: config.expert_rank_of(n) for name, n in self.branches}
        ranks = [self.ranks[name] for name, n in self.branches for _ in range(n)]
        self.expert_ranks = tuple(ranks)
        kw = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(sum(ranks), base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, sum(ranks), **kw))
        # Unequal ranks (split T-MoE beside the V-Adapter): each component's expert, so that
        # a gate repeats over its expert's rank.
        index = None
        if len(set(ranks)) > 1:
            index = torch.arange(len(ranks), device=kw["device"])
            index = index.repeat_interleave(torch.tensor(ranks, device=kw["device"]))
        self.register_buffer("index", index, persistent=False)
        # Fan-in of each expert's A is in_features, as for the stack: one call inits all alike.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        routed = [n for _, n in self.branches if n > 1] if config.routed else []
        self.router = nn.Linear(base.in_features, routed[0], bias=False, **kw) if routed else None
        self.per_task = config.kind == "o-lora"  # expert k: task k's LoRA, no gate
        self.task_gate = config.task_gate
        gates = torch.zeros(config.tasks, routed[0], **kw) if config.kind == "cl-moe" else None
        self.register_buffer("task_gates", gates)  # cl-moe's task-level router, per task
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.columns: dict[str, slice] = {}
        start = 0
        for name, n in self.branches:
            self.columns[name] = slice(start, start + n * self.ranks[name])
            start += n * self.ranks[name]
        self.image_experts = tuple(name == "image" for name, n in self.branches for _ in range(n))
        # (router weights (..., experts), image mask or None) of the last forward, detached.
        self.last_route: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        state = self.routing.state
        if not state.enabled:
            return y
        self.last_route = None
        lora_A, lora_B, experts, split, index = self._in_play(state)
        if split and state.image_mask.shape != x.shape[:-1]:
            raise ValueError(
                f"image mask of shape {tuple(state.image_mask.shape)} does not match the tokens "
                f"{tuple(x.shape[:-1])} reaching this layer"
            )
        routing = self.routing
        fast = routing.fused and experts > 1 and not torch.is_autocast_enabled(x.device.type)
        if fast and (self.router is not None or (routing.compiled and split)):
            return self._fused(y, x, lora_A, lora_B, experts, split, index, state)
        return self._reference(y, x, lora_A, lora_B, experts, split, index, state)

    def _in_play(
        self, state: RoutingState
    ) -> tuple[torch.Tensor, torch.Tensor, int, bool, torch.Tensor | None]:
        """(A, B) of the experts in play, how many gated experts (1: no gate), whether each
        token picks its branch (by the image mask), and `index` where their ranks differ."""
        if self.per_task:  # one LoRA per task, no gate: in training, only the tasks so far
            return *self._tasks_so_far(state.task), 1, False, None
        if state.branch is not None and len(self.branches) == 2:
            # One branch for all tokens: only its columns; the other gets no gradient.
            cols = self.columns[state.branch]
            return (
                self.lora_A[cols],
                self.lora_B[:, cols],
                dict(self.branches)[state.branch],
                False,
                None,
            )
        split = len(self.branches) == 2
        return self.lora_A, self.lora_B, len(self.expert_ranks), split, self.index

    def _fused(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        experts: int,
        split: bool,
        index: torch.Tensor | None,
        state: RoutingState,
    ) -> torch.Tensor:
        """The layer's output by `_compiled` (with `RoutingContext.compiled`) or else, where
        a router is in play, `_FusedDelta`; gated as `_gate` gates."""
        task = None
        if not split and state.task_ids is not None and self.task_gates is not None:
            task = self.task_gates[state.task_ids].unsqueeze(-2)
            task = task.expand(*x.shape[:-1], -1).flatten(0, -2)
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) and self.training else 0.0
        # With an image mask, the routed branch first and the image expert's logit 0.
        pad = experts - self.router.out_features if self.router is not None else 0
        ranks = self.expert_ranks if index is not None else (lora_A.shape[0] // experts,) * experts
        result = None
        if self.routing.compiled:
            layout = self.image_experts if split else None
            delta = _compiled(p, self.scaling, ranks, pad, self.task_gate, layout)
            router = None if self.router is None else self.router.weight
            image = state.image_mask.reshape(-1) if split else None
            result = self._run_compiled(delta, y, x, lora_A, lora_B, router, image, task)
        if result is None and self.router is None:  # not compiled, no router: plain ops
            return self._reference(y, x, lora_A, lora_B, experts, split, index, state)
        if result is None:
            outside = state.flat_outside(self.image_experts) if split else None
            plan = _Plan(p, self.scaling, ranks[0], pad, self.task_gate, outside, task, index)
            router = self.router.weight
            result = _FusedDelta.apply(y, x, x, lora_A, lora_B, router, plan)
        out, weights = result
        if weights is not None:  # a router's
            self.last_route = (weights, state.image_mask if split else None)
        return out

    def _run_compiled(
        self, delta: Callable, *tensors: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """`delta(*tensors)`; None where inductor cannot compile (no C++ compiler, ...): then
        a warning, and the eager path from here on."""
        try:
            return delta(*tensors)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            self.routing.compiled = False
            warnings.warn(
                f"torch.compile of the adapters failed, the eager fused path runs instead: "
                f"{str(error).splitlines()[0]}",
                stacklevel=3,
            )
            return None

    def _reference(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        experts: int,
        split: bool,
        index: torch.Tensor | None,
        state: RoutingState,
    ) -> torch.Tensor:
        """The layer's output by autograd over plain ops: the fused path's reference."""
        xa = x.to(self.lora_A.dtype)
        h = F.linear(self.dropout(xa), lora_A)
        if experts > 1:  # weigh each expert's components by its gate
            outside = state.outside(self.image_experts) if split else None
            gate = self._gate(xa, outside, state.image_mask, state.task_ids)
            if index is None:  # every expert in play of one rank
                h = (h.unflatten(-1, (experts, -1)) * gate.unsqueeze(-1)).flatten(-2)
            else:
                h = h * gate.index_select(-1, index)
        return y.add(F.linear(h, lora_B).to(y.dtype), alpha=self.scaling)

    def _tasks_so_far(self, task: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """o-lora's (A, B): every task's LoRA out of training; while task k trains, the LoRAs
        of tasks 0..k, those of tasks before k detached (frozen), later ones left out."""
        if task is None:
            return self.lora_A, self.lora_B
        if not 0 <= task < len(self.expert_ranks):
            raise ValueError(f"task {task} of a sequence of {len(self.expert_ranks)} tasks")
        start, stop = task * self.rank, (task + 1) * self.rank
        lora_A, lora_B = self.lora_A[:stop], self.lora_B[:, :stop]
        if start:
            lora_A = torch.cat([lora_A[:start].detach(), lora_A[start:]])
            lora_B = torch.cat([lora_B[:, :start].detach(), lora_B[:, start:]], dim=1)
        return lora_A, lora_B

    def _gate(
        self,
        x: torch.Tensor,
        outside: torch.Tensor | None,
        mask: torch.Tensor | None,
        task_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-token weight of each expert in play: (..., experts).

        One softmax over a logit per expert in play: the router's for a routed branch, 0 for
        a one-expert branch, -inf outside the token's branch. So a token's weights are its
        router's softmax, or exactly 1 for a one-expert branch, and exactly 0 in the other
        branch (whose experts and router receive exactly zero gradient from it). With
        `task_ids` (cl-moe, out of training): (1 - w) softmax + w task_gates[sample's task].
        """
        if outside is None:  # one routed branch for every token
            weights = F.linear(x, self.router.weight).float().softmax(-1)
            self.last_route = (weights.detach(), None)
            if task_ids is not None and self.task_gates is not None:
                task = self.task_gates[task_ids].unsqueeze(-2)  # (batch, 1, experts)
                weights = torch.lerp(weights, task, self.task_gate)
            return weights
        if self.router is None:  # one expert in each branch: the token's own
            return (~outside).to(x.dtype)
        # The routed branch is the first (`AdapterConfig.branches`), the image expert's logit 0.
        logits = F.pad(F.linear(x, self.router.weight).float(), (0, 1))
        weights = logits.masked_fill(outside, -math.inf).softmax(-1)
        self.last_route = (weights.detach(), mask)
        return weights

    def extra_repr(self) -> str:
        return f"branches={self.branches}, ranks={self.ranks}, scaling={self.scaling}"


class _Plan(NamedTuple):
    """What `_FusedDelta` needs beside the tensors it differentiates."""

    dropout: float  # p, in training; 0: none
    scaling: float  # alpha / r
    rank: int  # each expert's rank, where equal
    pad: int  # logits of 0 appended to the router's (the V-Adapter's), before the mask
    task_gate: float  # cl-moe's w
    outside: torch.Tensor | None  # (tokens, E) bool: True where a logit is masked
    task: torch.Tensor | None  # (tokens, E): cl-moe's task gate
    index: torch.Tensor | None  # (E·r,): each component's expert, where ranks differ


class _FusedDelta(torch.autograd.Function):
    r"""A routed adapter layer from its base output to its output, as one autograd node.

    With x flattened to (tokens, in), x_a its float32 copy and m the dropout mask::

        h    = (m ⊙ x_a) A^T                                 (tokens, E·r)
        gate = softmax(pad(x_a R^T) masked by `outside`)      (tokens, E)
        out  = y + s · (gate ⊙ h) B^T                         gate repeated over each rank

    and, with g = s · dout (s = alpha / r), g_h = g B the gradient of gate ⊙ h::

        dB = g^T (gate ⊙ h)      dA = (gate ⊙ g_h)^T (m ⊙ x_a)      dy = dout
        dgate_e = Σ_r g_h ⊙ h    dl = softmax'(dgate), masked and unpadded
        dR = dl^T x_a            dx = dl R + m ⊙ ((gate ⊙ g_h) A)

    Each product and elementwise op is computed as autograd computes the reference's
    (`AdapterLinear._reference`; `_weight_grad`, `_input_grad` replay mm's backward), so the
    floats are the same; float32 x reaches this node twice (``x_router``, ``x``) so that the
    router's and the experts' gradients of x add up in the reference's order. Saved: x as
    given, the dropout mask, h, gate ⊙ h and the gate; x_a and m ⊙ x_a are recomputed.
    """

    @staticmethod
    def forward(
        ctx: Any,
        y: torch.Tensor,
        x_router: torch.Tensor,
        x: torch.Tensor,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        router: torch.Tensor,
        plan: _Plan,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: y (..., out) the base output; x_router, x (..., in) the layer input (one
        tensor, twice); lora_A (E·r, in), lora_B (out, E·r) the experts in play; router
        (N, in). Returns the output and the router's weights (tokens, E; no gradient)."""
        xa = x.reshape(-1, x.shape[-1])
        xa = xa if xa.dtype == lora_A.dtype else xa.to(lora_A.dtype)
        xd, mask = _dropout(xa, plan.dropout)
        h = F.linear(xd, lora_A)
        logits = F.linear(xa, router)
        if plan.pad:
            logits = torch.constant_pad_nd(logits, (0, plan.pad))
        if plan.outside is not None:
            logits = logits.masked_fill(plan.outside, -math.inf)
        weights = gate = logits.softmax(-1)
        if plan.task is not None:
            gate = weights.lerp(plan.task, plan.task_gate)
        if plan.index is None:  # each component times its expert's gate
            h, factor = h.view(len(h), -1, plan.rank), gate.unsqueeze(-1)
            gated = (h * factor).view(len(h), -1)
        else:
            factor = gate.index_select(-1, plan.index)
            gated = h * factor
        delta = F.linear(gated, lora_B).view(y.shape)
        ctx.mark_non_differentiable(weights)
        ctx.set_materialize_grads(False)  # the weights' gradient: None, not zeros
        ctx.plan = plan
        ctx.save_for_backward(x, mask, lora_A, lora_B, router, weights, factor, h, gated)
        delta = delta if delta.dtype == y.dtype else delta.to(y.dtype)
        return y.add(delta, alpha=plan.scaling), weights

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad: torch.Tensor, _: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        x, mask, lora_A, lora_B, router, weights, factor, h, gated = ctx.saved_tensors
        plan = ctx.plan
        _, need_xr, need_x, need_A, need_B, need_R = ctx.needs_input_grad[:6]
        g = grad.reshape(-1, grad.shape[-1])
        g = g if plan.scaling == 1 else g * plan.scaling
        g = g if g.dtype == lora_B.dtype else g.to(lora_B.dtype)
        grad_B = _weight_grad(g, gated, lora_B) if need_B else None
        grad_A = grad_R = grad_xr = grad_x = None
        xa = x.reshape(-1, x.shape[-1])
        xa = xa if xa.dtype == lora_A.dtype else xa.to(lora_A.dtype)
        grad_gated = _input_grad(g, gated, lora_B).view(h.shape)
        grad_h = (grad_gated * factor).view(len(h), -1)
        if need_R or need_xr:
            dgate = grad_gated * h  # summed over each expert's components
            if plan.index is None:
                dgate = dgate.sum(-1)
            else:  # as index_select's backward sums
                dgate = torch.zeros_like(weights).index_add_(-1, plan.index, dgate)
            if plan.task is not None:
                dgate = dgate * (1 - plan.task_gate)
            dlogits = torch._softmax_backward_data(dgate, weights, -1, weights.dtype)
            if plan.outside is not None:
                dlogits = dlogits.masked_fill(plan.outside, 0)
            if plan.pad:
                dlogits = torch.constant_pad_nd(dlogits, (0, -plan.pad))
            grad_R = _weight_grad(dlogits, xa, router) if need_R else None
            grad_xr = _input_grad(dlogits, xa, router) if need_xr else None
        if need_A:
            grad_A = _weight_grad(grad_h, _redrop(xa, mask, plan.dropout), lora_A)
        if need_x:
            grad_x = _redrop(_input_grad(grad_h, xa, lora_A), mask, plan.dropout)
            if x.dtype != xa.dtype:  # one gradient of x.to(float32), cast back once
                grad_x = grad_x if grad_xr is None else grad_xr + grad_x
                grad_x, grad_xr = grad_x.to(x.dtype), None
        grad_xr = None if grad_xr is None else grad_xr.view(x.shape)
        grad_x = None if grad_x is None else grad_x.view(x.shape)
        return grad, grad_xr, grad_x, grad_A, grad_B, grad_R, None


@functools.cache
def _compiled(
    p: float,
    scaling: float,
    ranks: tuple[int, ...],
    pad: int,
    task_gate: float,
    layout: tuple[bool, ...] | None,
) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """The gated delta for these constants, as plain ops compiled by inductor: `_FusedDelta`'s
    function where a router is in play, else (one expert per branch) the token's branch's.

    The same math in another order: alpha / r scales the gate (a kernel fewer each way), each
    run of experts of one rank is gated as one view (no index), the add is the B matmul's
    (``addmm``) under a float32 host, and the branch mask comes from the flat image mask and
    `layout` (whether each expert is an image one) inside the gate's kernel.
    """
    runs = [(len(list(group)), rank) for rank, group in itertools.groupby(ranks)]

    def delta(y, x, lora_A, lora_B, router, image, task):
        xa = x.reshape(-1, x.shape[-1]).to(lora_A.dtype)
        h = F.linear(F.dropout(xa, p) if p else xa, lora_A)
        inside = weights = None
        if layout is not None:
            inside = image.unsqueeze(-1) == torch.tensor(layout, device=image.device)
        if router is None:  # one expert per branch: the token's own
            gate = inside.to(h.dtype)
        else:
            logits = F.linear(xa, router)
            if pad:
                logits = F.pad(logits, (0, pad))
            if inside is not None:
                logits = logits.masked_fill(~inside, -math.inf)
            weights = gate = logits.softmax(-1)
            if task is not None:
                gate = weights.lerp(task, task_gate)
            weights = weights.detach()
        gate = gate * scaling
        parts, expert, column = [], 0, 0
        for count, rank in runs:
            part = h[:, column : column + count * rank].view(len(h), count, rank)
            part = part * gate[:, expert : expert + count].unsqueeze(-1)
            parts.append(part.view(len(h), count * rank))
            expert, column = expert + count, column + count * rank
        gated = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
        if y.dtype == gated.dtype:
            out = torch.addmm(y.reshape(len(h), -1), gated, lora_B.t()).view(y.shape)
        else:
            out = y + F.linear(gated, lora_B).view(y.shape).to(y.dtype)
        return out, weights

    # No donated buffers, process-wide (torch reads the flag again in each backward): the
    # conflict monitor's backward keeps the graph (retain_graph).
    torch._functorch.config.donated_buffer = False
    # A code object of its own: dynamo keeps compiled entries (at most `recompile_limit`) per
    # code object, and every set of constants would otherwise share `delta`'s.
    code = delta.__code__.replace()
    own = types.FunctionType(code, delta.__globals__, delta.__name__, None, delta.__closure__)
    return torch.compile(own)


def _dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`F.dropout(x, p)` in training, drawn and computed as torch does, and its mask: torch's
    fused kernel on CUDA and XPU (a boolean mask), elsewhere x ⊙ bernoulli(1 - p) / (1 - p)
    (the mask holds 0 or 1 / (1 - p)). No dropout: x and None."""
    if p == 0 or x.numel() == 0:
        return x, None
    if x.device.type in ("cuda", "xpu"):
        return torch.native_dropout(x, p, True)
    noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
    return x * noise, noise


def _redrop(x: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
    """x through the dropout that drew `mask`: its forward on the input, its backward on
    a gradient (the same product)."""
    if mask is None:
        return x
    if mask.dtype == torch.bool:
        return torch.ops.aten.native_dropout_backward(x, mask, 1 / (1 - p))
    return x * mask


def _weight_grad(grad: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """dW of ``inputs @ W^T`` from its output's gradient, as autograd's mm backward computes
    it (a column-major ``W^T``: ``(grad^T inputs)``, else ``(inputs^T grad)^T``)."""
    if weight.stride(1) == 1 and weight.stride(0) == weight.shape[1]:
        return grad.t().mm(inputs)
    return inputs.t().mm(grad).t()


def _input_grad(grad: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """d inputs of ``inputs @ W^T`` from its output's gradient, as autograd's mm backward
    computes it (column-major inputs: ``(W^T grad^T)^T``, else ``grad W``); only the inputs'
    strides are read."""
    if inputs.stride(0) == 1 and inputs.stride(1) == inputs.shape[0]:
        return weight.t().mm(grad.t()).t()
    return grad.mm(weight)


@dataclass
class _Attachment:
    routing: RoutingContext
    hook: torch.utils.hooks.RemovableHandle
    host_requires_grad: dict[str, bool]


def _attachment(model: nn.Module) -> _Attachment:
    attachment = getattr(model, _ATTACHMENT, None)
    if attachment is None:
        raise ValueError(f"{type(model).__name__} has no adapters attached")
    return attachment


def _is_target(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def attach_adapters(
    model: nn.Module,
    config: AdapterConfig | None = None,
    image_token_ids: Sequence[int] | None = None,
) -> nn.Module:
    """Freeze `model` and wrap each target `nn.Linear` in an `AdapterLinear`; returns `model`.

    `image_token_ids` defaults to `modality.image_token_ids(model.config)`; configurations
    without a modality split (`lora`, `moe-lora`) need none.
    """
    config = config or AdapterConfig()
    if has_adapters(model):
        raise ValueError(f"{type(model).__name__} already has adapters; detach_adapters first")
    ids = None
    if config.reads_modality:
        ids = list(
            modality.image_token_ids(model.config) if image_token_ids is None else image_token_ids
        )
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _is_target(name, config.target_modules)
    ]
    if not targets:
        raise ValueError(
            f"no nn.Linear module of {type(model).__name__} matches target_modules "
            f"{list(config.target_modules)}"
        )
    host_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    routing = RoutingContext(config, ids, compiled=getattr(model, _COMPILED, False))
    if config.kind == "cl-moe":
        routing.embed = model.get_input_embeddings()
        weight = routing.embed.weight
        routing.prototypes = torch.zeros(
            config.tasks, weight.shape[1], device=weight.device, dtype=torch.float32
        )
    for name in targets:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        base = getattr(owner, child)
        # A new module starts in training mode; follow the host's mode (dropout).
        setattr(owner, child, AdapterLinear(base, config, routing).train(base.training))
    hook = model.register_forward_pre_hook(routing.pre_forward_hook, with_kwargs=True)
    setattr(model, _ATTACHMENT, _Attachment(routing, hook, host_requires_grad))
    return model


def detach_adapters(model: nn.Module) -> nn.Module:
    """Put the original linear layers back, drop the hook and restore `requires_grad`."""
    attachment = _attachment(model)
    for name, layer in adapter_layers(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)
    attachment.hook.remove()
    delattr(model, _ATTACHMENT)
    for name, param in model.named_parameters():
        param.requires_grad_(attachment.host_requires_grad[name])
    return model


def has_adapters(model: nn.Module) -> bool:
    """Whether `attach_adapters` has been applied to `model` (and not detached)."""
    return hasattr(model, _ATTACHMENT)


def routing_context(model: nn.Module) -> RoutingContext:
    """The routing context the adapter layers of `model` read."""
    return _attachment(model).routing


@contextmanager
def pass_kind(model: nn.Module, kind: str) -> Iterator[None]:
    """Tell the adapter layers which pass (`PASS_KINDS`) runs inside the block."""
    if kind not in PASS_KINDS:
        raise ValueError(f"unknown pass kind {kind!r}; expected one of {PASS_KINDS}")
    routing = routing_context(model)
    previous, routing.pass_kind = routing.pass_kind, kind
    try:
        yield
    finally:
        routing.pass_kind = previous


@contextmanager
def training_task(model: nn.Module, task: int) -> Iterator[None]:
    """Tell the adapter layers that task ``task`` (0-based) of the sequence trains inside
    the block: o-lora's earlier LoRAs are frozen and later ones left out; cl-moe routes by
    its instance-level router alone."""
    routing = routing_context(model)
    if routing.config.uses_tasks and not 0 <= task < routing.config.tasks:
        raise ValueError(f"task {task} of a sequence of {routing.config.tasks} tasks")
    previous, routing.task = routing.task, task
    try:
        yield
    finally:
        routing.task = previous


def prompt_embedding(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(batch, hidden): each row's mean host input embedding over its attended text tokens,
    as cl-moe indexes a sample's task (its prototypes are means of these)."""
    return _prompt_embedding(routing_context(model), input_ids, attention_mask)


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Run the host model alone inside the block (the same weights, no copy)."""
    routing = routing_context(model)
    routing.off_depth += 1
    try:
        yield
    finally:
        routing.off_depth -= 1


@contextmanager
def image_mask_override(model: nn.Module, mask: torch.Tensor) -> Iterator[None]:
    """Use `mask` (batch, seq; True = image) as the tokens' modality inside the block.

    For forwards given `inputs_embeds` instead of `input_ids`; it must match their shape.
    """
    routing = routing_context(model)
    previous, routing.mask_override = routing.mask_override, mask.bool()
    try:
        yield
    finally:
        routing.mask_override = previous


def adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    """Every adapter layer of `model` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters (experts and routers, not the host's), detached, and cl-moe's
    task gates (per layer) and task prototypes (`task_prototypes`)."""
    state = {
        f"{name}.{key}": param.detach()
        for name, layer in adapter_layers(model).items()
        for key, param in layer.named_parameters()
        if not key.startswith("base.")
    }
    for name, layer in adapter_layers(model).items():
        if layer.task_gates is not None:
            state[f"{name}.task_gates"] = layer.task_gates
    prototypes = routing_context(model).prototypes
    return state if prototypes is None else state | {"task_prototypes": prototypes}


def save_adapters(model: nn.Module, directory: str | Path) -> None:
    """Write the adapter weights (safetensors) and configuration (JSON) into `directory`."""
    routing = routing_context(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in adapter_state_dict(model).items()}
    # Bytes written here: a full disk raises OSError (safetensors' own writer raises its own).
    (directory / _WEIGHTS_FILE).write_bytes(save(tensors))
    meta = {**asdict(routing.config), "image_token_ids": routing.image_token_ids}
    (directory / _CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_adapters(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load adapters saved by `save_adapters`, attaching them first if `model` has none."""
    directory = Path(directory)
    meta = json.loads((directory / _CONFIG_FILE).read_text())
    ids = meta.pop("image_token_ids")
    full = AdapterConfig(**{**meta, "expert_rank": "full"})
    # Earlier versions saved "split" on kinds without a routed branch: the same adapters.
    config = full if not full.routed else AdapterConfig(**meta)
    if not has_adapters(model):
        attach_adapters(model, config, image_token_ids=ids)
    elif routing_context(model).config != config:
        raise ValueError(
            f"attached adapters {routing_context(model).config} differ from saved {config}"
        )
    saved = load_file(str(directory / _WEIGHTS_FILE))
    own = adapter_state_dict(model)
    if saved.keys() != own.keys():
        raise ValueError(
            f"saved adapters do not fit the model: missing {sorted(own.keys() - saved.keys())}, "
            f"unexpected {sorted(saved.keys() - own.keys())}"
        )
    with torch.no_grad():
        for key, param in own.items():
            param.copy_(saved[key])
    return model


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Adapter parameter counts per branch (`text`, `image`, `shared`) and `router`."""
    counts: dict[str, int] = {}
    for layer in adapter_layers(model).values():
        for name, n in layer.branches:
            size = n * layer.ranks[name] * (layer.base.in_features + layer.base.out_features)
            counts[name] = counts.get(name, 0) + size
        if layer.router is not None:
            counts["router"] = counts.get("router", 0) + layer.router.weight.numel()
    return counts


def routed_weights(model: nn.Module, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per layer with a router, its weights over the routed tokens of the last forward:
    (tokens, experts), rows summing to 1. ``valid`` (batch, seq; True = a real token, not
    padding) keeps only those. Layers whose router saw no token are left out."""
    out = {}
    for name, layer in adapter_layers(model).items():
        if layer.last_route is None:
            continue
        weights, mask = layer.last_route  # with an image mask: the routed (text) tokens
        weights = weights.flatten(0, -2)  # (tokens, experts)
        keep = torch.ones(len(weights), dtype=torch.bool, device=weights.device)
        if mask is not None:
            keep &= ~mask.flatten()
        if valid is not None:
            keep &= valid.bool().flatten()
        if keep.any():
            out[name] = weights[keep, : layer.router.out_features].float()
    return out


def router_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Each row's entropy over the experts, normalized by log(experts): 1 for a uniform
    router, 0 for one that picks a single expert."""
    return torch.special.entr(weights).sum(-1) / math.log(weights.shape[-1])


def expert_shares(model: nn.Module) -> dict[str, torch.Tensor]:
    """Mean router weight per expert over the routed tokens of the last forward, per layer.

    Layers whose router saw no token in that forward are left out.
    """
    return {name: weights.mean(0) for name, weights in routed_weights(model).items()}


def lm_logits(model: nn.Module, *, last_only: bool = False, **inputs: Any) -> torch.Tensor:
    """Logits of the whole vocabulary: `lm_head` over the final hidden states.

    Unlike Chameleon's forward, which sets image-token logits to the dtype minimum, these
    are usable for a loss on image tokens. `inputs` are the model's forward inputs.
    `last_only`: the last position's only, `[B, 1, V]`; the hidden states are sliced before
    the head, as the forward's `logits_to_keep=1` does (the same floats).
    """
    if has_adapters(model):
        # The body is called directly, below the top-level hook: route here instead.
        routing_context(model).prepare(
            model.training, inputs.get("input_ids"), inputs.get("attention_mask"), _cached(inputs)
        )
    hidden = model.base_model(**inputs).last_hidden_state
    return model.get_output_embeddings()(hidden[:, -1:] if last_only else hidden)


class _RestoredState:
    """Puts a captured routing state back for a recomputation, and the current one after.

    Re-enterable: a graph backpropagated more than once (`retain_graph`, as the conflict
    monitor does) recomputes each checkpointed layer once per backward.
    """

    def __init__(self, routing: RoutingContext, state: RoutingState) -> None:
        self.routing, self.state, self.previous = routing, state, []

    def __enter__(self) -> None:
        self.previous.append(self.routing.state)
        self.routing.state = self.state

    def __exit__(self, *exc: object) -> None:
        self.routing.state = self.previous.pop()


def compile_adapters(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Run the routed adapter layers of `model` by torch.compile (inductor); returns `model`.

    The same math as the fused path, as compiled kernels: a training step adds about as many
    ops as peft's LoRA (`benchmarks/adapter_ops.py`), its floats within float32 rounding of
    the reference (not bit for bit; dropout draws its own masks). The first step of each
    layer shape compiles (seconds to a minute), so it pays on long runs and at scale. Where
    inductor cannot compile (no C++ compiler on a CPU, ...) a warning, and the eager fused
    path. The adapters may be attached before or after this call.
    """
    setattr(model, _COMPILED, enabled)
    if has_adapters(model):
        routing_context(model).compiled = enabled
    return model


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Turn on the host's (non-reentrant) gradient checkpointing, routing-safe; returns `model`.

    Each checkpointed layer's recomputation runs with the `RoutingState` its forward saw,
    whatever forwards ran in between, so the gradients equal those without checkpointing.
    The adapters may be attached before or after this call. Non-reentrant checkpointing
    (the only kind that takes a `context_fn`) needs no inputs that require grad.
    """

    def context_fn() -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
        if not has_adapters(model):
            return nullcontext(), nullcontext()
        routing = routing_context(model)
        return nullcontext(), _RestoredState(routing, routing.state)

    # transformers renamed the method (the old name warns); both take the kwargs first.
    enable = getattr(model, "activation_checkpointing_enable", None)
    enable = enable or model.gradient_checkpointing_enable
    enable({"use_reentrant": False, "context_fn": context_fn})
    return model
