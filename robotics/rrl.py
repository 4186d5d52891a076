"""PEARL's Robust Reward Learning (Liu et al., ICML 2024): a Gaussian reward, reparameterised, variance regularised.

Each step's reward is r_t ~ N(mu_t, sigma_t^2), drawn as r_t = mu_t + sigma_t * eps_t (eps ~ N(0, 1)), so
a segment's return R = sum_t r_t carries the model's uncertainty into the Bradley-Terry cross-entropy
on the (soft) label p = P(w preferred):

    loss = -(p log s(R_w - R_l) + (1-p) log s(R_l - R_w)) + lam * mean_t KL(N(mu_t, sigma_t^2) || N(mu_t, sigma0^2))
    KL   = log(sigma0 / sigma_t) + sigma_t^2 / (2 sigma0^2) - 1/2

The paper does not publish its regulariser's form or weight; this one pulls only the variance toward
a prior sigma0 (leaving mu to the preferences), which keeps sigma from collapsing to 0, where RRL
would reduce to plain Bradley-Terry. Defaults here: sigma0 = 1, lam = 0.1 (chosen on button-press
transfer, see BENCHMARKS.md). The cross-entropy is the core `bradley_terry_loss`.
"""

from __future__ import annotations

import math

import torch

from mmalign.objectives import bradley_terry_loss


def variance_kl(log_std: torch.Tensor, prior_std: float) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(mu, sigma0^2)) = log(sigma0/sigma) + sigma^2/(2 sigma0^2) - 1/2, elementwise."""
    return math.log(prior_std) - log_std + torch.exp(2 * log_std) / (2 * prior_std**2) - 0.5


def rrl_loss(mean_w: torch.Tensor, log_std_w: torch.Tensor, mean_l: torch.Tensor, log_std_l: torch.Tensor,
             noise_w: torch.Tensor, noise_l: torch.Tensor, label: torch.Tensor, prior_std: float = 1.0,
             weight: float = 0.1) -> torch.Tensor:
    """RRL loss [..., B] from per-step Gaussian rewards [..., B, L] and standard-normal noise of the same shape."""
    if prior_std <= 0 or weight < 0:
        raise ValueError(f"RRL needs prior_std > 0 and weight >= 0, got {prior_std} and {weight}")
    return_w = (mean_w + log_std_w.exp() * noise_w).sum(-1)
    return_l = (mean_l + log_std_l.exp() * noise_l).sum(-1)
    regulariser = 0.5 * (variance_kl(log_std_w, prior_std).mean(-1) + variance_kl(log_std_l, prior_std).mean(-1))
    return bradley_terry_loss(return_w, return_l, label) + weight * regulariser
