"""MoDE at matched capacity: each of the T-MoE's N experts has rank r / N (CoIN's MoELoRA
split), so the T-MoE has one text LoRA's parameters."""

from modecl.core.methods.distillation import Distilling

METHOD = Distilling("mode-split", kind="mode", policy="token", expert_rank="split")
