"""Reward models: the RRL loss by hand, ensembles through the core Bradley-Terry loss, and learning on rollouts."""

import json
import math

import numpy as np
import pytest
import torch

from mmalign.objectives import bradley_terry_loss
from mmalign.robotics import label, reward
from mmalign.robotics.pairs import Pairs
from mmalign.robotics.reward_models import RewardArch, RewardModel, load_reward_model, pair_accuracy
from mmalign.robotics.rrl import rrl_loss, variance_kl
from mmalign.robotics.trajectories import Trajectories


def test_rrl_loss_by_hand():
    mean_w, log_std_w = torch.tensor([[0.5, 1.0]]), torch.tensor([[0.0, math.log(2.0)]])
    mean_l, log_std_l = torch.tensor([[0.2, -0.1]]), torch.tensor([[math.log(0.5), 0.0]])
    noise_w, noise_l = torch.tensor([[1.0, -0.5]]), torch.tensor([[2.0, 1.0]])
    # returns: w = (0.5 + 1*1) + (1.0 + 2*(-0.5)) = 1.5; l = (0.2 + 0.5*2) + (-0.1 + 1*1) = 2.1
    p, lam, s0 = 0.8, 0.3, 2.0
    ce = -(p * math.log(1 / (1 + math.exp(0.6))) + (1 - p) * math.log(1 / (1 + math.exp(-0.6))))

    def kl(sigma):  # KL(N(m, sigma^2) || N(m, s0^2))
        return math.log(s0 / sigma) + sigma**2 / (2 * s0**2) - 0.5
    reg = 0.5 * ((kl(1.0) + kl(2.0)) / 2 + (kl(0.5) + kl(1.0)) / 2)
    loss = rrl_loss(mean_w, log_std_w, mean_l, log_std_l, noise_w, noise_l, torch.tensor([p]), prior_std=s0, weight=lam)
    assert loss.item() == pytest.approx(ce + lam * reg, rel=1e-6)
    assert variance_kl(torch.tensor(math.log(s0)), s0).item() == pytest.approx(0.0, abs=1e-7)


def test_rrl_without_variance_is_bradley_terry():
    mean_w, mean_l = torch.randn(3, 5), torch.randn(3, 5)
    very_small = torch.full((3, 5), -20.0)
    label = torch.tensor([1.0, 0.5, 0.2])
    loss = rrl_loss(mean_w, very_small, mean_l, very_small, torch.randn(3, 5), torch.randn(3, 5), label, weight=0.0)
    torch.testing.assert_close(loss, bradley_terry_loss(mean_w.sum(-1), mean_l.sum(-1), label))


def test_ensemble_step_averages_the_core_loss_over_members():
    torch.manual_seed(0)
    model = RewardModel(RewardArch(3, 2, hidden=8, layers=1, members=3))
    batch = {"obs_w": torch.randn(4, 6, 3), "act_w": torch.randn(4, 6, 2), "obs_l": torch.randn(4, 6, 3),
             "act_l": torch.randn(4, 6, 2), "label": torch.tensor([1.0, 1.0, 0.5, 0.7])}
    config = reward.RewardConfig(output="unused")
    loss, metrics = reward.reward_step(model, batch, torch.Generator(), config)
    expected = torch.stack([bradley_terry_loss(m(torch.cat([batch["obs_w"], batch["act_w"]], -1)).squeeze(-1).sum(-1),
                                                m(torch.cat([batch["obs_l"], batch["act_l"]], -1)).squeeze(-1).sum(-1),
                                                batch["label"]) for m in model.members]).mean()
    torch.testing.assert_close(loss, expected)
    assert 0 <= metrics["pair_acc"] <= 1


def test_pair_accuracy_ignores_equal_labels():
    pairs = Pairs("push-v3", np.array([0, 1, 2]), np.array([1, 2, 0]), np.array([1.0, 0.5, 1.0]))
    assert pair_accuracy(np.array([3.0, 1.0, 2.0]), pairs) == 0.5


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ensemble", "rrl"])
def test_reward_model_learns_the_true_return(button_press, tmp_path, kind):
    labelled = tmp_path / "labels"
    label.run(label.Config(data=str(button_press / "train.npz"), output=labelled, teacher="noisy",
                           segment_length=20, segments=400, pairs=600))
    extra = {"members": 3} if kind == "ensemble" else {"gaussian": True}
    config = reward.Config(data=str(labelled), eval_data=str(button_press / "eval.npz"), output=tmp_path / "run",
                           hidden=64, layers=2, max_steps=250, batch_size=32, learning_rate=1e-3, eval_pairs=500,
                           report_to="none", **extra)
    torch.manual_seed(config.seed)  # the initialisation training starts from
    untrained = RewardModel(RewardArch(39, 4, hidden=64, layers=2, **extra))
    before, _, _ = reward.evaluate(untrained, Trajectories.load(config.eval_data), 20, 500, seed=config.seed + 1)
    report = reward.run(config)
    assert report["pair_accuracy"] > 0.8 and report["pair_accuracy"] > before["pair_accuracy"] + 0.15, (before, report)
    assert report["spearman_segments"] > 0.75 and report["spearman_trajectories"] > 0.75, report
    assert json.loads((config.output / "eval.json").read_text()) == report
    assert (config.output / "reward_vs_return.png").is_file() and (config.output / "metrics.jsonl").is_file()
    reloaded = load_reward_model(config.output)
    segments = Trajectories.load(button_press / "eval.npz")
    np.testing.assert_allclose(reloaded.returns(segments), load_reward_model(config.output).returns(segments))
    if kind == "rrl":
        sigma = [json.loads(line)["sigma"] for line in (config.output / "metrics.jsonl").read_text().splitlines()]
        assert 0.05 < sigma[-1] < 5, "the variance regulariser keeps sigma away from 0"
