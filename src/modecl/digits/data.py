"""The one fixed split of scikit-learn's 8x8 handwritten digits into disjoint pools."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from modecl.digits.config import DataConfig

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Pools:
    """All 1,797 images (pixel values 0..16) and the index arrays of each pool.

    ``pretrain`` and ``pretrain_val`` together form the pre-training pool; the
    validation part is used only for checkpoint selection during pre-training.
    """

    images: np.ndarray  # [N, 8, 8] float32
    labels: np.ndarray  # [N] int64
    pretrain: np.ndarray
    pretrain_val: np.ndarray
    train: np.ndarray
    test: np.ndarray


def load_pools(config: DataConfig | None = None) -> Pools:
    """Split stratified by class, by ``config.seed``; the same seed gives the same pools."""
    config = config or DataConfig()
    digits = load_digits()
    images = digits.images.astype(np.float32)
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))
    test_fraction = 1.0 - config.pretrain_fraction - config.train_fraction
    if not 0 < test_fraction < 1:
        raise ValueError("data.pretrain_fraction + data.train_fraction must be below 1")
    rest, test = train_test_split(
        index, test_size=test_fraction, stratify=labels, random_state=config.seed
    )
    train_share = config.train_fraction / (config.pretrain_fraction + config.train_fraction)
    pre, train = train_test_split(
        rest, test_size=train_share, stratify=labels[rest], random_state=config.seed
    )
    pre, val = train_test_split(
        pre, test_size=config.val_fraction, stratify=labels[pre], random_state=config.seed
    )
    return Pools(images, labels, np.sort(pre), np.sort(val), np.sort(train), np.sort(test))
