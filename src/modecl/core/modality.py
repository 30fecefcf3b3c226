"""Which token ids are image tokens, read from a host model's own config.

A token's modality is `image` when its id is an image code or one of the image-span marker
tokens (begin/end of image and kin); everything else is `text` (glossary). The ids come
from the config, never from constants, because every host family numbers them differently:

- the digits model: a `LlamaConfig` carrying `image_token_ids` (codes and markers already);
- Chameleon / Anole and Emu3: `config.vocabulary_map`, read by the one table of each host
  family's special tokens, `HOST_FAMILIES`: the name prefix of the VQ codes, the span
  markers by role, and the `<image>` placeholder that the model overwrites with image-code
  embeddings when given `pixel_values`. Emu3's markers include the `<|extra_200|>` row end
  and `<|extra_201|>` frame end that it writes inside every image; the "H*W" size digits
  that it writes after `<|image start|>` are ordinary text ids and stay text.

    >>> ids = image_token_ids(model.config)
    >>> image_mask(input_ids, ids)  # bool, same shape as input_ids
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["HOST_FAMILIES", "HostFamily", "host_family", "image_mask", "image_token_ids"]


@dataclass(frozen=True)
class HostFamily:
    """The special tokens of one host family, by their `vocabulary_map` names."""

    code_prefix: str  # every VQ code's name starts with it
    markers: dict[str, str]  # the image span's markers: role (begin, end, ...) -> name
    placeholder: str = "<image>"  # what the processors expand into an image's codes
    forward_masks_codes: bool = False  # the model's own logits hide its codes from text


HOST_FAMILIES: dict[str, HostFamily] = {
    "chameleon": HostFamily(  # and Anole
        "IMGIMG", {"begin": "<racm3:break>", "end": "<eoss>"}, forward_masks_codes=True
    ),
    "emu3": HostFamily(
        "<|visual token",
        {
            "begin": "<|image start|>",
            "end": "<|image end|>",
            "wrapper": "<|image token|>",
            "row_end": "<|extra_200|>",
            "frame_end": "<|extra_201|>",
        },
    ),
}


def host_family(vocabulary: dict[str, int]) -> tuple[str, list[int]] | None:
    """The family whose codes `vocabulary` (a `vocabulary_map`) holds, and their sorted ids."""
    for name, family in HOST_FAMILIES.items():
        codes = sorted(i for token, i in vocabulary.items() if token.startswith(family.code_prefix))
        if codes:
            return name, codes
    return None


def image_token_ids(config: Any) -> list[int]:
    """Sorted ids of every image token (codes and markers) that `config` defines.

    Raises ValueError naming the config class when it defines none.
    """
    explicit = getattr(config, "image_token_ids", None)
    if explicit:
        return sorted({int(i) for i in explicit})
    vocabulary = getattr(config, "vocabulary_map", None) or {}
    found = host_family(vocabulary)
    if found is not None:
        name, codes = found
        family = HOST_FAMILIES[name]
        names = (family.placeholder, *family.markers.values())
        return sorted({int(i) for i in codes + [vocabulary[n] for n in names if n in vocabulary]})
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
