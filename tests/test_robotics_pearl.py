"""PEARL: label transfer against its pair-by-pair definition, GW on isometric sets, and cross-task transfer."""

import numpy as np
import pytest

from mmalign.errors import ConfigError
from mmalign.robotics import collect, label, pearl
from mmalign.robotics.pairs import Pairs


def brute_force_transfer(coupling, z_source, mask):
    """Z_t[k, m] = sum_ij T[i,k] T[j,m] M[i,j] Z_s[i,j] / sum_ij T[i,k] T[j,m] M[i,j], one term at a time."""
    n_s, n_t = coupling.shape
    out = np.zeros((n_t, n_t))
    for k in range(n_t):
        for m in range(n_t):
            numerator = denominator = 0.0
            for i in range(n_s):
                for j in range(n_s):
                    weight = coupling[i, k] * coupling[j, m] * mask[i, j]
                    numerator += weight * z_source[i, j]
                    denominator += weight
            out[k, m] = numerator / denominator
    return out


def test_transfer_equals_the_pair_by_pair_definition():
    rng = np.random.default_rng(0)
    coupling = rng.random((5, 4))
    coupling /= coupling.sum()
    z_source = rng.random((5, 5))
    mask = (rng.random((5, 5)) < 0.6).astype(float)
    np.testing.assert_allclose(pearl.transfer_labels(coupling, z_source, mask),
                               brute_force_transfer(coupling, z_source, mask), rtol=1e-12)
    np.testing.assert_allclose(pearl.transfer_labels(coupling, z_source),
                               brute_force_transfer(coupling, z_source, np.ones((5, 5))), rtol=1e-12)


def test_a_permutation_coupling_carries_labels_over_exactly():
    perm = np.array([2, 0, 3, 1])
    coupling = np.zeros((4, 4))
    coupling[perm, np.arange(4)] = 0.25  # target k is source perm[k]
    z_source = np.random.default_rng(1).random((4, 4))
    np.testing.assert_allclose(pearl.transfer_labels(coupling, z_source), z_source[np.ix_(perm, perm)])
    unlabelled = np.zeros((4, 4))
    assert (pearl.transfer_labels(coupling, z_source, unlabelled) == 0.5).all(), "no labelled source pair: 0.5"


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")
@pytest.mark.parametrize("entropic", [False, True])
def test_gw_on_isometric_point_sets_recovers_the_permutation(entropic):
    rng = np.random.default_rng(3)
    points = rng.normal(size=(12, 3))
    angle = 0.7
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    perm = rng.permutation(12)
    moved = (points @ rotation.T + 5.0)[perm]  # target k is source perm[k]
    coupling = pearl.gw_coupling(pearl.distance_matrix(points), pearl.distance_matrix(moved), entropic, epsilon=1e-3)
    np.testing.assert_array_equal(coupling.argmax(0), perm)
    np.testing.assert_allclose(coupling.sum(0), np.full(12, 1 / 12), atol=1e-6)


def test_gw_without_a_finite_objective_is_refused(monkeypatch):
    def solver(c_source, c_target, p, q, loss, **kwargs):
        return np.outer(p, q), {"gw_dist": np.nan}

    monkeypatch.setattr(pearl.ot.gromov, "entropic_gromov_wasserstein", solver)
    square = pearl.distance_matrix(np.random.default_rng(0).normal(size=(4, 3)))
    with pytest.raises(ConfigError, match="not finite in any of 2 solve"):
        pearl.gw_coupling(square, square, entropic=True, restarts=2)


def test_label_matrix_from_pair_records():
    pairs = Pairs("push-v3", np.array([0, 2, 0]), np.array([1, 0, 1]), np.array([1.0, 0.8, 0.6]))
    z, mask = pearl.label_matrix(pairs, 3)
    assert z[0, 1] == pytest.approx(0.8) and z[1, 0] == pytest.approx(0.2)
    assert z[2, 0] == pytest.approx(0.8) and z[0, 2] == pytest.approx(0.2)
    assert mask[1, 2] == 0 and z[1, 2] == 0.5 and mask.sum() == 4


def test_label_accuracy_and_target_pairs():
    returns = np.array([1.0, 3.0, 2.0])
    z = np.array([[0.5, 0.1, 0.9], [0.9, 0.5, 0.5], [0.1, 0.5, 0.5]])
    # pairs (0,1): 0 < 1 right; (0,2): says 0 > 2, wrong; (1,2): 0.5 undecided
    assert pearl.label_accuracy(z, returns) == 0.5
    pairs = pearl.target_pairs(z, 50, seed=0, task="push-v3")
    assert len(pairs) > 0 and (pairs.label == 0.9).all()
    assert not {(1, 2), (2, 1)} & set(zip(pairs.chosen.tolist(), pairs.rejected.tolist()))


@pytest.mark.slow
def test_pearl_transfers_button_press_preferences_to_topdown(button_press, tmp_path):
    target = tmp_path / "topdown.npz"
    common = dict(task="button-press-topdown-v3", noise=[0.0, 0.5, 1.0, 2.0, 3.0], max_episode_steps=60, num_envs=4)
    collect.run(collect.Config(output=target, episodes=30, seed=2, **common))
    collect.run(collect.Config(output=tmp_path / "topdown-eval.npz", episodes=20, seed=3, first_state=30, **common))
    label.run(label.Config(data=str(button_press / "train.npz"), output=tmp_path / "source", teacher="oracle",
                           segment_length=30, segments=150, pairs=3000))
    config = pearl.Config(source=str(tmp_path / "source"), target=str(target), target_segments=150,
                          target_pairs=1500, eval_data=str(tmp_path / "topdown-eval.npz"), eval_pairs=500,
                          output=tmp_path / "run", hidden=64, layers=2, max_steps=200, batch_size=32,
                          learning_rate=1e-3, report_to="none")
    report = pearl.run(config)
    assert report["transferred_label_accuracy"] > 0.7, report
    assert report["pair_accuracy"] > 0.7 and report["spearman_trajectories"] > 0.5, report
    assert (config.output / "target_pairs.jsonl").is_file() and (config.output / "reward_model.json").is_file()
