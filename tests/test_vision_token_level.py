"""Token-level objectives (TDPO2, RRPO) by hand, and through the trainer's step on a tiny LLaVA."""

import math

import pytest
import torch

from mmalign.reference import AdapterDisabled
from mmalign.vision import dpo, models, token_level
from mmalign.vision.data import VisionPairs, collate_pairs, write_rows
from mmalign.vision.scoring import token_log_probs
from mmalign.vision.tiny import tiny_llava
from mmalign.vision.world import preference_rows


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_token_kl_by_hand():
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.5, 0.25, 0.25])
    expected = sum(a * math.log(a / b) for a, b in zip(p.tolist(), q.tolist()))
    assert token_level.token_kl(p.log()[None, None], q.log()[None, None]).item() == pytest.approx(expected, rel=1e-6)


def test_differing_tokens_mark_the_aligned_differences_only():
    targets = torch.tensor([[0, 5, 6, 7, 2, 0], [0, 5, 9, 9, 7, 2]])  # chosen ' 5 6 7 </s>', rejected ' 5 9 9 7 </s>'
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    marks = token_level.differing_tokens(targets, mask, pairs=1)
    assert marks.tolist() == [[False, False, True, False, False, False], [False, False, True, True, False, False]]


def test_tdpo_and_rrpo_by_hand_and_tdpo_stops_the_chosen_kl_gradient():
    r_w, r_l, kl_w, kl_l, beta, alpha = 1.0, -0.5, 0.3, 0.8, 0.2, 0.5
    kl_w_t, kl_l_t = torch.tensor([kl_w], requires_grad=True), torch.tensor([kl_l], requires_grad=True)
    loss = token_level.tdpo_loss(torch.tensor([r_w]), torch.tensor([r_l]), kl_w_t, kl_l_t, beta, alpha)
    assert loss.item() == pytest.approx(-math.log(sig(beta * (r_w - r_l) - alpha * beta * (kl_l - kl_w))))
    loss.sum().backward()
    assert kl_w_t.grad is None and kl_l_t.grad.item() > 0  # sg on KL(y_w); a larger KL(y_l) costs
    loss = token_level.rrpo_loss(torch.tensor([0.4]), torch.tensor([-0.6]), torch.tensor([2.0]), 0.1, 0.01)
    assert loss.item() == pytest.approx(-math.log(sig(0.1 * 1.0)) + 0.01 * 2.0)


@pytest.mark.parametrize("objective", ["tdpo", "rrpo"])
def test_token_step_equals_a_hand_computation(objective, tmp_path):
    model, processor = tiny_llava(seed=0)
    model = models.add_lora(model, 4, None, models.LORA_TARGETS)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # a trained adapter: policy and reference differ
    rows = preference_rows(3, seed=0)
    rows[0]["chosen"] = " the red circle </s>"
    rows[0]["rejected"] = " the blue circle </s>"
    pairs = VisionPairs.load(write_rows(rows, tmp_path / "r.parquet"), processor)
    batch = collate_pairs([pairs[i] for i in range(3)], 0)
    config = dpo.Config(model="-", data="-", output=tmp_path / "run", token_objective=objective, beta=0.3)
    loss, metrics = dpo.token_step(model, batch, None, dpo.Parts(AdapterDisabled(), config, share_features=True))

    with torch.no_grad():
        logps, mask, dist = token_log_probs(model, batch)
        with model.disable_adapter():
            ref_logps, _, ref_dist = token_log_probs(model, batch)
    ratio = ((logps - ref_logps) * mask).sum(1)
    kl = (token_level.token_kl(ref_dist, dist) * mask).sum(1)
    expected = []
    for i in range(3):
        if objective == "tdpo":
            inside = 0.3 * (ratio[i] - ratio[3 + i]) - 0.5 * 0.3 * (kl[3 + i] - kl[i])
            expected.append(-math.log(sig(inside.item())))
        else:
            if i == 0:  # only 'red' vs 'blue' differ
                tokens = processor.tokenizer.convert_tokens_to_ids(["red", "blue"])
                target = batch["input_ids"][:, -mask.shape[1]:]
                d_w = ((logps - ref_logps)[0] * (target[0] == tokens[0])).sum()
                d_l = ((logps - ref_logps)[3] * (target[3] == tokens[1])).sum()
            else:  # one-word answers: the whole completions differ but their shared '</s>'
                eos = processor.tokenizer.eos_token_id
                target = batch["input_ids"][:, -mask.shape[1]:]
                d_w = ((logps - ref_logps)[i] * mask[i] * (target[i] != eos)).sum()
                d_l = ((logps - ref_logps)[3 + i] * mask[3 + i] * (target[3 + i] != eos)).sum()
            expected.append(-math.log(sig(0.3 * (d_w - d_l).item())) + 0.01 * kl[i].item())
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-4)
    assert metrics["kl_chosen"].item() == pytest.approx(kl[:3].mean().item(), rel=1e-4) and metrics["kl_chosen"] > 0


def test_token_objective_config_rules(tmp_path):
    with pytest.raises(ValueError, match="not --reference cached"):
        dpo.Config(model="-", data="-", output=tmp_path, token_objective="tdpo", reference="cached")
    assert dpo.Config(model="-", data="-", output=tmp_path, token_objective="rrpo").token_alpha == 0.01
