"""Query selection of B-Pref (Lee et al. 2021): which candidate segment pairs the teacher is asked to label.

For M candidate pairs (a_i, b_i), each of the K members of a reward ensemble gives a preference probability

    P_k(b_i > a_i) = sigmoid(R_k(b_i) - R_k(a_i)),   R_k a segment's predicted return under member k,

and a selection keeps `num` of the candidates:

    uniform       a uniform random choice (without replacement)
    disagreement  the largest std over members of P_k                      (B-Pref `disagreement_sampling`)
    entropy       the largest H(p) = -p log p - (1 - p) log(1 - p), p the members' mean P_k

B-Pref's `entropy_sampling` averages the members' own entropies instead of taking the entropy of their
mean; with one member the two agree, and the entropy of the mean is the predictive uncertainty proper.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

SELECTIONS = ("uniform", "disagreement", "entropy")


def preference_probabilities(returns_a: np.ndarray, returns_b: np.ndarray) -> np.ndarray:
    """P_k(b > a) = sigmoid(R_k(b) - R_k(a)) [K, M] from the members' predicted returns [K, M]."""
    return expit(np.asarray(returns_b, dtype=np.float64) - np.asarray(returns_a, dtype=np.float64))


def uniform(candidates: int, num: int, rng: np.random.Generator) -> np.ndarray:
    """`num` distinct candidate indices drawn uniformly."""
    return rng.choice(candidates, size=num, replace=False)


def disagreement(probabilities: np.ndarray, num: int) -> np.ndarray:
    """The `num` candidates whose member probabilities [K, M] have the largest std over members (ties: lower index)."""
    return np.argsort(-probabilities.std(axis=0), kind="stable")[:num]


def entropy(probabilities: np.ndarray, num: int) -> np.ndarray:
    """The `num` candidates of largest H(p), p the members' mean probability (ties: lower index)."""
    p = np.clip(probabilities.mean(axis=0), 1e-12, 1 - 1e-12)
    return np.argsort(p * np.log(p) + (1 - p) * np.log(1 - p), kind="stable")[:num]


RANKED = {"disagreement": disagreement, "entropy": entropy}  # the selections that rank by the reward ensemble
