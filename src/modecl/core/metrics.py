"""Continual-learning measures on the accuracy matrix, a Fréchet distance, and seed statistics.

Accuracy matrix ``R``: ``R[i][j]`` is the accuracy on task ``j`` after training task ``i``
(stage ``i + 1``), for every task ``j`` of a sequence of ``T`` tasks, so ``R`` is ``T x T``.
``Z`` is the pre-trained (stage 0, zero-shot) row. ``F = T - 1`` indexes the final row.
Measures that compare old tasks with the end of the sequence are ``None`` when ``T == 1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.linalg
from numpy.typing import ArrayLike

Matrix = Sequence[Sequence[float]] | np.ndarray

# Accuracies are ratios of counts: a gain equal to min_gain can land a hair below it in
# floating point (0.35 - 0.3 < 0.05), and should still qualify.
_GAIN_TOLERANCE = 1e-12


def _as_matrix(R: Matrix) -> np.ndarray:
    rows = [list(row) for row in R]
    if not rows:
        raise ValueError("accuracy matrix is empty")
    lengths = {len(row) for row in rows}
    if len(lengths) != 1:
        raise ValueError(f"accuracy matrix is ragged: row lengths {[len(r) for r in rows]}")
    (n_tasks,) = lengths
    if n_tasks != len(rows):
        raise ValueError(
            f"accuracy matrix must be square (one row per trained task, one column per task): "
            f"got {len(rows)} rows x {n_tasks} columns"
        )
    return np.asarray(rows, dtype=float)


def _as_row(Z: Sequence[float] | np.ndarray, n_tasks: int) -> np.ndarray:
    row = np.asarray(Z, dtype=float)
    if row.shape != (n_tasks,):
        raise ValueError(
            f"pre-trained row must have one accuracy per task ({n_tasks}), got shape {row.shape}"
        )
    return row


def final_average_accuracy(R: Matrix) -> float:
    """Mean over all tasks of the accuracy after the last stage: ``mean_j R[F][j]``."""
    acc = _as_matrix(R)
    return float(acc[-1].mean())


def average_forgetting(R: Matrix) -> float | None:
    """Mean over old tasks ``j < F`` of ``max_{j <= i < F} R[i][j] - R[F][j]``.

    The best accuracy is taken from the stage that trained ``j`` onwards (not from before
    it), as in Chaudhry et al. (2018). ``None`` when ``T == 1``.
    """
    acc = _as_matrix(R)
    final = acc.shape[0] - 1
    if final == 0:
        return None
    drops = [acc[j:final, j].max() - acc[final, j] for j in range(final)]
    return float(np.mean(drops))


def backward_transfer(R: Matrix) -> float | None:
    """Mean over old tasks ``j < F`` of ``R[F][j] - R[j][j]`` (negative = forgetting).

    ``None`` when ``T == 1``.
    """
    acc = _as_matrix(R)
    final = acc.shape[0] - 1
    if final == 0:
        return None
    return float(np.mean([acc[final, j] - acc[j, j] for j in range(final)]))


def gain_kept(R: Matrix, Z: Sequence[float] | np.ndarray, min_gain: float = 0.05) -> float | None:
    """Mean share of each old task's gain over the pre-trained model kept at the end.

    Over old tasks ``j < F`` whose gain ``R[j][j] - Z[j]`` is at least ``min_gain`` (a
    smaller gain makes the ratio meaningless noise), the mean of
    ``(R[F][j] - Z[j]) / (R[j][j] - Z[j])``: 1 = all kept, 0 = back to zero-shot, negative
    = below zero-shot. ``None`` when no task qualifies (including ``T == 1``).
    """
    acc = _as_matrix(R)
    zero_shot = _as_row(Z, acc.shape[0])
    final = acc.shape[0] - 1
    shares = []
    for j in range(final):
        gain = acc[j, j] - zero_shot[j]
        if gain >= min_gain - _GAIN_TOLERANCE:
            shares.append((acc[final, j] - zero_shot[j]) / gain)
    if not shares:
        return None
    return float(np.mean(shares))


def summarize(R: Matrix, Z: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """All accuracy-matrix measures, keyed as in ``results.json``."""
    return {
        "final_average_accuracy": final_average_accuracy(R),
        "average_forgetting": average_forgetting(R),
        "bwt": backward_transfer(R),
        "gain_kept": gain_kept(R, Z),
    }


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike, *, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussian fits of two ``[n, d]`` feature sets (the FID formula).

    ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b))``. ``eps`` is added to both
    covariances' diagonals before anything else: features such as always-blank corner
    pixels have zero variance, and a singular product has no reliable square root. Adding
    it to both sides keeps identical sets at distance 0. Imaginary parts left by ``sqrtm``
    are numerical noise and dropped.
    """
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"features must be [n, d] arrays, got shapes {a.shape} and {b.shape}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(
            f"need at least 2 samples per set for a covariance, got {a.shape[0]} and {b.shape[0]}"
        )
    offset = eps * np.eye(a.shape[1])
    cov_a = np.atleast_2d(np.cov(a, rowvar=False)) + offset
    cov_b = np.atleast_2d(np.cov(b, rowvar=False)) + offset
    cross = np.real(scipy.linalg.sqrtm(cov_a @ cov_b))
    mean_term = float(np.sum((a.mean(axis=0) - b.mean(axis=0)) ** 2))
    trace_term = float(np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(cross))
    # The true distance is non-negative; identical sets can round to -1e-12.
    return max(mean_term + trace_term, 0.0)


def mean_std(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``) over seeds; std is 0.0 for one value."""
    data = np.asarray(values, dtype=float)
    if data.ndim != 1 or data.size == 0:
        raise ValueError(f"need a non-empty 1-D sequence of values, got shape {data.shape}")
    std = float(data.std(ddof=1)) if data.size > 1 else 0.0
    return float(data.mean()), std


def variance_split(groups: Sequence[Sequence[float]]) -> dict[str, float]:
    """How much of the spread of replicates lies between their groups (hosts) and how much
    within them (seeds on one host): one-way analysis of variance.

    With ``x[h][s]`` the value of seed ``s`` on host ``h``, ``m[h]`` a host's mean and ``m``
    the grand mean over all ``n`` values of ``g`` groups::

        SS_between = sum_h len(x[h]) * (m[h] - m)^2
        SS_within  = sum_h sum_s (x[h][s] - m[h])^2        (SS_total = their sum)

    Args:
        groups: each host's values (at least two hosts, each with at least one value).

    Returns:
        ``mean``; ``std``, the sample std of all values; ``between_std``, the sample std of
        the host means; ``within_std``, the pooled within-host std (``SS_within / (n - g)``,
        0 when every host has one value); ``between_share``, ``SS_between / SS_total`` (0
        when every value is equal).
    """
    data = [np.asarray(g, dtype=float) for g in groups]
    if len(data) < 2 or any(g.ndim != 1 or g.size == 0 for g in data):
        raise ValueError("need at least two groups, each a non-empty 1-D sequence of values")
    values = np.concatenate(data)
    grand = values.mean()
    means = np.array([g.mean() for g in data])
    between = float(sum(g.size * (m - grand) ** 2 for g, m in zip(data, means, strict=True)))
    within = float(sum(((g - g.mean()) ** 2).sum() for g in data))
    free = values.size - len(data)
    total = between + within
    return {
        "mean": float(grand),
        "std": float(values.std(ddof=1)),
        "between_std": float(means.std(ddof=1)),
        "within_std": float(np.sqrt(within / free)) if free else 0.0,
        "between_share": between / total if total > 0 else 0.0,
    }
