"""Early-fusion hosts from transformers: Chameleon / Anole and Emu3.

What training and evaluation need from such a host, in the host's own token format: images
to codes (the model's VQ tokenizer), prompts holding an image span, image-only drawing, and
codes back to pixels. Every id (codes, markers) is read from `config.vocabulary_map`; only
the marker *names* are fixed, as in transformers' own processors. Image spans::

    chameleon  <racm3:break> code×(h·w) <eoss>
    emu3       <|image start|> "h*w" <|image token|> (code×w <|extra_200|>)×h
               <|extra_201|> <|image end|>

Emu3's "h*w" is text (`modality`). Understanding prompts hold the image's real codes, not
the processors' `<image>` placeholders, so `input_ids` alone route every token by its
modality and a loss can be put on image tokens.

Text goes through `encode`, any `str -> list[int]`: for a real checkpoint
`lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]`; the tiny random test models
have no tokenizer and pass a toy one. Pixels are in [-1, 1] (both hosts' processors).

    codes = image_tokens(model, load_image("cat.png", 512))            # [1, n]
    prompt = understand_prompt(model, codes[0], "What is it?", encode)  # [L]
    drawn = draw_image_tokens(model, draw_prompt(model, "a cat", encode, (32, 32))[None], (32, 32))
    save_png(decode_image(model, drawn)[0], "cat.png")                  # Emu3
    save_png(decode_image(model, drawn, vqgan.load_vqgan(model, path))[0], "cat.png")  # Chameleon
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import VQModel
from PIL import Image
from torch import nn

from modecl.core.adapters import has_adapters, pass_kind, routing_context
from modecl.core.files import atomic_path, read_image
from modecl.core.generation import generate
from modecl.core.modality import HOST_FAMILIES, host_family
from modecl.hosts.vqgan import code_indices, decode_codes

__all__ = [
    "ImageVocabulary",
    "bos_ids",
    "decode_image",
    "draw_image_tokens",
    "draw_prompt",
    "image_grid",
    "image_span",
    "image_tokens",
    "image_vocabulary",
    "load_image",
    "save_png",
    "span_length",
    "understand_prompt",
]

Encode = Callable[[str], Sequence[int]]


@dataclass(frozen=True)
class ImageVocabulary:
    """The image token ids of one host: its VQ codes (sorted) and span markers."""

    family: str
    codes: tuple[int, ...]
    begin: int
    end: int
    wrapper: int | None = None  # Emu3 only, as the two below
    row_end: int | None = None
    frame_end: int | None = None


def image_vocabulary(model: nn.Module) -> ImageVocabulary:
    """Read the image ids of a Chameleon or Emu3 `model` from its `config.vocabulary_map`."""
    vocabulary: dict[str, int] = getattr(model.config, "vocabulary_map", None) or {}
    found = host_family(vocabulary)
    if found is None:
        raise ValueError(
            f"{type(model).__name__} is not a Chameleon or Emu3 host: its config has no "
            "vocabulary_map with IMGIMG... or <|visual token ...|> entries"
        )
    family, codes = found
    names = HOST_FAMILIES[family].markers
    missing = [name for name in names.values() if name not in vocabulary]
    if missing:
        raise ValueError(f"{family} vocabulary_map lacks the image markers {missing}")
    markers = {role: vocabulary[name] for role, name in names.items()}
    return ImageVocabulary(family, tuple(codes), **markers)


def _layout(vocab: ImageVocabulary, grid: tuple[int, int]) -> list[int | None]:
    """The span from its first code on: None where a code goes, else the marker there."""
    height, width = grid
    if vocab.family == "emu3":
        return [*([None] * width + [vocab.row_end]) * height, vocab.frame_end, vocab.end]
    return [None] * (height * width) + [vocab.end]


def span_length(vocab: ImageVocabulary, grid: tuple[int, int], encode: Encode) -> int:
    """The number of tokens of an image span of `grid` (h, w) codes, markers included."""
    return len(_head(vocab, grid, encode)) + len(_layout(vocab, grid))


def _head(vocab: ImageVocabulary, grid: tuple[int, int], encode: Encode) -> list[int]:
    """The span's tokens before its first code."""
    if vocab.family == "emu3":
        return [vocab.begin, *encode(f"{grid[0]}*{grid[1]}"), vocab.wrapper]
    return [vocab.begin]


def _check_span(vocab: ImageVocabulary, tokens: torch.Tensor, grid: tuple[int, int]) -> None:
    """Raise ValueError unless `tokens` (..., m) are exactly `_layout`: codes where codes go."""
    layout = _layout(vocab, grid)
    fits = tokens.shape[-1] == len(layout)
    if fits:
        forced = torch.tensor([-1 if t is None else t for t in layout], device=tokens.device)
        is_code = torch.isin(tokens, torch.tensor(vocab.codes, device=tokens.device))
        fits = bool(torch.where(forced < 0, is_code, tokens == forced).all())
    if not fits:
        raise ValueError(f"tokens do not form a {grid[0]}x{grid[1]} {vocab.family} image span")


def bos_ids(model: nn.Module) -> list[int]:
    bos = model.config.get_text_config().bos_token_id
    return [] if bos is None else [bos]


@torch.no_grad()
def image_tokens(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The model's own VQ tokens of images `[B, 3, H, W]`: `[B, n]` vocabulary ids.

    Chameleon: h·w codes; Emu3: h rows of w codes, each closed by its row-end marker.
    """
    pixel_values = pixel_values.to(model.device, model.dtype)
    batch = pixel_values.shape[0]
    if image_vocabulary(model).family == "emu3":
        sizes = torch.tensor([list(pixel_values.shape[-2:])] * batch)
        tokens = model.model.get_image_tokens(pixel_values, sizes)
    else:
        tokens = model.model.get_image_tokens(pixel_values)
    return tokens.view(batch, -1).long()


def load_image(path: str | Path, size_or_processor: int | tuple[int, int] | Any) -> torch.Tensor:
    """Read a PNG/JPEG into pixel values `[1, 3, H, W]` in [-1, 1].

    An int or (height, width) resizes to that size (the tiny models); otherwise it is the
    host's image processor (`processor(images=..., return_tensors="pt")`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    image = read_image(path)  # any mode and bit depth; transparency on white
    if not isinstance(size_or_processor, int | tuple):
        return size_or_processor(images=image, return_tensors="pt")["pixel_values"]
    size = size_or_processor
    height, width = (size, size) if isinstance(size, int) else size
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    return (pixels / 127.5 - 1)[None]


def image_grid(vocab: ImageVocabulary, body: Sequence[int]) -> tuple[int, int]:
    """The (h, w) code grid of one row of `image_tokens` (Chameleon's records no shape: 1 x n)."""
    if vocab.family == "emu3":
        height = int(np.count_nonzero(np.asarray(body) == vocab.row_end))
        return height, len(body) // max(height, 1) - 1
    return 1, len(body)


def image_span(
    vocab: ImageVocabulary, body: Sequence[int], encode: Encode
) -> tuple[list[int], list[int]]:
    """The image span of one row of `image_tokens`, as (head before the first code, rest)."""
    body = body.tolist() if isinstance(body, np.ndarray) else list(body)
    grid = image_grid(vocab, body)
    rest = [*body, *_layout(vocab, grid)[len(body) :]]  # the closing markers
    _check_span(vocab, torch.tensor(rest), grid)
    return _head(vocab, grid, encode), rest


def understand_prompt(
    model: nn.Module, image_ids: torch.Tensor, question: str, encode: Encode
) -> torch.Tensor:
    """`[L]` ids: BOS, the image span around `image_ids` (one row of `image_tokens`), question."""
    head, rest = image_span(image_vocabulary(model), image_ids.tolist(), encode)
    return torch.tensor([*bos_ids(model), *head, *rest, *encode(question)])


def draw_prompt(
    model: nn.Module, caption: str, encode: Encode, grid: tuple[int, int]
) -> torch.Tensor:
    """`[L]` ids: BOS, the caption, and the opening of an image span of `grid` (h, w) codes."""
    vocab = image_vocabulary(model)
    return torch.tensor([*bos_ids(model), *encode(caption), *_head(vocab, grid, encode)])


@torch.no_grad()
def draw_image_tokens(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    grid: tuple[int, int],
    *,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw an image of `grid` (h, w) codes after prompts `[B, P]` (left-padded, with
    `attention_mask` 0 on the padding, where of unequal length).

    Returns the rest of the span `[B, m]`: image codes only where codes go, the markers
    (Emu3's row ends, the end of image) forced where they go; decoded by
    :func:`~modecl.core.generation.generate`. Unless a pass kind is set, adapters route it
    as a `draw` pass.
    """
    vocab = image_vocabulary(model)
    routed = has_adapters(model) and routing_context(model).pass_kind is None
    with pass_kind(model, "draw") if routed else nullcontext():
        return generate(
            model,
            prompt_ids,
            _layout(vocab, grid),
            allowed=torch.tensor(vocab.codes, device=prompt_ids.device),
            attention_mask=attention_mask,
            temperature=temperature,
            top_k=top_k,
            generator=generator,
        )


@torch.no_grad()
def decode_image(
    model: nn.Module, tokens: torch.Tensor, vqgan: VQModel | None = None
) -> torch.Tensor:
    """Pixels `[B, 3, H, W]` (about [-1, 1]) of drawn spans `[B, m]` (`draw_image_tokens`).

    Emu3 decodes with its own VQ model. transformers' Chameleon has an encoder only: its
    square spans decode with `vqgan` (:func:`modecl.hosts.vqgan.load_vqgan`).
    """
    vocab = image_vocabulary(model)
    if vocab.family == "emu3":
        grid = image_grid(vocab, tokens[0, :-2].tolist())
        _check_span(vocab, tokens, grid)
        rows = tokens[:, :-2].view(-1, grid[0], grid[1] + 1)
        indices = model.model.vocabulary_mapping.convert_bpe2img(rows)  # drops the row ends
        return model.model.vqmodel.decode(indices.long())
    if vqgan is None:
        raise NotImplementedError(
            "transformers' Chameleon VQ-VAE has an encoder only (no decoder module or weights); "
            "pass the VQGAN decoder of modecl.hosts.vqgan.load_vqgan"
        )
    side = math.isqrt(tokens.shape[-1] - 1)
    _check_span(vocab, tokens, (side, side))
    return decode_codes(vqgan, code_indices(model, tokens[:, :-1]).view(-1, side, side))


def save_png(pixels: torch.Tensor, path: str | Path) -> Path:
    """Write one image `[3, H, W]` in [-1, 1] as an 8-bit RGB PNG; returns the path."""
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ValueError(f"expected one RGB image [3, H, W], got shape {tuple(pixels.shape)}")
    path = Path(path)
    array = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(array.permute(1, 2, 0).cpu().numpy()).save(tmp, format="PNG")
    return path
