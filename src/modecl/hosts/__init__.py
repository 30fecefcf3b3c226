"""Hosts: transformers early-fusion models (Chameleon / Anole, Emu3), their token format,
image tokenizer and decoder, task and pairs files, CLIP. Imports core, never digits."""
