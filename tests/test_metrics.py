import numpy as np
import pytest

from modecl.core.metrics import (
    average_forgetting,
    backward_transfer,
    final_average_accuracy,
    frechet_distance,
    gain_kept,
    mean_std,
    summarize,
)

# R[i][j]: accuracy on task j after training task i. R[0][1] = 0.99 precedes training
# task 1 and must not count as its best accuracy; R[1][0] = 0.95 beats the diagonal.
R = [
    [0.90, 0.99, 0.50],
    [0.95, 0.80, 0.40],
    [0.60, 0.50, 0.90],
]
Z = [0.50, 0.30, 0.40]


def test_final_average_accuracy():
    assert final_average_accuracy(R) == pytest.approx((0.6 + 0.5 + 0.9) / 3)


def test_average_forgetting():
    # task 0: max(0.90, 0.95) - 0.60 = 0.35; task 1: 0.80 - 0.50 = 0.30
    assert average_forgetting(R) == pytest.approx(0.325)


def test_backward_transfer():
    # task 0: 0.60 - 0.90; task 1: 0.50 - 0.80
    assert backward_transfer(R) == pytest.approx(-0.30)


def test_gain_kept():
    # task 0: (0.6 - 0.5) / (0.9 - 0.5) = 0.25; task 1: (0.5 - 0.3) / (0.8 - 0.3) = 0.4
    assert gain_kept(R, Z) == pytest.approx(0.325)


def test_gain_kept_threshold():
    assert gain_kept(R, Z, min_gain=0.45) == pytest.approx(0.4)  # only task 1 (gain 0.5)
    assert gain_kept(R, Z, min_gain=0.5) == pytest.approx(0.4)  # gain exactly at threshold
    assert gain_kept(R, Z, min_gain=0.6) is None  # no task qualifies


def test_gain_kept_threshold_is_float_robust():
    # 0.35 - 0.30 is 0.04999999999999999 in floating point; it is a gain of 0.05.
    matrix = [[0.35, 0.1], [0.32, 0.9]]
    assert gain_kept(matrix, [0.30, 0.1], min_gain=0.05) == pytest.approx(0.4)
    assert gain_kept(matrix, [0.31, 0.1], min_gain=0.05) is None


def test_gain_kept_can_be_negative():
    # Ended below zero-shot: (0.2 - 0.3) / (0.7 - 0.3) = -0.25
    assert gain_kept([[0.7, 0.0], [0.2, 0.9]], [0.3, 0.0]) == pytest.approx(-0.25)


def test_single_task_has_no_old_tasks():
    assert final_average_accuracy([[0.7]]) == pytest.approx(0.7)
    assert average_forgetting([[0.7]]) is None
    assert backward_transfer([[0.7]]) is None
    assert gain_kept([[0.7]], [0.1]) is None


def test_summarize():
    summary = summarize(np.asarray(R), Z)
    assert summary.keys() == {"final_average_accuracy", "average_forgetting", "bwt", "gain_kept"}
    assert summary["average_forgetting"] == pytest.approx(0.325)
    assert summary["bwt"] == pytest.approx(-0.30)
    assert summary["gain_kept"] == pytest.approx(0.325)
    assert all(isinstance(v, float) for v in summary.values())


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        ([[0.1, 0.2], [0.3]], "ragged"),
        ([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]], "square"),
        ([], "empty"),
    ],
)
def test_invalid_matrices(matrix, message):
    with pytest.raises(ValueError, match=message):
        summarize(matrix, [0.0, 0.0])


def test_invalid_zero_shot_row():
    with pytest.raises(ValueError, match="pre-trained row"):
        gain_kept(R, [0.1, 0.2])


def test_frechet_distance_identical_sets_is_zero():
    feats = np.random.default_rng(0).normal(size=(500, 6))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_shifted_gaussian_is_squared_shift():
    rng = np.random.default_rng(1)
    shift = np.array([1.0, 2.0, 0.0])
    a = rng.normal(size=(20_000, 3))
    # Sampling error of the mean difference gives sd ~0.045 here; 0.2 is > 4 sd.
    b = rng.normal(size=(20_000, 3)) + shift
    assert frechet_distance(a, b) == pytest.approx(float(shift @ shift), abs=0.2)
    # Same samples, translated: covariances match exactly, so only the shift remains.
    assert frechet_distance(a, a + shift) == pytest.approx(5.0, abs=1e-6)


def test_frechet_distance_one_dimensional_closed_form():
    rng = np.random.default_rng(2)
    a = rng.normal(0.0, 1.0, size=(400, 1))
    b = rng.normal(3.0, 2.0, size=(300, 1))
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-5)


def test_frechet_distance_is_symmetric():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(300, 4))
    b = rng.normal(size=(250, 4)) @ rng.normal(size=(4, 4)) + 0.5
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)


def test_frechet_distance_singular_covariance():
    # A constant feature (a blank corner pixel) makes the covariance singular.
    rng = np.random.default_rng(4)
    a = rng.normal(size=(200, 4))
    a[:, 0] = 0.0
    b = a + np.array([0.0, 1.0, 0.0, 0.0])
    distance = frechet_distance(a, b)
    assert np.isfinite(distance)
    assert distance == pytest.approx(1.0, abs=1e-4)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_input_errors():
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        frechet_distance(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 2)), np.zeros((5, 2)))


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))  # sample std, ddof=1
    assert mean_std([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError, match="non-empty"):
        mean_std([])
