"""Plain LoRA with MoDE's distillation (LwF-style): isolates what decoupling adds."""

from modecl.core.methods.base import Method

METHOD = Method("lwf", kind="lora", policy="token", distill=True)
