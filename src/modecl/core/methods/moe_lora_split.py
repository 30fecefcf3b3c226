"""MoELoRA as CoIN builds it: N experts of rank r / N, one LoRA's parameters in all."""

from modecl.core.methods.base import Method

METHOD = Method("moe-lora-split", kind="moe-lora", policy="token", expert_rank="split")
