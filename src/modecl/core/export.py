"""Adapters trained here as a peft LoRA: ``adapter_config.json`` and ``adapter_model.safetensors``
in peft's format, which ``peft.PeftModel.from_pretrained(host, folder)`` loads and any tool that
serves peft adapters takes.

A branch of one expert is a LoRA: its rows of ``lora_A`` and columns of ``lora_B`` (module
doc of :mod:`modecl.core.adapters`) are peft's ``lora_A.weight`` (r x in) and
``lora_B.weight`` (out x r), with ``lora_alpha`` = alpha, so peft's scaling alpha / r is
ours. What exports:

    kind             branch       as
    lora             shared       the LoRA (seq-lora, lwf, replay, ewc, a-gem)
    o-lora           shared       every task's LoRA summed: one LoRA of rank tasks x r
                                  (lora_alpha tasks x alpha keeps the scaling alpha / r)
    mode-text-lora   text, image  either branch's LoRA
    mode             image        the V-Adapter, for drawing

A routed branch cannot be a peft LoRA: the T-MoE (``mode``'s text branch), ``moe-lora`` and
``cl-moe`` weigh their experts per token by a softmax router, a function of the input that
a LoRA's fixed low-rank update cannot express. A branch applies to every token in peft,
so an exported ``mode-text-lora`` or ``mode`` branch equals our model where every token takes
that branch: a draw pass under the ``task`` or ``sample`` routing policy for the image
branch; under ``token`` routing our prompt's text tokens take the text branch instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from modecl.core.adapters import AdapterConfig
from modecl.core.config import ConfigError
from modecl.core.files import atomic_dir
from modecl.core.runner import pick_entry

EXPORTABLE = {"lora": ("shared",), "o-lora": ("shared",), "mode-text-lora": ("text", "image")}
EXPORTABLE["mode"] = ("image",)


class ExportError(ValueError):
    """Adapters that peft's LoRA cannot express, or a branch they do not have."""


def _columns(config: AdapterConfig) -> dict[str, tuple[int, int]]:
    """Each branch's (start, stop) among the stacked experts' components."""
    columns, start = {}, 0
    for name, experts in config.branches:
        stop = start + experts * config.expert_rank_of(experts)
        columns[name] = (start, stop)
        start = stop
    return columns


def export_peft(
    adapters: Path, out: Path, *, branch: str | None = None, base_model: str | None = None
) -> dict[str, Any]:
    """Write the adapters in ``adapters`` (a folder of
    :func:`~modecl.core.adapters.save_adapters`) as a peft LoRA in ``out``, atomically.

    Args:
        adapters: the saved adapters (a stage's ``adapters/``).
        out: the peft adapter folder to write (replaced whole).
        branch: the branch to export (default: the kind's first exportable one, above).
        base_model: the host's name or path, recorded as peft's ``base_model_name_or_path``.

    Returns:
        The peft config written.
    """
    meta = json.loads((Path(adapters) / "adapter_config.json").read_text())
    meta.pop("image_token_ids")
    config = AdapterConfig(**meta)
    allowed = EXPORTABLE.get(config.kind)
    if allowed is None:
        raise ExportError(
            f"{config.kind} adapters weigh their experts per token by a router: no peft LoRA "
            f"can express that (exportable kinds: {', '.join(EXPORTABLE)})"
        )
    branch = branch or allowed[0]
    if branch not in allowed:
        raise ExportError(
            f"{config.kind}: branch {branch!r} does not export as a LoRA (exportable: "
            f"{', '.join(allowed)}; a routed branch weighs its experts per token)"
        )
    start, stop = _columns(config)[branch]
    rank = stop - start
    tensors, modules = {}, set()
    for key, tensor in load_file(str(Path(adapters) / "adapters.safetensors")).items():
        module, _, name = key.rpartition(".")
        if name not in ("lora_A", "lora_B"):
            continue  # no router in an exportable branch
        part = tensor[start:stop] if name == "lora_A" else tensor[:, start:stop]
        tensors[f"base_model.model.{module}.{name}.weight"] = part.contiguous()
        modules.add(module.rpartition(".")[2])
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        # peft scales by lora_alpha / r: ours is alpha / (one expert's rank)
        "lora_alpha": config.alpha * rank / config.rank,
        "lora_dropout": 0.0,
        "target_modules": sorted(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    origin = {"format": "pt", "modecl_kind": config.kind, "modecl_branch": branch}
    with atomic_dir(Path(out)) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata=origin)
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")
    return peft_config


def stage_adapters(
    run: Path,
    method: str,
    *,
    stage: int | None = None,
    seed: int | None = None,
    host: int | None = None,
) -> Path:
    """The saved adapters of ``method`` after ``stage`` (default: its last finished one) of
    a run's replicate (default: the last; ``host`` for a run over several hosts)."""
    checkpoints = Path(run) / "checkpoints"
    if not checkpoints.is_dir():
        raise ConfigError(f"{run}: no checkpoints/ (not the out dir of a run)")
    wanted = None
    if seed is not None:
        wanted = f"seed{seed}" if host is None else f"host{host}-seed{seed}"
    replicate = pick_entry(checkpoints, r"(host\d+-)?seed\d+", wanted, "replicate")
    folder = (
        checkpoints
        / replicate
        / pick_entry(checkpoints / replicate, r"(?!pretrained$)[^.].*", method, "method")
    )
    done = [p.parents[1].name for p in folder.glob("stage*/adapters/adapters.safetensors")]
    if not done:
        raise ConfigError(f"{folder}: no finished stage")
    name = f"stage{stage}" if stage is not None else max(done, key=lambda n: int(n[5:]))
    if name not in done:
        raise ConfigError(f"{folder}: no finished stage {stage}; finished: {sorted(done)}")
    return folder / name / "adapters"
