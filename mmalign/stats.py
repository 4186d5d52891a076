"""Summaries for evaluations: a mean with its 95% confidence interval, a paired win rate with its bootstrap CI."""

from __future__ import annotations

import math

import numpy as np
import torch

Z95 = 1.959963984540054


def mean_ci(values: torch.Tensor | list[float]) -> dict[str, float]:
    """Mean and normal-approximation 95% CI, mean +- 1.96 * std / sqrt(n), of a sample of values."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() < 2:
        raise ValueError(f"a confidence interval needs at least 2 values, got {x.numel()}")
    mean, half = x.mean().item(), Z95 * x.std(unbiased=True).item() / math.sqrt(x.numel())
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": int(x.numel())}


def comparison_lines(base: dict, aligned: dict, gain: dict) -> list[str]:
    """Base and aligned means with their 95% CIs, and the paired gain: 'aligned is better' when its CI is above 0."""
    def line(name: str, s: dict) -> str:
        return f"  {name:<8} {s['mean']:.3f}  (95% CI {s['ci_low']:.3f} .. {s['ci_high']:.3f})"

    verdict = "aligned is better" if gain["ci_low"] > 0 else "no clear improvement"
    return [line("base", base), line("aligned", aligned),
            f"  gain     {gain['mean']:+.3f}  (95% CI {gain['ci_low']:+.3f} .. {gain['ci_high']:+.3f}): {verdict}"]


def expected_calibration_error(probs: torch.Tensor | list[float], outcomes: torch.Tensor | list[float],
                               bins: int = 10) -> float:
    """ECE = sum_b (n_b / n) * |mean(p in b) - mean(y in b)| over `bins` equal-width bins of predicted P(event) p.

    outcomes y are 1 (the event happened), 0, or a soft frequency such as 0.5 for a tie.
    """
    p = torch.as_tensor(probs, dtype=torch.float64).flatten()
    y = torch.as_tensor(outcomes, dtype=torch.float64).flatten()
    if p.shape != y.shape or p.numel() == 0:
        raise ValueError(f"need as many outcomes as probabilities (at least one); got {p.numel()} and {y.numel()}")
    if bool(((p < 0) | (p > 1)).any()) or bool(((y < 0) | (y > 1)).any()):
        raise ValueError("probabilities and outcomes must lie in [0, 1]")
    which = (p * bins).long().clamp_max(bins - 1)
    gap = torch.bincount(which, weights=p, minlength=bins) - torch.bincount(which, weights=y, minlength=bins)
    return float(gap.abs().sum() / p.numel())


def win_rate(first: torch.Tensor | list[float], second: torch.Tensor | list[float], resamples: int = 10000,
             seed: int = 0) -> dict[str, float]:
    """Paired win rate mean_i(1[a_i > b_i] + 0.5 * 1[a_i = b_i]) (ties count half) with a 95% percentile bootstrap CI
    that resamples the pairs i (scipy.stats.bootstrap, `resamples` draws from the fixed `seed`)."""
    from scipy.stats import bootstrap

    a = torch.as_tensor(first, dtype=torch.float64).flatten()
    b = torch.as_tensor(second, dtype=torch.float64).flatten()
    if a.shape != b.shape or a.numel() < 2:
        raise ValueError(f"a paired win rate needs two equal-length samples of at least 2; got {a.numel()} and "
                         f"{b.numel()}")
    wins = ((a > b).double() + 0.5 * (a == b).double()).numpy()
    rate = float(wins.mean())
    if (wins == wins[0]).all():  # every resample has the same mean: the interval is that point
        return {"win_rate": rate, "ci_low": rate, "ci_high": rate, "n": int(a.numel())}
    ci = bootstrap((wins,), np.mean, n_resamples=resamples, method="percentile", random_state=seed).confidence_interval
    return {"win_rate": rate, "ci_low": float(ci.low), "ci_high": float(ci.high), "n": int(a.numel())}
