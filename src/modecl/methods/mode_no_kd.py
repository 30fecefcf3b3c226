"""Ablation: MoDE without distillation."""

from modecl.methods.base import Method

METHOD = Method("mode-no-kd", kind="mode", policy="token", distill=False)
