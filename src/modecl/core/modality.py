"""Which token ids are image tokens, read from a host model's own config.

A token's modality is `image` when its id is an image code or one of the image-span marker
tokens (begin/end of image and kin); everything else is `text` (glossary). The ids come
from the config, never from constants, because every host family numbers them differently:

- the digits model: a `LlamaConfig` carrying `image_token_ids` (codes and markers already);
- Chameleon / Anole: `config.vocabulary_map` entries named `IMGIMG...` (the VQ codes), plus
  `<racm3:break>` (begin of image), `<eoss>` (end of image) and the `<image>` placeholder
  that the model overwrites with image-code embeddings when given `pixel_values`;
- Emu3: `config.vocabulary_map` entries named `<|visual token NNNNNN|>`, plus
  `<|image start|>`, `<|image end|>`, the `<|image token|>` wrapper, the `<|extra_200|>`
  row end and `<|extra_201|>` frame end that Emu3 writes inside every image, and `<image>`.
  The "H*W" size digits that Emu3 writes after `<|image start|>` are ordinary text ids
  and stay text.

    >>> ids = image_token_ids(model.config)
    >>> image_mask(input_ids, ids)  # bool, same shape as input_ids
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["image_mask", "image_token_ids"]

# (name prefix of the image codes, names of the marker tokens) per vocabulary_map family.
_VOCABULARY_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("IMGIMG", ("<image>", "<racm3:break>", "<eoss>")),  # Chameleon, Anole
    (
        "<|visual token",
        (
            "<image>",
            "<|image start|>",
            "<|image end|>",
            "<|image token|>",
            "<|extra_200|>",
            "<|extra_201|>",
        ),
    ),  # Emu3
)


def image_token_ids(config: Any) -> list[int]:
    """Sorted ids of every image token (codes and markers) that `config` defines.

    Raises ValueError naming the config class when it defines none.
    """
    explicit = getattr(config, "image_token_ids", None)
    if explicit:
        return sorted({int(i) for i in explicit})
    vocabulary = getattr(config, "vocabulary_map", None) or {}
    for prefix, markers in _VOCABULARY_RULES:
        codes = [token_id for name, token_id in vocabulary.items() if name.startswith(prefix)]
        if codes:
            present = [vocabulary[name] for name in markers if name in vocabulary]
            return sorted({int(i) for i in codes + present})
    raise ValueError(
        f"{type(config).__name__} defines no image tokens: expected an `image_token_ids` "
        "attribute or a `vocabulary_map` with Chameleon (IMGIMG...) or Emu3 "
        "(<|visual token ...|>) entries"
    )


def image_mask(input_ids: torch.Tensor, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Boolean tensor shaped like `input_ids`: True where the token is an image token."""
    return torch.isin(
        input_ids, torch.as_tensor(ids, dtype=input_ids.dtype, device=input_ids.device)
    )
