"""Label-free baselines for PEARL's transferred labels, each against a hand computation."""

import numpy as np
import pytest

from mmalign.robotics import baselines, pearl
from mmalign.robotics.pairs import Pairs
from mmalign.robotics.trajectories import Trajectories


def test_later_segment_prefers_the_later_start_and_ties_at_equal_starts():
    z = baselines.later_segment(np.array([10, 3, 10]))
    np.testing.assert_array_equal(z, [[0.5, 1, 0.5], [0, 0.5, 0], [0.5, 1, 0.5]])


def test_smoother_actions_by_hand():
    actions = np.zeros((2, 3, 4))
    actions[0, :, 0] = [0.0, 1.0, 1.0]  # changes 1, 0: mean squared change 0.5
    actions[1, :, 1] = [0.0, 0.5, -0.5]  # changes 0.25, 1: 0.625
    np.testing.assert_allclose(baselines.action_roughness(actions), [0.5, 0.625])
    np.testing.assert_array_equal(baselines.smoother_actions(actions), [[0.5, 1], [0, 0.5]])


def test_nearest_neighbour_takes_the_win_rate_of_the_closest_source_segment():
    source = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    # source 0 beat 1 once and lost to 2 once: 1/2; source 1 lost to 0: 0; source 2 beat 0: 1
    pairs = Pairs("push-v3", np.array([0, 2]), np.array([1, 0]), np.array([1.0, 1.0]))
    z_source, mask = pearl.label_matrix(pairs, 3)
    np.testing.assert_allclose(baselines.win_rates(z_source, mask), [0.5, 0.0, 1.0])
    target = np.array([[9.0, 1.0], [1.0, 9.0], [0.5, 0.5]])  # nearest: 1, 2, 0
    np.testing.assert_array_equal(baselines.nearest_neighbour(source, target, z_source, mask),
                                  [[0.5, 0, 0], [1, 0.5, 1], [1, 0, 0.5]])


def test_random_plan_is_a_scaled_random_matrix_with_uniform_marginals():
    plan = baselines.random_plan(4, 6, seed=3)
    np.testing.assert_allclose(plan.sum(1), np.full(4, 1 / 4), atol=1e-9)
    np.testing.assert_allclose(plan.sum(0), np.full(6, 1 / 6), atol=1e-9)
    u = np.random.default_rng(3).uniform(1e-3, 1.0, size=(4, 6))
    scale = plan / u  # diag(a) U diag(b): the ratio is an outer product, of rank 1
    np.testing.assert_allclose(scale, np.outer(scale[:, 0], scale[0] / scale[0, 0]), rtol=1e-9)
    assert not np.allclose(plan, baselines.random_plan(4, 6, seed=4))


def test_same_window_and_accuracy_with_ties_counted_half():
    np.testing.assert_array_equal(baselines.same_window(np.array([0, 4, 9]), 5),
                                  [[True, True, False], [True, True, True], [False, True, True]])
    returns = np.array([1.0, 3.0, 2.0])
    z = baselines.prefer(np.array([0.0, 1.0, 1.0]))  # (0,1) right, (0,2) right, (1,2) a tie
    assert pearl.label_accuracy(z, returns, np.ones((3, 3), bool)) == pytest.approx(2.5 / 3)
    assert pearl.label_accuracy(z, returns) == 1.0, "by default only the decided pairs"
    with pytest.raises(ValueError, match="no target pair"):
        pearl.label_accuracy(z, returns, np.zeros((3, 3), bool))


def test_baseline_report_scores_every_rule_on_the_pairs_the_transfer_decides():
    rng = np.random.default_rng(0)
    n, length = 12, 5
    starts = np.arange(n) * 2
    rewards = np.repeat(starts[:, None].astype(float), length, 1)  # the later, the better: "later segment" is exact
    segments = Trajectories("push-v3", rng.normal(size=(n, length, 39)), rng.normal(size=(n, length, 4)), rewards,
                            np.zeros((n, length), bool), info={"start": starts})
    pairs = Pairs("push-v3", np.arange(1, n), np.arange(n - 1), np.ones(n - 1))
    z_target = np.full((n, n), 0.5)
    z_target[0, 1], z_target[1, 0] = 0.0, 1.0  # the transfer decides one pair, rightly
    report = pearl.baseline_report(segments, pairs, segments, z_target, window=2)
    assert report["baselines"]["pearl"] == 1.0 and report["baselines"]["later_segment"] == 1.0
    assert report["same_window"] == {"window": 2, "pairs": 1, **report["baselines"]}
    assert report["baselines"]["nearest_neighbour"] == 1.0, "each segment is its own nearest source segment"
