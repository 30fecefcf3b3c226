"""MoDE, every token routed by its own modality, with distillation."""

from modecl.core.methods.base import Method

METHOD = Method("mode", kind="mode", policy="token", distill=True)
