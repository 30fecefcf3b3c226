"""The method registry: a method's name -> the module under ``modecl.core.methods`` defining it.

Adding a method: write ``methods/<module>.py`` defining ``METHOD`` and add one line here.
"""

from __future__ import annotations

import copy
import importlib

from modecl.core.methods.base import Method

REGISTRY = {
    "mode": "mode",
    "mode-task": "mode_task",
    "mode-sample": "mode_sample",
    "seq-lora": "seq_lora",
    "moe-lora": "moe_lora",
    "lwf": "lwf",
    "replay": "replay",
    "ewc": "ewc",
    "mode-no-kd": "mode_no_kd",
    "mode-text-lora": "mode_text_lora",
}
METHOD_NAMES = tuple(REGISTRY)


def get_method(name: str) -> Method:
    """A fresh instance of method ``name``; an unknown name lists the valid ones."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method '{name}'; valid methods: {', '.join(METHOD_NAMES)}")
    method = importlib.import_module(f"modecl.core.methods.{REGISTRY[name]}").METHOD
    return copy.deepcopy(method)
