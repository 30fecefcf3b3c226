"""The tiny UMGM: a ``transformers.LlamaForCausalLM`` over the digits' vocabulary.

Like Chameleon it is early-fusion: one token stream, one vocabulary holding words and
image codes, and Llama MLPs with the ``gate_proj``/``up_proj``/``down_proj`` modules
that MoDE adapts in Anole.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modecl.digits.config import ModelConfig
from modecl.digits.vocab import Vocabulary


def build_model(vocab: Vocabulary, config: ModelConfig, seed: int) -> LlamaForCausalLM:
    """A randomly initialised model, deterministic by ``seed``.

    The config carries ``image_token_ids`` (image codes and begin/end-of-image markers):
    that is how :mod:`modecl.core.modality` finds each token's modality for this model.
    """
    llama = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_positions,
        pad_token_id=vocab.pad_id,
        bos_token_id=vocab.bos_id,
        eos_token_id=vocab.eos_id,
        tie_word_embeddings=True,
    )
    llama.image_token_ids = vocab.image_token_ids
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama).eval()
