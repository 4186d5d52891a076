"""Preference objectives: pure functions of per-example log-ratios r = s_policy - s_ref (or rewards).

Every modality reduces its samples to scores, then calls one of these. Pairwise kinds follow TRL's
`DPOTrainer._compute_loss` (TRL 1.16) term for term, so a loss here equals TRL's on the same
log-ratios. With delta = r_w - r_l:

    sigmoid       -log s(b*delta)                                        DPO, Rafailov et al. 2023
    ipo           (delta - 1/(2b))^2  (pass length-normalised r)         IPO, Azar et al. 2023
    hinge         relu(1 - b*delta)                                      SLiC, Zhao et al. 2023
    robust        (-(1-e) log s(b*delta) + e log s(-b*delta)) / (1-2e)   rDPO, Chowdhury et al. 2024
    conservative  -(1-e) log s(b*delta) - e log s(-b*delta)              cDPO, Mitchell 2023
    nca_pair      -log s(b*r_w) - log s(-b*r_w)/2 - log s(-b*r_l)/2      NCA, Chen et al. 2024
    bco_pair      -log s(b*r_w - d) - log s(-(b*r_l - d))                BCO, Jung et al. 2024
    exo_pair      KL(softmax(b*[r_w, r_l]) || [1-e, e])                  EXO, Ji et al. 2024
    sppo_hard     (r_w - 1/(2b))^2 + (r_l + 1/(2b))^2                    SPPO, Wu et al. 2024
    apo_zero      (1 - s(b*r_w)) + s(b*r_l)                              APO, D'Oosterlinck et al. 2024
    apo_down      s(b*r_w) + (1 - s(b*delta))                            APO

(s is the logistic function, b = beta, e = label_smoothing, d = bco_delta, TRL uses d = 0.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

PAIRWISE_KINDS = ("sigmoid", "ipo", "hinge", "robust", "conservative", "nca_pair", "bco_pair", "exo_pair",
                  "sppo_hard", "apo_zero", "apo_down")
_SMOOTHED = ("robust", "conservative", "exo_pair")


def preference_loss(chosen_logratio: Tensor, rejected_logratio: Tensor, *, kind: str = "sigmoid",
                    beta: float = 0.1, label_smoothing: float = 0.0, bco_delta: float = 0.0) -> Tensor:
    """Per-example pairwise preference loss [B] of the given kind (see the module docstring for each formula)."""
    if kind not in PAIRWISE_KINDS:
        raise ValueError(f"unknown preference loss kind {kind!r}; choose one of {', '.join(PAIRWISE_KINDS)}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if label_smoothing and kind not in _SMOOTHED:
        raise ValueError(f"label_smoothing applies to {', '.join(_SMOOTHED)}, not to {kind!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if kind == "exo_pair" and label_smoothing == 0.0:
        raise ValueError("exo_pair needs label_smoothing > 0 (its target distribution is [1-e, e]; TRL uses 1e-3)")
    if chosen_logratio.shape != rejected_logratio.shape:
        raise ValueError(f"chosen and rejected log-ratios differ in shape: {tuple(chosen_logratio.shape)} "
                         f"vs {tuple(rejected_logratio.shape)}")

    eps = label_smoothing
    logits = beta * (chosen_logratio - rejected_logratio)
    chosen_reward, rejected_reward = beta * chosen_logratio, beta * rejected_logratio
    if kind == "sigmoid":
        return -F.logsigmoid(logits)
    if kind == "ipo":
        return (chosen_logratio - rejected_logratio - 1 / (2 * beta)) ** 2
    if kind == "hinge":
        return torch.relu(1 - logits)
    if kind == "robust":
        return (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    if kind == "conservative":
        return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    if kind == "nca_pair":
        return -F.logsigmoid(chosen_reward) - 0.5 * F.logsigmoid(-chosen_reward) - 0.5 * F.logsigmoid(-rejected_reward)
    if kind == "bco_pair":
        return -F.logsigmoid(chosen_reward - bco_delta) - F.logsigmoid(-(rejected_reward - bco_delta))
    if kind == "exo_pair":
        q_w, q_l = torch.sigmoid(logits), torch.sigmoid(-logits)
        return (q_w * (F.logsigmoid(logits) - math.log1p(-eps))
                + q_l * (F.logsigmoid(-logits) - math.log(eps)))
    if kind == "sppo_hard":
        return (chosen_logratio - 0.5 / beta) ** 2 + (rejected_logratio + 0.5 / beta) ** 2
    if kind == "apo_zero":
        return (1 - torch.sigmoid(chosen_reward)) + torch.sigmoid(rejected_reward)
    return torch.sigmoid(chosen_reward) + (1 - torch.sigmoid(logits))  # apo_down


def preference_metrics(chosen_logratio: Tensor, rejected_logratio: Tensor, beta: float) -> dict[str, Tensor]:
    """The implicit-reward metrics of a batch of pairs (detached means), as TRL logs them, with rewards b*r:

    implicit_acc = mean(1[b*delta > 0] + 1/2 1[b*delta = 0]) (a tie is a coin flip), reward_margin = mean(b*delta),
    chosen_reward = mean(b*r_w), rejected_reward = mean(b*r_l)."""
    chosen, rejected = beta * chosen_logratio.detach(), beta * rejected_logratio.detach()
    margin = chosen - rejected
    return {"implicit_acc": ((margin > 0).float() + 0.5 * (margin == 0).float()).mean(),
            "reward_margin": margin.mean(), "chosen_reward": chosen.mean(), "rejected_reward": rejected.mean()}


def bradley_terry_loss(reward_chosen: Tensor, reward_rejected: Tensor, soft_label: Tensor | None = None) -> Tensor:
    """-log s(R_w - R_l), or with P(w preferred) = p: -(p log s(R_w - R_l) + (1-p) log s(R_l - R_w)); shape [B]."""
    margin = reward_chosen - reward_rejected
    if soft_label is None:
        return -F.logsigmoid(margin)
    p = torch.as_tensor(soft_label, dtype=margin.dtype, device=margin.device)
    if bool(((p < 0) | (p > 1)).any()):
        raise ValueError("soft_label must lie in [0, 1]")
    return -(p * F.logsigmoid(margin) + (1 - p) * F.logsigmoid(-margin))


def lipo_lambda_loss(scores: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """LiPO-lambda [B]: -sum_{psi_i > psi_j} D_ij log s(s_i - s_j), D_ij = |G_i - G_j| |1/D(tau_i) - 1/D(tau_j)|.

    G = 2^psi - 1, D(tau) = log(1 + tau), tau the 1-based rank of s_i within its list (descending),
    Liu et al. 2024. scores, labels [B, K]; mask [B, K] marks real entries of padded lists.
    """
    if scores.shape != labels.shape or scores.dim() != 2:
        raise ValueError(f"scores and labels must both be [B, K]; got {tuple(scores.shape)} and {tuple(labels.shape)}")
    mask = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()
    with torch.no_grad():
        order_scores = scores.detach().masked_fill(~mask, float("-inf"))
        rank = order_scores.argsort(dim=1, descending=True).argsort(dim=1).to(scores.dtype) + 1
        gain = 2.0 ** labels.to(scores.dtype) - 1
        inv_discount = 1.0 / torch.log1p(rank)
        weight = ((gain[:, :, None] - gain[:, None, :]).abs()
                  * (inv_discount[:, :, None] - inv_discount[:, None, :]).abs())
        valid = (labels[:, :, None] > labels[:, None, :]) & mask[:, :, None] & mask[:, None, :]
    pair_loss = -F.logsigmoid(scores[:, :, None] - scores[:, None, :])
    return (weight * pair_loss).masked_fill(~valid, 0.0).sum(dim=(1, 2))
