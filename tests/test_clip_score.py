"""CLIP alignment with a tiny random CLIP saved to disk (`tests.fixtures.write_tiny_clip`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from modecl.hosts.clip import ClipAlignment, clip_alignment
from tests.fixtures import CLIP_SIZE, write_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


def images(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (CLIP_SIZE, CLIP_SIZE, 3), dtype=np.uint8))
        for _ in range(count)
    ]


def test_scores_against_clip_forward(clip_dir):
    drawn, prompts = images(3, 0), ["a cat", "a dog", "a red bird"]
    scores = clip_alignment(clip_dir, drawn, prompts, references=[drawn[:1], drawn[1:2], drawn])
    # CLIP's own forward: logits_per_image = exp(logit_scale) * cosine
    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    inputs = processor(text=prompts, images=drawn, padding=True, return_tensors="pt")
    with torch.no_grad():
        output = model(**inputs)
        cosines = output.logits_per_image / model.logit_scale.exp()
    assert scores.text == pytest.approx(float(cosines.diag().mean()), abs=1e-5)
    embeds = F.normalize(output.image_embeds, dim=-1)
    pairwise = embeds @ embeds.T
    expected_image = (1 + 1 + float(pairwise[2].mean())) / 3  # an image with itself: 1
    assert scores.image == pytest.approx(expected_image, abs=1e-5)
    assert -1 <= scores.text <= 1 and scores.image < 1
    assert scores.to_dict() == {
        "status": "ok",
        "image_alignment": scores.image,
        "text_alignment": scores.text,
    }


def test_either_score_may_be_left_out(clip_dir):
    drawn = images(2, 1)
    only_text = clip_alignment(clip_dir, drawn, prompts=["a cat", "a dog"], batch_size=1)
    assert only_text.image is None and only_text.text is not None
    only_image = clip_alignment(clip_dir, drawn, references=[images(2, 2), images(1, 3)])
    assert only_image.text is None and only_image.image is not None
    with pytest.raises(ValueError, match="1 prompts for 2 drawn images"):
        clip_alignment(clip_dir, drawn, prompts=["a cat"])


def test_missing_weights_are_reported_not_raised(tmp_path):
    result = clip_alignment(tmp_path / "clip-vit-base-patch32", images(1, 0), ["a cat"])
    assert result == ClipAlignment(unavailable=result.unavailable)
    assert result.to_dict()["status"] == "unavailable"
    assert "clip-vit-base-patch32" in result.to_dict()["reason"]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    assert "cannot load CLIP" in clip_alignment(tmp_path / "broken", images(1, 0)).unavailable
