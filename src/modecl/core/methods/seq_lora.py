"""Plain LoRA fine-tuned through the sequence (SeqLoRA)."""

from modecl.core.methods.base import Method

METHOD = Method("seq-lora", kind="lora", policy="token")
