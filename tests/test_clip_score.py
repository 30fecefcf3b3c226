"""CLIP scores: the alignment rules on hand-made embeddings, and embeddings, KID and FD with a
tiny random CLIP saved to disk (`tests.fixtures.write_tiny_clip`), checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from transformers import CLIPModel, CLIPProcessor

from modecl.hosts.clip import (
    ClipUnavailable,
    References,
    image_alignment,
    load_clip,
    text_alignment,
)
from tests.fixtures import CLIP_SIZE, write_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def clip(clip_dir):
    return load_clip(clip_dir)


def images(count: int, seed: int, size: tuple[int, int] = (CLIP_SIZE, CLIP_SIZE)) -> list:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(count)]


def pngs(folder, name: str, pictures: list) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    for i, picture in enumerate(pictures):
        picture.save(folder / f"{name}{i}.png")
    return [folder / f"{name}{i}.png" for i in range(len(pictures))]


# Three drawings (groups a, a, b) and three references (groups a, b, b), by hand.
DRAWN = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])  # lengths do not matter
REFERENCES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
COSINES = [[1, 0, -1], [0, 1, 0], [math.sqrt(0.5), math.sqrt(0.5), -math.sqrt(0.5)]]


def test_the_paper_rule_averages_every_cosine_and_the_own_rule_its_concepts():
    everyone, own, per_group = image_alignment(DRAWN, REFERENCES, "aab", "abb")
    assert everyone == pytest.approx(sum(map(sum, COSINES)) / 9)  # (1/3 + sqrt(.5)/3) / 3
    assert everyone == pytest.approx((1 + math.sqrt(0.5)) / 9)
    # Own: drawing 0 with reference 0; drawing 1 with reference 0; drawing 2 with 1 and 2.
    assert per_group == pytest.approx(
        {"a": (1 + 0) / 2, "b": (math.sqrt(0.5) - math.sqrt(0.5)) / 2}
    )
    assert own == pytest.approx((1 + 0 + 0) / 3)
    # Another grouping, another own score; the paper rule ignores the groups.
    again = image_alignment(DRAWN, REFERENCES, "abb", "abb")
    assert again[0] == pytest.approx(everyone)
    assert again[1] == pytest.approx((1 + (1 + 0) / 2 + 0) / 3)
    with pytest.raises(ValueError, match="no reference image of group 'c'"):
        image_alignment(DRAWN, REFERENCES, "abc", "abb")


def test_text_alignment_is_the_mean_cosine_with_each_prompt():
    texts = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, -1.0]])
    assert text_alignment(DRAWN, texts) == pytest.approx((1 + 0 - math.sqrt(0.5)) / 3)


def test_embeddings_are_clip_forwards(clip, clip_dir):
    drawn, prompts = images(3, 0), ["a cat", "a dog", "a red bird"]
    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    inputs = processor(text=prompts, images=drawn, padding=True, return_tensors="pt")
    with torch.no_grad():
        output = model(**inputs)
        cosines = output.logits_per_image / model.logit_scale.exp()  # CLIP's own cosines
    embedded = clip.images(drawn)
    torch.testing.assert_close(embedded, F.normalize(output.image_embeds, dim=-1))
    aligned = text_alignment(embedded, clip.texts(prompts))
    assert aligned == pytest.approx(float(cosines.diag().mean()), abs=1e-5)
    assert clip.images([]).shape == (0, 16)


def kid_by_hand(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased polynomial-kernel MMD² of two sets (degree 3, gamma 1 / d, coef 1)."""
    m = x.shape[0]

    def kernel(a, b):
        return (a @ b.T / x.shape[1] + 1) ** 3

    xx, yy, xy = kernel(x, x), kernel(y, y), kernel(x, y)
    off = (xx.sum() - xx.diag().sum() + yy.sum() - yy.diag().sum()) / (m * (m - 1))
    return float(off - 2 * xy.sum() / m**2)


def fd_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    mean = ((x.mean(0) - y.mean(0)) ** 2).sum()
    a, b = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    return float(mean + np.trace(a + b - 2 * linalg.sqrtm(a @ b).real))


def test_kid_and_fd_are_those_of_the_clip_embeddings(clip, tmp_path):
    # References of two sizes, in mixed order: embedded in file order all the same.
    real = images(12, 1) + images(12, 2, size=(20, 12))
    real = [real[i] for i in np.random.default_rng(0).permutation(24)]
    files = pngs(tmp_path / "real", "r", real)
    references = References(clip, files[:20], ["a"] * 10 + ["b"] * 10)
    torch.testing.assert_close(references.embeddings, clip.images(real[:20]))
    drawn = pngs(tmp_path / "drawn", "d", images(20, 3))
    groups = ["a"] * 10 + ["b"] * 10
    scores = references.score(drawn, ["a cat"] * 20, groups, seed=0)
    x, y = clip.images(real[:20]), clip.images(images(20, 3))
    # 20 of each: every KID subset is the whole set, so the mean is the set's MMD, std 0.
    assert scores["kid_subset_size"] == 20
    assert scores["kid"] == pytest.approx(kid_by_hand(x, y), rel=1e-4)
    assert scores["kid_std"] == pytest.approx(0, abs=1e-6)
    assert scores["fd"] == pytest.approx(
        fd_by_hand(x.double().numpy(), y.double().numpy()), rel=1e-3
    )
    assert scores["fd_reliable"] and scores["note"] == ""  # 20 samples > 16 dimensions
    everyone, own, per = image_alignment(y, x, groups, groups)
    assert (scores["image_alignment_all"], scores["image_alignment_own"]) == pytest.approx(
        (everyone, own)
    )
    assert scores["per_concept"] == pytest.approx(per)

    # The references' own drawings: no distance. An earlier stage's drawings are forgotten.
    same = references.score(files[:20], ["a cat"] * 20, groups, seed=0, per_concept=False)
    assert same["fd"] == pytest.approx(0, abs=1e-3) and "per_concept" not in same
    assert same["kid"] == pytest.approx(kid_by_hand(x, x), rel=1e-4)
    assert references.score(drawn, ["a cat"] * 20, groups, seed=0) == scores

    few = references.score(drawn[:3], ["a cat"] * 3, "aab", seed=1)
    assert few["kid_subset_size"] == 3 and math.isfinite(few["kid"]) and math.isfinite(few["fd"])
    assert not few["fd_reliable"]
    assert few["note"] == (
        "FD unreliable: 3 drawings and 20 reference images for 16 feature dimensions; read KID"
    )
    one = references.score(drawn[:1], ["a cat"], "a", seed=1)
    assert one["kid"] is one["fd"] is None and "need 2 drawings" in one["note"]
    assert -1 <= one["image_alignment_all"] <= 1


def test_missing_weights_say_why(tmp_path):
    with pytest.raises(ClipUnavailable, match=r"no CLIP model at .*clip-vit-base-patch32"):
        load_clip(tmp_path / "clip-vit-base-patch32")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(ClipUnavailable, match="cannot load CLIP"):
        load_clip(tmp_path / "broken")
