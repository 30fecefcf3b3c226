"""CLIP alignment of drawn images, as the paper scores image generation.

    image alignment  mean cosine similarity between a drawn image and the real images of
                     its prompt's concept (CustomConcept101), averaged over drawn images
    text alignment   mean cosine similarity between a drawn image and its prompt

The paper uses OpenAI's CLIP ViT-B/32. Its weights are read from a local directory saved
by `save_pretrained` (model and processor); nothing is downloaded. Without them the result
says `unavailable` and why, so a run without the weights still reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

__all__ = ["ClipAlignment", "clip_alignment"]


@dataclass(frozen=True)
class ClipAlignment:
    """Mean cosine similarities; `unavailable` says why there are none."""

    image: float | None = None
    text: float | None = None
    unavailable: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.unavailable is not None:
            return {"status": "unavailable", "reason": self.unavailable}
        return {"status": "ok", "image_alignment": self.image, "text_alignment": self.text}


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns the projected embeddings as the output's pooler_output.
    features = output if isinstance(output, torch.Tensor) else output.pooler_output
    return F.normalize(features.float(), dim=-1)


@torch.no_grad()
def clip_alignment(
    model_path: str | Path,
    drawn: Sequence[Image.Image],
    prompts: Sequence[str] | None = None,
    references: Sequence[Sequence[Image.Image]] | None = None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> ClipAlignment:
    """Score `drawn[i]` against `prompts[i]` (text) and `references[i]` (images).

    Either may be left out; its score is then None.
    """
    for name, paired in (("prompts", prompts), ("references", references)):
        if paired is not None and len(paired) != len(drawn):
            raise ValueError(f"{len(paired)} {name} for {len(drawn)} drawn images")
    path = Path(model_path)
    if not (path / "config.json").is_file():
        return ClipAlignment(unavailable=f"no CLIP model at {path} (config.json missing)")
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
        processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        return ClipAlignment(unavailable=f"cannot load CLIP from {path}: {error}")

    def embed_images(images: Sequence[Image.Image]) -> torch.Tensor:
        parts = []
        for start in range(0, len(images), batch_size):
            batch = [image.convert("RGB") for image in images[start : start + batch_size]]
            pixels = processor(images=batch, return_tensors="pt")["pixel_values"]
            parts.append(_features(model.get_image_features(pixel_values=pixels.to(device))))
        return torch.cat(parts)

    drawn_features = embed_images(drawn)
    image = text = None
    if references is not None:
        per_image = [
            (embed_images(real) @ drawn_features[i]).mean() for i, real in enumerate(references)
        ]
        image = float(torch.stack(per_image).mean())
    if prompts is not None:
        tokens = processor(text=list(prompts), padding=True, truncation=True, return_tensors="pt")
        text_features = _features(model.get_text_features(**tokens.to(device)))
        text = float((text_features * drawn_features).sum(-1).mean())
    return ClipAlignment(image=image, text=text)
