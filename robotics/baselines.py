"""Label-free rules that label target segment pairs without a transfer: what PEARL's transferred labels must beat.

Each rule gives a label matrix Z [n, n] in the form of PEARL's transfer, Z[k, l] = P(segment k preferred to l):
1, 0, or 0.5 for a tie (which scores as a coin flip, `pearl.label_accuracy`).

- later segment: prefer the segment that starts later in its episode (progress in time; the segments' info.start).
- smoother actions: prefer the smaller mean squared action change, mean_t ||a_{t+1} - a_t||^2.
- nearest neighbour: target segment k takes the source segment nn(k) nearest to it in feature space (Euclidean, on
  the features PEARL's distances use); k is preferred to l when nn(k) won a larger share of its labelled source
  comparisons than nn(l), w_i = sum_j M_ij Z_s[i, j] / sum_j M_ij. Matching each segment alone instead of the
  relations among all of them (GW) is the one difference from PEARL.
- random plan: PEARL's transfer through a random coupling instead of the GW one (`random_plan`).

`same_window` picks the pairs whose segments start close together in time, where "later segment" can tell little.
"""

from __future__ import annotations

import numpy as np
import ot


def prefer(scores: np.ndarray) -> np.ndarray:
    """Z[k, l] = 1 if s_k > s_l, 0.5 if s_k = s_l, 0 if s_k < s_l, for per-segment scores s [n]."""
    scores = np.asarray(scores, dtype=np.float64)
    return 0.5 * (1.0 + np.sign(scores[:, None] - scores[None, :]))


def later_segment(starts: np.ndarray) -> np.ndarray:
    """Prefer the segment that starts later in its episode: prefer(start)."""
    return prefer(starts)


def action_roughness(actions: np.ndarray) -> np.ndarray:
    """mean_t ||a_{t+1} - a_t||^2 per segment [N] of actions [N, L, A] (0 for one-step segments)."""
    steps = np.diff(np.asarray(actions, dtype=np.float64), axis=1)
    return (steps**2).sum(-1).mean(-1) if steps.shape[1] else np.zeros(len(actions))


def smoother_actions(actions: np.ndarray) -> np.ndarray:
    """Prefer the segment with the smaller mean squared action change: prefer(-roughness)."""
    return prefer(-action_roughness(actions))


def win_rates(z_source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """w_i = sum_j M_ij Z_s[i, j] / sum_j M_ij: the share of its labelled comparisons source i won (0.5: none)."""
    counts = mask.sum(1)
    return np.divide((mask * z_source).sum(1), counts, out=np.full(len(counts), 0.5), where=counts > 0)


def nearest_neighbour(source_features: np.ndarray, target_features: np.ndarray, z_source: np.ndarray,
                      mask: np.ndarray) -> np.ndarray:
    """Prefer target k to l when its nearest source segment has the higher win rate: prefer(w[nn(k)])."""
    nearest = ot.dist(target_features, source_features, metric="sqeuclidean").argmin(1)
    return prefer(win_rates(z_source, mask)[nearest])


def random_plan(n_source: int, n_target: int, seed: int = 0) -> np.ndarray:
    """A random coupling [n_s, n_t] with uniform marginals: a uniform random matrix U scaled to them (Sinkhorn,
    plan = diag(a) U diag(b))."""
    u = np.random.default_rng(seed).uniform(1e-3, 1.0, size=(n_source, n_target))
    return ot.sinkhorn(ot.unif(n_source), ot.unif(n_target), -np.log(u), reg=1.0, stopThr=1e-12, numItermax=10000)


def same_window(starts: np.ndarray, width: int) -> np.ndarray:
    """Pairs [n, n] (bool) of segments that start at most `width` steps apart."""
    starts = np.asarray(starts, dtype=np.int64)
    return np.abs(starts[:, None] - starts[None, :]) <= width
