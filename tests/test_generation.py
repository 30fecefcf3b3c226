"""The one decoding loop, by value: forced markers, allowed ids, greedy equals a recompute."""

from __future__ import annotations

import pytest
import torch

from modecl.core.generation import Constraint, generate
from tests.fixtures import (
    ADAPTER_HOSTS,
    CODES,
    EOS_ID,
    TEXT_IDS,
    VOCAB_SIZE,
    adapted,
    allowed_mask,
    batch,
    greedy_without_cache,
    ids_mask,
)

VOCAB, EOS, ROWS = VOCAB_SIZE, EOS_ID, 3
# CODES: the Chameleon's IMGIMG codes, which its own forward masks. Forced markers: its
# `<image>`, `<eoss>` (end of image) and `<racm3:break>` (begin of image), image tokens all.
MARKER, END, BEGIN = 56, 57, 58


def alternate(step: int, so_far: torch.Tensor) -> torch.Tensor:
    """Per step: ids at even steps, a mask at odd ones."""
    return torch.tensor(CODES[:8]) if step % 2 == 0 else ids_mask(CODES[8:])


def no_repeat(step: int, so_far: torch.Tensor) -> torch.Tensor | None:
    """Per row, from the tokens so far: anything but the row's previous token."""
    if step == 0:
        return None
    mask = torch.ones(len(so_far), VOCAB, dtype=torch.bool)
    mask[torch.arange(len(so_far)), so_far[:, -1]] = False
    return mask


# name: (new_tokens, allowed)
CASES: dict[str, tuple[int | list[int | None], Constraint | None]] = {
    "count": (5, None),
    "ids": (5, [7, 12, 40, 41, 55]),
    "mask": (5, ids_mask(TEXT_IDS)),
    "layout, ids": ([None, None, MARKER, None, None, MARKER, END], CODES),
    "layout, forced first and last": ([BEGIN, None, None, END, END], CODES),
    "per step": ([None, None, MARKER, None, None, END], alternate),
    "per row": (6, no_repeat),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("host", ADAPTER_HOSTS)
def test_forced_markers_and_allowed_ids(host, case):
    new_tokens, allowed = CASES[case]
    layout = [None] * new_tokens if isinstance(new_tokens, int) else new_tokens
    model = adapted(host, std=1.0)
    prompt = batch(rows=ROWS)
    generator = torch.Generator().manual_seed(0)
    sampled = generate(
        model, prompt, new_tokens, allowed=allowed, temperature=1.0, top_k=5, generator=generator
    )
    greedy = generate(model, prompt, new_tokens, allowed=allowed)
    for tokens in (sampled, greedy):
        assert tokens.shape == (ROWS, len(layout))
        for step, forced in enumerate(layout):
            if forced is None:
                mask = allowed_mask(allowed, step, tokens[:, :step])
                assert mask[torch.arange(ROWS), tokens[:, step]].all(), step
            else:
                assert tokens[:, step].tolist() == [forced] * ROWS, step
    assert torch.equal(greedy, greedy_without_cache(model, prompt, layout, allowed))


def test_rows_that_emit_eos_keep_it_forced_positions_included():
    model = adapted("llama", std=1.0)
    prompt = batch(rows=2)

    def end_first_row(step: int, so_far: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(2, VOCAB, dtype=torch.bool)
        mask[:, EOS] = False
        if step == 1:  # the first row must end here, the second never
            mask[0] = ids_mask([EOS])
        return mask

    layout = [None, None, MARKER, None]
    tokens = generate(model, prompt, layout, allowed=end_first_row, eos_id=EOS)
    assert tokens[0, 0] != EOS and tokens[0, 1:].tolist() == [EOS] * 3
    assert tokens[1, 2] == MARKER and EOS not in tokens[1].tolist()
    ended = generate(model, prompt, layout, allowed=[EOS], eos_id=EOS)
    assert ended.tolist() == [[EOS], [EOS]]  # every row ended: no further step
