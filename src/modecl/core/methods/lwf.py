"""Plain LoRA with MoDE's distillation (LwF-style): isolates what decoupling adds."""

from modecl.core.methods.distillation import Distilling

METHOD = Distilling("lwf", kind="lora", policy="token")
