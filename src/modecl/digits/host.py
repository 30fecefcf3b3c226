"""The digits study in one object (not a world: no host model): pools, codebook,
vocabulary, judge and their measures."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from sklearn.decomposition import PCA

from modecl.core.evaluate import exact_accuracy, image_nll, pass_if_adapted
from modecl.core.generation import generate
from modecl.core.metrics import frechet_distance
from modecl.core.sequences import DrawPair, left_padded
from modecl.core.tasks import Sample, Task
from modecl.digits.codebook import TOKENS_PER_IMAGE, Codebook
from modecl.digits.config import DigitsConfig
from modecl.digits.data import DIGIT_WORDS, Pools, load_pools
from modecl.digits.format import DigitsFormat, draw_prompt
from modecl.digits.judge import Judge
from modecl.digits.tasks import CAPTION_QUESTION, DRAW_PROMPT, builtin_tasks, words
from modecl.digits.vocab import Vocabulary


@dataclass
class Digits:
    """Everything but the model weights; built deterministically from a config."""

    config: DigitsConfig
    pools: Pools
    codebook: Codebook
    vocab: Vocabulary

    @classmethod
    def build(cls, config: DigitsConfig, codebook: Codebook | None = None) -> Digits:
        pools = load_pools(config.data)
        if codebook is None:
            codebook = Codebook.fit(
                pools.images[pools.pretrain], config.codebook.codes, config.codebook.seed
            )
        return cls(config, pools, codebook, Vocabulary(words(), codebook.size))

    @cached_property
    def format(self) -> DigitsFormat:
        """The token format that training and evaluation use."""
        return DigitsFormat(self.vocab)

    @cached_property
    def judge(self) -> Judge:
        """Trained on the real pixels of the pre-training and continual-train pools."""
        index = np.concatenate([self.pools.pretrain, self.pools.pretrain_val, self.pools.train])
        return Judge(self.pools.images[index], self.pools.labels[index])

    @cached_property
    def feature_space(self) -> PCA:
        """A fixed feature space for Frechet distances, fitted on real pixels only."""
        index = np.concatenate([self.pools.pretrain, self.pools.pretrain_val])
        return PCA(n_components=16, random_state=0).fit(
            self.pools.images[index].reshape(len(index), -1)
        )

    def frechet_distance(self, codes: np.ndarray) -> float:
        """Frechet distance between drawn images and the real test images (PCA features)."""
        drawn = self.codebook.decode(codes).reshape(len(codes), -1)
        real = self.pools.images[self.pools.test].reshape(len(self.pools.test), -1)
        pca = self.feature_space
        return frechet_distance(pca.transform(drawn), pca.transform(real))

    def draw_pairs(self, index: np.ndarray) -> list[DrawPair]:
        """("draw a <digit>", real image codes) pairs: the distillation stream."""
        codes = self.codebook.encode(self.pools.images[index])
        return [
            DrawPair(DRAW_PROMPT.format(DIGIT_WORDS[y]), c)
            for c, y in zip(codes, self.pools.labels[index], strict=True)
        ]

    def captions(self, index: np.ndarray) -> list[Sample]:
        codes = self.codebook.encode(self.pools.images[index])
        return [
            Sample(c, CAPTION_QUESTION, DIGIT_WORDS[y], int(y), int(i))
            for i, c, y in zip(index, codes, self.pools.labels[index], strict=True)
        ]

    def tasks(self, names: list[str] | tuple[str, ...]) -> list[Task]:
        return builtin_tasks(self.pools, self.codebook, names, self.config.spatial_margin)

    def judge_report(self) -> dict[str, float]:
        test = self.pools.test
        images, labels = self.pools.images[test], self.pools.labels[test]
        recon = self.codebook.decode(self.codebook.encode(images))
        return {
            "real_accuracy": self.judge.accuracy(images, labels),
            "reconstructed_accuracy": self.judge.accuracy(recon, labels),
        }

    def captioning_accuracy(self, model: torch.nn.Module, index: np.ndarray) -> float:
        return exact_accuracy(model, self.format, self.captions(index))

    def draw_digits(
        self, model: torch.nn.Module, per_digit: int, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``per_digit`` sampled images of each digit: (codes [N, 16], requested labels [N])."""
        gen = self.config.generation
        labels = np.repeat(np.arange(10), per_digit)
        codes = draw(
            model,
            self.vocab,
            [DRAW_PROMPT.format(DIGIT_WORDS[y]) for y in labels],
            image_tokens=TOKENS_PER_IMAGE,
            temperature=gen.temperature,
            top_k=gen.top_k,
            seed=seed,
        )
        return codes, labels

    def generation_accuracy(self, codes: np.ndarray, labels: np.ndarray) -> float:
        """Share of drawn images the judge classifies as the requested digit."""
        return self.judge.accuracy(self.codebook.decode(codes), labels)

    def image_nll(self, model: torch.nn.Module, index: np.ndarray) -> float:
        """Teacher-forced NLL of the image codes of held-out ("draw a <digit>", image) pairs."""
        return image_nll(model, self.format, self.draw_pairs(index))


@torch.no_grad()
def draw(
    model: torch.nn.Module,
    vocab: Vocabulary,
    prompts: Sequence[str],
    *,
    image_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
    batch_size: int = 256,
) -> np.ndarray:
    """Sample one image per text prompt: ``[len(prompts), image_tokens]`` codes.

    The prompt ends with ``<boi>``; every sampled token is constrained to the image codes.
    """
    generator = torch.Generator().manual_seed(seed)
    # A mask, not ids: a sample draws over the whole vocabulary, as the benchmark always has.
    is_code = torch.zeros(len(vocab), dtype=torch.bool)
    is_code[vocab.image_code_ids] = True
    ids = [[*draw_prompt(vocab, p), vocab.boi_id] for p in prompts]
    out = np.zeros((len(prompts), image_tokens), dtype=np.int64)
    for index, batch, mask in left_padded(ids, vocab.pad_id, batch_size):
        with pass_if_adapted(model, "draw"):
            tokens = generate(
                model,
                batch,
                image_tokens,
                allowed=is_code,
                attention_mask=mask,
                temperature=temperature,
                top_k=top_k,
                generator=generator,
            )
        out[index] = tokens.numpy() - vocab.code_offset
    return out
