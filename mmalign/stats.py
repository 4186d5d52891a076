"""Summaries for evaluations: a mean with its 95% confidence interval."""

from __future__ import annotations

import math

import torch

Z95 = 1.959963984540054


def mean_ci(values: torch.Tensor | list[float]) -> dict[str, float]:
    """Mean and normal-approximation 95% CI, mean +- 1.96 * std / sqrt(n), of a sample of values."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() < 2:
        raise ValueError(f"a confidence interval needs at least 2 values, got {x.numel()}")
    mean, half = x.mean().item(), Z95 * x.std(unbiased=True).item() / math.sqrt(x.numel())
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": int(x.numel())}
