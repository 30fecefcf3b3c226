"""Ablation: MoDE without distillation."""

from modecl.core.methods.base import Method

METHOD = Method("mode-no-kd", kind="mode", policy="token")
