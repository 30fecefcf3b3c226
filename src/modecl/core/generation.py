"""Decoding with a KV cache: greedy answers and image spans constrained to image codes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from modecl.core.sequences import grow_mask, padding_inputs


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    allowed_ids: Sequence[int] | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
) -> torch.Tensor:
    """Extend prompts ``[B, P]`` by ``max_new_tokens`` tokens.

    Prompts of unequal length are left-padded, with ``attention_mask`` 0 on the padding;
    positions then count each row's real tokens only, as without padding.

    ``allowed_ids`` restricts every new token (Chameleon's image-only mode masks logits
    the same way). ``temperature == 0`` is greedy; otherwise sample from the softmax at
    that temperature over the ``top_k`` best allowed tokens (0: all). Rows that emitted
    ``eos_id`` keep emitting it.
    """
    if max_new_tokens <= 0:
        return prompt_ids.new_empty((prompt_ids.shape[0], 0))
    allowed = None
    if allowed_ids is not None:
        allowed = torch.zeros(model.config.vocab_size, dtype=torch.bool)
        allowed[list(allowed_ids)] = True
        allowed = allowed.to(prompt_ids.device)
    cache, inputs, out = None, prompt_ids, []
    done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    mask = attention_mask
    for _ in range(max_new_tokens):
        padding = padding_inputs(mask, inputs.shape[1])
        result = model(input_ids=inputs, cache=cache, use_cache=True, logits_to_keep=1, **padding)
        cache = result.cache
        logits = result.logits[:, -1].float()
        if allowed is not None:
            logits = logits.masked_fill(~allowed[: logits.shape[-1]], float("-inf"))
        if temperature == 0:
            token = logits.argmax(-1)
        else:
            logits = logits / temperature
            if top_k:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
        if eos_id is not None:
            token = torch.where(done, torch.full_like(token, eos_id), token)
            done |= token == eos_id
        out.append(token)
        if eos_id is not None and bool(done.all()):
            break
        inputs = token[:, None]
        mask = grow_mask(mask, 1)
    return torch.stack(out, dim=1)
