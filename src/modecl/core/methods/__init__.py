"""The method registry: each method module defines ``METHOD``, which carries its name.

Adding a method: write ``methods/<module>.py`` defining ``METHOD`` and add it to ``_MODULES``.
"""

from __future__ import annotations

import copy

from modecl.core.methods import (
    a_gem,
    cl_moe,
    ewc,
    lwf,
    mode,
    mode_no_kd,
    mode_sample,
    mode_split,
    mode_task,
    mode_text_lora,
    moe_lora,
    moe_lora_split,
    o_lora,
    replay,
    seq_lora,
)
from modecl.core.methods.base import Method

_MODULES = (
    seq_lora,
    moe_lora,
    lwf,
    replay,
    ewc,
    mode,
    mode_task,
    mode_sample,
    mode_no_kd,
    mode_text_lora,
    moe_lora_split,
    mode_split,
    cl_moe,
    o_lora,
    a_gem,
)
REGISTRY: dict[str, Method] = {m.METHOD.name: m.METHOD for m in _MODULES}
METHOD_NAMES = tuple(REGISTRY)


def get_method(name: str) -> Method:
    """A fresh instance of method ``name``; an unknown name lists the valid ones."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method '{name}'; valid methods: {', '.join(METHOD_NAMES)}")
    return copy.deepcopy(REGISTRY[name])
