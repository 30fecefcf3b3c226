"""Ablation: MoDE with a single text LoRA instead of the T-MoE."""

from modecl.core.methods.distillation import Distilling

METHOD = Distilling("mode-text-lora", kind="mode-text-lora", policy="token")
