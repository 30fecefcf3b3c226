"""The one decoding loop, with a KV cache: answers, and image spans with forced markers.

generate(model, prompts, 4, eos_id=eos)                        # greedy answers
generate(model, prompts, 16, allowed=is_code, temperature=0.7)  # codes only, sampled
generate(model, prompts, [None, None, row_end, None, None, row_end, end], allowed=codes)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache

from modecl.core.adapters import lm_logits
from modecl.core.sequences import grow_mask, padding_inputs

__all__ = ["Allowed", "Constraint", "generate"]

# The ids a generated token may take: ids (a long tensor or list: chosen among them) or a
# bool mask over the vocabulary, `[V]` or per row `[B, V]` (the rest set to -inf).
Allowed = torch.Tensor | Sequence[int]
# A fixed `Allowed`, or one per step: (step, tokens so far `[B, step]`) -> Allowed or None.
Constraint = Allowed | Callable[[int, torch.Tensor], Allowed | None]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    new_tokens: int | Sequence[int | None],
    *,
    allowed: Constraint | None = None,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
) -> torch.Tensor:
    """Extend prompts ``[B, P]`` by ``new_tokens`` tokens: ``[B, n]``.

    ``new_tokens`` is a count, or a layout: None where a token is generated, an id where
    that token is forced (Emu3's row ends, the end of image, as transformers'
    ``prefix_allowed_tokens_fn`` would). A forced token costs no forward and no random
    draw: it enters the cache with the next generated token.

    ``allowed`` restricts the generated tokens (``Allowed``, ``Constraint``); ``step``
    counts forced tokens too. Ids and a mask of one set give the same greedy tokens, but a
    sample draws one random number per candidate: ids sample among themselves only.
    ``temperature == 0`` is greedy; otherwise sample (one ``torch.multinomial`` per step)
    from the softmax at that temperature over the ``top_k`` best allowed tokens (0: all).
    Rows that emitted ``eos_id`` keep emitting it; decoding stops when every row has.

    Prompts of unequal length are left-padded, with ``attention_mask`` 0 on the padding;
    positions then count each row's real tokens only, as without padding. Logits are
    ``lm_head`` over the last hidden state (:func:`~modecl.core.adapters.lm_logits`): no
    image code is masked as Chameleon's forward does, unless ``allowed`` masks it.
    """
    layout = [None] * new_tokens if isinstance(new_tokens, int) else list(new_tokens)
    batch = prompt_ids.shape[0]
    if not layout:
        return prompt_ids.new_empty((batch, 0))
    cache = DynamicCache(config=model.config)
    pending, mask, out = prompt_ids, attention_mask, []  # pending: not yet in the cache
    done = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    for step, forced in enumerate(layout):
        if forced is None:
            padding = padding_inputs(mask, pending.shape[1])
            inputs = {"input_ids": pending, "cache": cache, "use_cache": True, **padding}
            logits = lm_logits(model, last_only=True, **inputs)[:, -1].float()
            if callable(allowed):
                so_far = torch.stack(out, dim=1) if out else prompt_ids[:, :0]
                token = _choose(logits, allowed(step, so_far), temperature, top_k, generator)
            else:
                token = _choose(logits, allowed, temperature, top_k, generator)
            pending = pending[:, :0]
        else:
            token = torch.full_like(prompt_ids[:, 0], forced)
        if eos_id is not None:
            token = torch.where(done, torch.full_like(token, eos_id), token)
            done |= token == eos_id
        out.append(token)
        if eos_id is not None and bool(done.all()):
            break
        pending = torch.cat([pending, token[:, None]], dim=1)
        mask = grow_mask(mask, 1)
    return torch.stack(out, dim=1)


def _choose(
    logits: torch.Tensor,
    allowed: Allowed | None,
    temperature: float,
    top_k: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One token per row from last-position logits ``[B, V]``, among the ``allowed``."""
    ids = None
    if allowed is not None:
        allowed = torch.as_tensor(allowed, device=logits.device)
        if allowed.dtype == torch.bool:
            logits = logits.masked_fill(~allowed, float("-inf"))
        else:
            ids, logits = allowed, logits[:, allowed]
    if temperature == 0:
        pick = logits.argmax(-1)
    else:
        logits = logits / temperature
        if top_k:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        pick = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
    return pick if ids is None else ids[pick]
