"""MoELoRA (the CoIN baseline): N experts and one soft router shared by all tokens."""

from modecl.core.methods.base import Method

METHOD = Method("moe-lora", kind="moe-lora", policy="token")
