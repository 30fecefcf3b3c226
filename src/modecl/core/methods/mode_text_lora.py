"""Ablation: MoDE with a single text LoRA instead of the T-MoE."""

from modecl.core.methods.base import Method

METHOD = Method("mode-text-lora", kind="mode-text-lora", policy="token", distill=True)
