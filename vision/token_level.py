"""Token-level objectives on per-token log-ratios r_t = log pi_theta(y_t | .) - log pi_ref(y_t | .) of chosen (w) and
rejected (l) rows, with the token-wise KL_t = KL(pi_ref(. | y_<t) || pi_theta(. | y_<t)):

    tdpo   -log s(beta (r_w - r_l) - alpha beta (KL(y_l) - sg KL(y_w)))      TDPO2, Zeng et al. 2024 (alpha 0.5)
    rrpo   -log s(beta (sum_{t in D_w} r_w,t - sum_{t in D_l} r_l,t)) + alpha sum_{t in y_w} KL_t
                                                                         RRPO (alpha 0.01, beta 0.1)

r(y) = sum_t r_t, KL(y) = sum_t KL_t, sg = stop-gradient; D_w, D_l are the tokens of the sub-sequences in which the
aligned chosen and rejected completions differ (difflib's matching blocks left out).
"""

from __future__ import annotations

import difflib

import torch
import torch.nn.functional as F

from .data import CHOSEN, REJECTED


def token_kl(ref_log_dist: torch.Tensor, log_dist: torch.Tensor) -> torch.Tensor:
    """KL(pi_ref || pi_theta) at each position: sum_v p_ref(v) (log p_ref(v) - log p_theta(v)), [R, T, V] -> [R, T]."""
    return (ref_log_dist.exp() * (ref_log_dist - log_dist)).sum(-1)


def differing_tokens(targets: torch.Tensor, mask: torch.Tensor, pairs: int) -> torch.Tensor:
    """[R, T] marks of the completion tokens outside the longest matching blocks of each chosen row and its rejected
    row (difflib.SequenceMatcher over their token ids; row layout: `data.CHOSEN`); other rows are unmarked."""
    marks = torch.zeros_like(mask, dtype=torch.bool)
    for i in range(pairs):
        rows = (CHOSEN * pairs + i, REJECTED * pairs + i)
        positions = [mask[r].nonzero().flatten() for r in rows]
        tokens = [targets[r, p].tolist() for r, p in zip(rows, positions)]
        matcher = difflib.SequenceMatcher(a=tokens[0], b=tokens[1], autojunk=False)
        for tag, a0, a1, b0, b1 in matcher.get_opcodes():
            if tag != "equal":
                marks[rows[0], positions[0][a0:a1]] = True
                marks[rows[1], positions[1][b0:b1]] = True
    return marks


def tdpo_loss(ratio_w: torch.Tensor, ratio_l: torch.Tensor, kl_w: torch.Tensor, kl_l: torch.Tensor, beta: float,
              alpha: float) -> torch.Tensor:
    """TDPO2 per pair [B]: -log s(beta (r_w - r_l) - alpha beta (KL(y_l) - sg KL(y_w)))."""
    return -F.logsigmoid(beta * (ratio_w - ratio_l) - alpha * beta * (kl_l - kl_w.detach()))


def rrpo_loss(diff_ratio_w: torch.Tensor, diff_ratio_l: torch.Tensor, kl_w: torch.Tensor, beta: float,
              alpha: float) -> torch.Tensor:
    """RRPO per pair [B]: -log s(beta (sum_{D_w} r_w,t - sum_{D_l} r_l,t)) + alpha sum_{t in y_w} KL_t."""
    return -F.logsigmoid(beta * (diff_ratio_w - diff_ratio_l)) + alpha * kl_w
