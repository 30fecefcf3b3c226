"""CLIP scores of drawn images against a set of reference images.

    image alignment, all  the mean cosine similarity of every (drawing, reference image)
                          pair: each drawing against EVERY reference image. The paper's
                          rule (its code compares each image drawn from a CustomConcept101
                          prompt with every image of the benchmark's reference folder)
    image alignment, own  each drawing against its own concept's reference images, averaged
                          over them, then over drawings; per concept: over its drawings
    text alignment        each drawing against its prompt, averaged over drawings
    KID, FD               kernel and Fréchet distance between the drawings' and the
                          references' CLIP image embeddings (torchmetrics, CLIP as `feature`)

Every score uses CLIP's projected embeddings normalised to unit length. FD fits a Gaussian
to each set: with no more samples than feature dimensions (512 for ViT-B/32) its covariances
are singular and the value mostly measures the sample size, so read KID, which is unbiased at
any size. The paper uses OpenAI's CLIP ViT-B/32, read here from a local directory saved by
`save_pretrained` (model and processor); nothing is downloaded.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from transformers import CLIPModel, CLIPProcessor

from modecl.core.files import read_image

__all__ = [
    "Clip",
    "ClipFeatures",
    "ClipUnavailable",
    "References",
    "image_alignment",
    "load_clip",
    "text_alignment",
]

KID_SUBSET = 1000  # torchmetrics' default subset size, lowered to the smaller set's size


class ClipUnavailable(Exception):
    """No CLIP model to score with; the message says why."""


def _unit(output: Any) -> torch.Tensor:
    # transformers 5 returns the projected embeddings as the output's pooler_output.
    features = output if isinstance(output, torch.Tensor) else output.pooler_output
    return F.normalize(features.float(), dim=-1).cpu()


@dataclass
class Clip:
    """A CLIP model and its processor: unit-length embeddings `[N, d]` on the CPU."""

    model: CLIPModel
    processor: CLIPProcessor
    batch_size: int = 32

    @property
    def dims(self) -> int:
        return self.model.config.projection_dim

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        parts = [torch.empty(0, self.dims)]
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start : start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            output = self.model.get_image_features(pixel_values=pixels.to(self.model.device))
            parts.append(_unit(output))
        return torch.cat(parts)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        parts = [torch.empty(0, self.dims)]
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            tokens = self.processor(text=batch, padding=True, truncation=True, return_tensors="pt")
            parts.append(_unit(self.model.get_text_features(**tokens.to(self.model.device))))
        return torch.cat(parts)


def load_clip(path: str | Path, device: str | torch.device = "cpu") -> Clip:
    """The CLIP model saved at `path`; :class:`ClipUnavailable` says why there is none."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ClipUnavailable(f"no CLIP model at {path} (config.json missing)")
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
        processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ClipUnavailable(f"cannot load CLIP from {path}: {error}") from None
    return Clip(model, processor)


class ClipFeatures(nn.Module):
    """CLIP image embeddings of 8-bit images `[N, 3, H, W]`: torchmetrics' `feature`.

    The last batch's embeddings are kept: FD, KID and the alignments of one batch (the same
    tensor) share one forward."""

    def __init__(self, clip: Clip) -> None:
        super().__init__()
        self.clip = clip
        self.num_features = clip.dims  # read by FrechetInceptionDistance
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self._last is None or self._last[0] is not images:
            arrays = images.permute(0, 2, 3, 1).cpu().numpy()
            self._last = images, self.clip.images([Image.fromarray(a) for a in arrays])
        return self._last[1]


def image_alignment(
    drawn: torch.Tensor,
    references: torch.Tensor,
    drawn_groups: Sequence[str],
    reference_groups: Sequence[str],
) -> tuple[float, float, dict[str, float]]:
    """(all, own, per group) image alignment (module doc) of embeddings `[N, d]`, `[M, d]`:
    cosines, whatever the embeddings' length. Every drawing's group needs a reference."""
    cosines = F.normalize(drawn.double(), dim=-1) @ F.normalize(references.double(), dim=-1).T
    groups = np.asarray(list(reference_groups))
    own = []
    for row, group in zip(cosines, drawn_groups, strict=True):
        mine = torch.from_numpy(groups == group)
        if not mine.any():
            raise ValueError(f"no reference image of group {group!r}")
        own.append(float(row[mine].mean()))
    per_group = {
        g: float(np.mean([v for v, h in zip(own, drawn_groups, strict=True) if h == g]))
        for g in dict.fromkeys(drawn_groups)
    }
    return float(cosines.mean()), float(np.mean(own)), per_group


def text_alignment(drawn: torch.Tensor, texts: torch.Tensor) -> float:
    """Mean cosine of each drawing's embedding with its prompt's (`[N, d]` each)."""
    return float(F.cosine_similarity(drawn.double(), texts.double(), dim=-1).mean())


def _by_size(files: Sequence[Path]) -> list[tuple[list[int], torch.Tensor]]:
    """The files as 8-bit RGB batches `[n, 3, H, W]`, one per image size, with their indices."""
    groups: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    for i, file in enumerate(files):
        array = np.asarray(read_image(file))
        groups.setdefault(array.shape, []).append((i, array))
    return [
        (
            [i for i, _ in group],
            torch.from_numpy(np.stack([a for _, a in group])).permute(0, 3, 1, 2),
        )
        for group in groups.values()
    ]


class References:
    """A set of reference images grouped by concept, embedded once; :meth:`score` compares
    each stage's drawings with it."""

    def __init__(self, clip: Clip, files: Sequence[Path], groups: Sequence[str]) -> None:
        self.clip, self.groups = clip, list(groups)
        self.features = ClipFeatures(clip)
        # Only the main process scores: no gathering across processes on compute.
        kept = {"reset_real_features": False, "sync_on_compute": False}
        self.fd = FrechetInceptionDistance(feature=self.features, **kept)
        with warnings.catch_warnings():  # that it keeps every feature (2 KiB an image)
            warnings.filterwarnings("ignore", "Metric `Kernel Inception Distance`")
            self.kid = KernelInceptionDistance(feature=self.features, **kept)
        self.embeddings = self._add(files, real=True)

    def _add(self, files: Sequence[Path], real: bool) -> torch.Tensor:
        """The files' embeddings `[n, d]`, added to FD's and KID's reference (`real`) or
        drawn set, reading `clip.batch_size` files at a time."""
        out = torch.empty(len(files), self.clip.dims)
        for start in range(0, len(files), self.clip.batch_size):
            for index, batch in _by_size(files[start : start + self.clip.batch_size]):
                out[[start + i for i in index]] = self.features(batch)
                self.fd.update(batch, real=real)
                self.kid.update(batch, real=real)
        return out

    def score(
        self,
        drawn: Sequence[Path],
        prompts: Sequence[str],
        groups: Sequence[str],
        seed: int,
        per_concept: bool = True,
    ) -> dict[str, Any]:
        """Every score of the drawings `drawn` (files) of `prompts`, drawing i of concept
        `groups[i]` (`per_concept`: with each concept's own alignment). KID's random subsets
        are drawn from `seed`."""
        self.fd.reset()  # an earlier stage's drawings; the references stay
        self.kid.reset()
        images = self._add(drawn, real=False)
        everyone, own, per_group = image_alignment(images, self.embeddings, groups, self.groups)
        scores: dict[str, Any] = {
            "status": "ok",
            "image_alignment_all": everyone,
            "image_alignment_own": own,
            "text_alignment": text_alignment(images, self.clip.texts(prompts)),
        }
        if per_concept:
            scores["per_concept"] = per_group
        return scores | self._distances(len(drawn), seed)

    def _distances(self, count: int, seed: int) -> dict[str, Any]:
        """KID (mean and std over subsets) and FD of `count` drawings against the references."""
        references, dims = len(self.groups), self.clip.dims
        size = min(KID_SUBSET, count, references)
        if size < 2:
            note = f"KID and FD need 2 drawings and 2 reference images: {count} drawn"
            return {"kid": None, "kid_std": None, "fd": None, "fd_reliable": False, "note": note}
        self.kid.subset_size = size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            kid, kid_std = self.kid.compute()
        reliable, note = min(count, references) > dims, ""
        if not reliable:
            note = (
                f"FD unreliable: {count} drawings and {references} reference images for "
                f"{dims} feature dimensions; read KID"
            )
        return {
            "kid": float(kid),
            "kid_std": float(kid_std),
            "kid_subset_size": size,
            "fd": float(self.fd.compute()),
            "fd_reliable": reliable,
            "note": note,
        }
