"""MoDE, every token routed by its own modality, with distillation."""

from modecl.core.methods.distillation import Distilling

METHOD = Distilling("mode", kind="mode", policy="token")
