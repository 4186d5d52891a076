"""B-Pref scripted teachers: each rule against a hand computation."""

import math

import numpy as np
import pytest

from mmalign.errors import ConfigError
from mmalign.robotics.teachers import Teacher, teacher

A = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [2.0, 2.0, 2.0]])
B = np.array([[2.0, 2.0, 2.0], [0.1, 0.0, 0.0], [0.0, 0.0, 2.0], [2.0, 2.0, 2.1]])
# returns      a: 3, 0, 3, 6       b: 6, 0.1, 2, 6.1


def rng():
    return np.random.default_rng(0)


def test_oracle_prefers_the_higher_return():
    np.testing.assert_array_equal(teacher("oracle").label(A, B, rng()), [1, 1, 0, 1])


def test_myopic_discounts_early_steps():
    # gamma 0.5: weights [0.25, 0.5, 1]; pair 2: a = 0.75, b = 2 -> b preferred although R_a = 3 > R_b = 2
    labels = Teacher(gamma=0.5).label(A, B, rng())
    np.testing.assert_array_equal(labels, [1, 1, 1, 1])
    np.testing.assert_array_equal(teacher("myopic").label(A, B, rng())[:2], [1, 1])


def test_equal_and_skip_thresholds_are_relative_to_the_mean_return():
    scale = 5.0
    # equal 0.1 * 5 = 0.5: |dR| = 3, 0.1, 1, 0.1 -> pairs 1 and 3 equal
    np.testing.assert_array_equal(Teacher(equal=0.1).label(A, B, rng(), scale=scale), [1, 0.5, 0, 0.5])
    # skip 0.1 * 5 = 0.5: max returns 6, 0.1, 3, 6.1 -> pair 1 skipped
    labels = Teacher(skip=0.1).label(A, B, rng(), scale=scale)
    assert math.isnan(labels[1]) and labels[[0, 2, 3]].tolist() == [1, 0, 1]
    default_scale = np.concatenate([A.sum(1), B.sum(1)]).mean()
    np.testing.assert_array_equal(teacher("equal").label(A, B, rng()),
                                  Teacher(equal=0.1).label(A, B, rng(), scale=default_scale))


def test_mistake_flips_with_probability_eps():
    a, b = np.zeros((20000, 1)), np.ones((20000, 1))
    flipped = 1 - Teacher(eps_mistake=0.1).label(a, b, rng())
    assert abs(flipped.mean() - 0.1) < 0.01
    assert (Teacher(eps_mistake=1.0).label(a, b, rng()) == 0).all()


def test_noisy_samples_bradley_terry():
    gap = np.array([-2.0, 0.0, 0.5, 3.0])
    a = np.zeros((len(gap) * 20000, 1))
    b = np.repeat(gap, 20000)[:, None]
    labels = Teacher(beta=1.0).label(a, b, rng()).reshape(len(gap), -1).mean(1)
    np.testing.assert_allclose(labels, 1 / (1 + np.exp(-gap)), atol=0.01)
    sharper = Teacher(beta=4.0).label(a, b, rng()).reshape(len(gap), -1).mean(1)
    np.testing.assert_allclose(sharper, 1 / (1 + np.exp(-4 * gap)), atol=0.01)


def test_bad_inputs():
    with pytest.raises(ConfigError, match="unknown teacher 'lazy'"):
        teacher("lazy")
    with pytest.raises(ConfigError, match="gamma must be in"):
        Teacher(gamma=0)
    with pytest.raises(ConfigError, match="beta must be positive"):
        Teacher(beta=math.nan)
    with pytest.raises(ConfigError, match="skip and equal thresholds must be finite"):
        Teacher(skip=math.inf)
    with pytest.raises(ValueError, match="NaN"):
        teacher("oracle").label(np.array([[np.nan]]), np.array([[1.0]]), rng())
    with pytest.raises(ValueError, match=r"both be \[M, L\]"):
        teacher("oracle").label(np.zeros((2, 3)), np.zeros((2, 4)), rng())


def test_a_teacher_without_a_skip_threshold_labels_negative_returns_too():
    rng = np.random.default_rng(0)
    labels = teacher("oracle").label(np.full((2, 3), -2.0), np.array([[-1.0] * 3, [-3.0] * 3]), rng)
    assert labels.tolist() == [1.0, 0.0]  # no NaN: a skip threshold of 0 skips nothing, even below zero
