"""Core objectives against TRL's DPOTrainer (the real `_compute_loss`) and against hand computations."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mmalign.objectives import PAIRWISE_KINDS, bradley_terry_loss, lipo_lambda_loss, preference_loss

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")


def trl_loss(kind, chosen_logps, rejected_logps, ref_chosen, ref_rejected, beta, label_smoothing, length):
    """Mean loss from TRL 1.16 `DPOTrainer._compute_loss`, fed precomputed log-probs through a stand-in model."""
    batch = chosen_logps.shape[0]
    per_token = torch.cat([chosen_logps, rejected_logps])[:, None].repeat(1, length) / length
    outputs = SimpleNamespace(
        log_probs=per_token, entropy=torch.zeros_like(per_token), mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(per_token, dtype=torch.bool))
    model = SimpleNamespace(training=True)
    trainer = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[kind], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {
        "input_ids": torch.zeros(2 * batch, length + 1, dtype=torch.long),
        "attention_mask": torch.ones(2 * batch, length + 1, dtype=torch.long),
        "completion_mask": F.pad(torch.ones(2 * batch, length, dtype=torch.long), (1, 0)),  # one prompt token
        "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected,
    }
    return trl_dpo.DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)


@pytest.mark.parametrize("kind", [k for k in PAIRWISE_KINDS if k != "conservative"])
def test_pairwise_kinds_equal_trl(kind):
    torch.manual_seed(0)
    length, beta = 5, 0.3
    smoothing = {"robust": 0.2, "exo_pair": 1e-3}.get(kind, 0.0)
    for _ in range(6):
        logps = torch.randn(4, 1) * 3
        chosen, rejected, ref_chosen, ref_rejected = logps
        expected = trl_loss(kind, chosen, rejected, ref_chosen, ref_rejected, beta, smoothing, length)
        chosen_lr, rejected_lr = chosen - ref_chosen, rejected - ref_rejected
        if kind == "ipo":
            chosen_lr, rejected_lr = chosen_lr / length, rejected_lr / length
        ours = preference_loss(chosen_lr, rejected_lr, kind=kind, beta=beta, label_smoothing=smoothing)
        assert ours.shape == (1,)
        torch.testing.assert_close(ours.mean(), expected, rtol=1e-5, atol=1e-6)


def test_conservative_is_smoothed_sigmoid_by_hand():
    delta, beta, eps = torch.tensor([0.7, -1.2]), 0.5, 0.1
    expected = [-(1 - eps) * math.log(1 / (1 + math.exp(-beta * d))) - eps * math.log(1 / (1 + math.exp(beta * d)))
                for d in delta.tolist()]
    ours = preference_loss(delta, torch.zeros(2), kind="conservative", beta=beta, label_smoothing=eps)
    torch.testing.assert_close(ours, torch.tensor(expected))
    torch.testing.assert_close(preference_loss(delta, torch.zeros(2), kind="conservative", beta=beta),
                               preference_loss(delta, torch.zeros(2), kind="sigmoid", beta=beta))


def test_sigmoid_is_ln2_at_equal_logratios():
    torch.testing.assert_close(preference_loss(torch.zeros(3), torch.zeros(3)), torch.full((3,), math.log(2)))


def test_bad_arguments_are_named():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge"):
        preference_loss(x, x, kind="dpo")
    with pytest.raises(ValueError, match="label_smoothing applies"):
        preference_loss(x, x, kind="sigmoid", label_smoothing=0.1)
    with pytest.raises(ValueError, match="exo_pair needs"):
        preference_loss(x, x, kind="exo_pair")
    with pytest.raises(ValueError, match="differ in shape"):
        preference_loss(x, torch.zeros(3))


def test_bradley_terry_hard_and_soft():
    rw, rl = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0])
    torch.testing.assert_close(bradley_terry_loss(rw, rl), -F.logsigmoid(rw - rl))
    p = torch.tensor([1.0, 0.5])
    soft = bradley_terry_loss(rw, rl, p)
    torch.testing.assert_close(soft[0], -F.logsigmoid(rw - rl)[0])
    by_hand = -(0.5 * math.log(1 / (1 + math.exp(2.0))) + 0.5 * math.log(1 / (1 + math.exp(-2.0))))
    assert soft[1].item() == pytest.approx(by_hand)
    with pytest.raises(ValueError, match="soft_label"):
        bradley_terry_loss(rw, rl, torch.tensor([1.5, 0.0]))


def test_lipo_lambda_by_hand():
    scores = torch.tensor([[0.2, 1.0, -0.5]])
    labels = torch.tensor([[2.0, 1.0, 0.0]])
    # ranks by score (descending): item0 -> 2, item1 -> 1, item2 -> 3
    rank = {0: 2, 1: 1, 2: 3}
    gain = {i: 2 ** labels[0, i].item() - 1 for i in range(3)}
    expected = 0.0
    for i, j in [(0, 1), (0, 2), (1, 2)]:  # psi_i > psi_j
        delta = abs(gain[i] - gain[j]) * abs(1 / math.log(1 + rank[i]) - 1 / math.log(1 + rank[j]))
        expected += -delta * math.log(1 / (1 + math.exp(-(scores[0, i] - scores[0, j]).item())))
    assert lipo_lambda_loss(scores, labels).item() == pytest.approx(expected, rel=1e-5)


def test_lipo_lambda_mask_ignores_padding_and_gradient_pushes_order():
    scores = torch.tensor([[0.0, 0.5, 9.0]], requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, 5.0]])
    mask = torch.tensor([[True, True, False]])
    loss = lipo_lambda_loss(scores, labels, mask)
    unpadded = lipo_lambda_loss(scores[:, :2].detach(), labels[:, :2])
    torch.testing.assert_close(loss.detach(), unpadded)
    loss.sum().backward()
    assert scores.grad[0, 0] < 0 < scores.grad[0, 1] and scores.grad[0, 2] == 0


def test_preference_metrics_by_hand():
    from mmalign.objectives import preference_metrics

    chosen, rejected = torch.tensor([0.3, 0.1, -0.2]), torch.tensor([0.1, 0.1, 0.4])
    got = preference_metrics(chosen, rejected, beta=2.0)
    assert got["implicit_acc"].item() == pytest.approx((1 + 0.5 + 0) / 3)  # the tie counts 1/2
    assert got["reward_margin"].item() == pytest.approx(2 * (0.2 + 0.0 - 0.6) / 3)
    assert got["chosen_reward"].item() == pytest.approx(2 * 0.2 / 3)
    assert got["rejected_reward"].item() == pytest.approx(2 * 0.6 / 3)
