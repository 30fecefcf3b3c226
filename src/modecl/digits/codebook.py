"""The VQ image tokenizer: a k-means codebook over the 2x2 patches of an 8x8 image.

An image becomes 16 codes, row-major over its 4x4 grid of patches; decoding replaces
each code by its centroid patch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans

PATCH = 2
TOKENS_PER_IMAGE = (8 // PATCH) ** 2


def to_patches(images: np.ndarray) -> np.ndarray:
    """[N, 8, 8] -> [N, 16, 4]: 2x2 patches, row-major."""
    n = images.shape[0]
    grid = images.reshape(n, 4, PATCH, 4, PATCH).transpose(0, 1, 3, 2, 4)
    return grid.reshape(n, TOKENS_PER_IMAGE, PATCH * PATCH)


def from_patches(patches: np.ndarray) -> np.ndarray:
    """[N, 16, 4] -> [N, 8, 8]; inverse of :func:`to_patches`."""
    n = patches.shape[0]
    grid = patches.reshape(n, 4, 4, PATCH, PATCH).transpose(0, 1, 3, 2, 4)
    return grid.reshape(n, 8, 8)


class Codebook:
    """k-means codebook of 2x2 patches (``centroids``: [codes, 4])."""

    def __init__(self, centroids: np.ndarray):
        self.centroids = np.asarray(centroids, dtype=np.float32)

    @property
    def size(self) -> int:
        return len(self.centroids)

    @classmethod
    def fit(cls, images: np.ndarray, codes: int = 64, seed: int = 0) -> Codebook:
        patches = to_patches(images).reshape(-1, PATCH * PATCH)
        km = KMeans(n_clusters=codes, n_init=4, random_state=seed).fit(patches)
        # Sort centroids by ink so that code 0 is the blank patch: stable, readable ids.
        order = np.argsort(km.cluster_centers_.sum(axis=1), kind="stable")
        return cls(km.cluster_centers_[order])

    def encode(self, images: np.ndarray) -> np.ndarray:
        """[N, 8, 8] pixels -> [N, 16] codes (nearest centroid)."""
        patches = to_patches(np.asarray(images, dtype=np.float32))
        dist = ((patches[:, :, None, :] - self.centroids[None, None]) ** 2).sum(-1)
        return dist.argmin(-1).astype(np.int64)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """[N, 16] codes -> [N, 8, 8] pixels."""
        return from_patches(self.centroids[np.asarray(codes)])

    def save(self, path: str | Path) -> None:
        np.save(path, self.centroids)

    @classmethod
    def load(cls, path: str | Path) -> Codebook:
        return cls(np.load(path))
