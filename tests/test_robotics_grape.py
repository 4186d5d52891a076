"""GRAPE: the TPO loss against the core sigmoid, the ranking score and stage costs by hand, and TPO on rollouts."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmalign.errors import DataError, RunFolderError
from mmalign.reference import FrozenCopy
from mmalign.robotics import grape
from mmalign.robotics.policies import GaussianPolicy, PolicyArch, load_policy
from mmalign.robotics.stages import external_reward, stage_costs, stages


def test_tpo_loss_is_the_core_sigmoid_on_summed_log_ratios():
    g = torch.Generator().manual_seed(0)
    pw, rw, pl, rl = (torch.randn(3, 8, generator=g) for _ in range(4))
    expected = -F.logsigmoid(0.1 * ((pw - rw).sum(-1) - (pl - rl).sum(-1)))
    torch.testing.assert_close(grape.tpo_loss(pw, rw, pl, rl, beta=0.1), expected)


def test_tpo_step_scores_the_same_random_window_of_both_trajectories():
    torch.manual_seed(0)
    policy = GaussianPolicy(PolicyArch(5, 2, hidden=8, layers=1))
    reference = FrozenCopy(policy)
    with torch.no_grad():
        policy.mean[0].weight.add_(0.3)  # the policy now differs from its reference
    batch = {"obs_w": torch.randn(4, 20, 5), "act_w": torch.randn(4, 20, 2), "obs_l": torch.randn(4, 20, 5),
             "act_l": torch.randn(4, 20, 2)}
    loss, metrics = grape.tpo_step(policy, batch, torch.Generator().manual_seed(3), reference, beta=0.5, window=6)
    start = torch.randint(0, 15, (4, 1), generator=torch.Generator().manual_seed(3))
    expected = []
    for i in range(4):
        window = slice(int(start[i]), int(start[i]) + 6)
        steps = {side: (batch[f"obs_{side}"][i, window], batch[f"act_{side}"][i, window]) for side in "wl"}
        log_ratio = {side: (policy.log_prob(*steps[side]) - reference.model.log_prob(*steps[side])).sum()
                     for side in "wl"}
        expected.append(-F.logsigmoid(0.5 * (log_ratio["w"] - log_ratio["l"])))
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    whole, _ = grape.tpo_step(policy, batch, torch.Generator(), reference, beta=0.5, window=0)
    log_ratios = [(policy.log_prob(batch[f"obs_{s}"], batch[f"act_{s}"])
                   - reference.model.log_prob(batch[f"obs_{s}"], batch[f"act_{s}"])).sum(-1) for s in "wl"]
    torch.testing.assert_close(whole, (-F.logsigmoid(0.5 * (log_ratios[0] - log_ratios[1]))).mean())


def test_a_saved_policy_loads_and_one_of_other_sizes_is_refused(tmp_path):
    policy = GaussianPolicy(PolicyArch(39, 4, hidden=8, layers=1))
    policy.save(tmp_path / "meta-world")
    loaded = load_policy(tmp_path / "meta-world")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in policy.state_dict().items())
    GaussianPolicy(PolicyArch(5, 2, hidden=8, layers=1)).save(tmp_path / "other")
    with pytest.raises(DataError, match="a policy of 5 observation and 2 action features; Meta-World's have 39 and 4"):
        load_policy(tmp_path / "other")


def test_gaussian_log_prob_by_hand():
    policy = GaussianPolicy(PolicyArch(3, 2, hidden=4, layers=1, init_log_std=math.log(0.5)))
    obs, act = torch.randn(3), torch.tensor([0.2, -0.4])
    mean = policy.mean(obs).detach()
    by_hand = sum(-((a - m) ** 2) / (2 * 0.25) - math.log(0.5) - 0.5 * math.log(2 * math.pi)
                  for a, m in zip(act.tolist(), mean.tolist()))
    assert policy.log_prob(obs, act).item() == pytest.approx(by_hand, rel=1e-5)


def test_grape_score_and_pairs_by_hand():
    log_probs = np.array([[-1.0, -5.0], [-0.5, -0.5], [-10.0, -10.0]])
    success = np.array([True, False, False])
    r_ext = np.array([0.5, 0.9, 0.2])
    floor = math.log(0.05)
    expected = [0.01 * (-1 + floor) + 0.5 + 5, 0.01 * -1.0 + 0.9, 0.01 * 2 * floor + 0.2]
    np.testing.assert_allclose(grape.grape_score(log_probs, success, r_ext), expected)
    scores = np.array([1.0, 3.0, 2.0, 0.5, 0.5, 4.0, 4.0, 1.0])
    groups = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    chosen, rejected = grape.best_and_worst(scores, groups)
    assert chosen.tolist() == [1, 5] and rejected.tolist() == [0, 7], "group 1 ties and gives no pair"


def test_stage_costs_by_hand():
    obs = np.zeros((1, 3, 39))
    obs[0, :, 0:3] = [[0, 0, 0], [0.03, 0.04, 0], [0.03, 0.04, 0.12]]  # hand: moves 5 cm, then 12 cm
    obs[0, :, 4:7] = [0.03, 0.04, 0.0]  # object, reached at t=1
    obs[0, :, 36:39] = [0.03, 0.14, 0.0]  # goal 10 cm from the object
    costs = stage_costs("push-v3", obs)
    assert costs["reach"][0] == pytest.approx(0.0) and costs["place"][0] == pytest.approx(10.0)
    assert costs["path"][0] == pytest.approx(17.0)
    # push-v3: reach tau 4, place tau 5 (beta 0.1), path tau 150 (beta 0.01): R_ext = exp(-0.1 * (10 - 5))
    assert external_reward("push-v3", obs)[0] == pytest.approx(math.exp(-0.5))
    with pytest.raises(ValueError, match="no GRAPE stage constraints are written for assembly-v3"):
        stages("assembly-v3")
    with pytest.raises(ValueError, match="unknown Meta-World task"):
        grape.Config(task="drawer-opne-v3", output="x")


@pytest.mark.slow
def test_grape_rounds_raise_the_policy_likelihood_of_the_chosen_trajectories(tmp_path):
    config = grape.Config(task="reach-v3", output=tmp_path / "run", demo_episodes=4, bc_steps=150, bc_batch_size=64,
                          hidden=32, layers=1, max_episode_steps=40, rounds=1, states=8, samples_per_state=4,
                          max_steps=40, batch_size=8, learning_rate=1e-3, eval_episodes=4, num_envs=4, report_to="none")
    report = grape.run(config)
    assert [c["step"] for c in report["curve"]] == [0, 1] and report["rounds"][0]["pairs"] > 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "round-1" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-3), "policy == reference at the first step"
    late = metrics[-10:]
    assert np.mean([m["loss"] for m in late]) < math.log(2) - 0.05
    assert np.mean([m["reward_margin"] for m in late]) > 0 and np.mean([m["implicit_acc"] for m in late]) > 0.7
    assert (tmp_path / "run" / "success.png").is_file() and (tmp_path / "run" / "policy.safetensors").is_file()


@pytest.mark.slow
def test_resume_latest_takes_every_finished_stage_from_its_checkpoint(tmp_path):
    config = grape.Config(task="reach-v3", output=tmp_path / "run", demo_episodes=2, bc_steps=3, bc_batch_size=8,
                          hidden=8, layers=1, max_episode_steps=10, rounds=1, states=2, samples_per_state=2,
                          max_steps=2, batch_size=2, eval_episodes=2, num_envs=2, report_to="none")
    first = grape.run(config)
    files = ("policy.safetensors", "bc/metrics.jsonl", "round-1/metrics.jsonl")
    before = {name: (config.output / name).read_bytes() for name in files}
    demos = (config.output / "demos.npz").stat().st_mtime_ns
    with pytest.raises(RunFolderError, match="is not empty"):
        grape.run(config)
    again = grape.run(dataclasses.replace(config, resume="latest"))
    assert again == first and {name: (config.output / name).read_bytes() for name in files} == before, \
        "the same policy after every stage: rollouts replayed, each stage resumed from its last checkpoint"
    assert (config.output / "demos.npz").stat().st_mtime_ns == demos, "the demonstrations are not collected again"


def test_round_decision_rolls_back_a_fall_beyond_the_ci_and_accepts_one_within_it():
    before = {"sampled": np.array([1, 1, 1, 1, 0, 0, 0, 0]), "mean_action": np.array([1, 1, 0, 0, 1, 1, 0, 0])}
    collapsed = {"sampled": np.zeros(8, dtype=int), "mean_action": before["mean_action"]}
    decision = grape.round_decision(before, collapsed)
    # d = (-1, -1, -1, -1, 0, 0, 0, 0): mean -0.5, std sqrt(2/7), CI high -0.5 + 1.96 * sqrt(2/7) / sqrt(8) < 0
    half = 1.959964 * math.sqrt(2 / 7) / math.sqrt(8)
    assert decision["change"]["sampled"]["ci_high"] == pytest.approx(-0.5 + half, rel=1e-5)
    assert not decision["accepted"] and decision["fell"] == ["sampled"]
    # one episode lost of eight: d = (-1, 0, ..., 0), mean -1/8, std sqrt(1/8), CI high -0.125 + 0.245 > 0
    slipped = {"sampled": np.array([0, 1, 1, 1, 0, 0, 0, 0]), "mean_action": np.array([1, 1, 1, 0, 1, 1, 0, 0])}
    decision = grape.round_decision(before, slipped)
    half = 1.959964 * math.sqrt(1 / 8) / math.sqrt(8)
    assert decision["change"]["sampled"]["ci_high"] == pytest.approx(-0.125 + half, rel=1e-5)
    assert decision["accepted"] and decision["fell"] == []
    assert grape.best_score(slipped) == pytest.approx((3 / 8 + 5 / 8) / 2)


def collapse_step(policy, batch, generator, reference, beta, window):
    """A bad update: drive every mean action to +50 (clipped to the corner of the action box)."""
    return (policy.mean[-1].bias - 50.0).pow(2).sum(), {}


@pytest.mark.slow
def test_a_collapsing_round_is_rolled_back_and_the_earlier_policy_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(grape, "tpo_step", collapse_step)
    config = grape.Config(task="reach-v3", output=tmp_path / "run", demo_episodes=6, demo_noise=0.3, bc_steps=300,
                          bc_batch_size=64, hidden=64, layers=2, max_episode_steps=50, rounds=1, states=8,
                          samples_per_state=2, max_steps=3, batch_size=8, learning_rate=1.0, eval_episodes=8,
                          num_envs=4, report_to="none")
    report = grape.run(config)
    bad = report["rounds"][0]
    assert report["before"]["success_sampled"] >= 0.5 and bad["success_sampled"] == 0.0, report["curve"]
    assert not bad["accepted"] and bad["policy_round"] == 0
    assert "rolled back to the policy of round 0" in bad["decision"]
    assert "round 1: held-out success change sampled -0.500" in capsys.readouterr().out
    bc = load_policy(config.output / "bc").state_dict()
    for folder in (config.output, config.output / "best"):
        kept = load_policy(folder).state_dict()
        assert all(torch.equal(kept[k], v) for k, v in bc.items()), f"{folder} holds the behaviour-cloned policy"
    assert report["best"]["round"] == 0 and report["after"] == {**report["before"], "step": 1}
    logged = [json.loads(line) for line in (config.output / "rounds.jsonl").read_text().splitlines()]
    assert [r["decision"] for r in logged] == [bad["decision"]]
    unguarded = grape.run(dataclasses.replace(config, output=tmp_path / "unguarded", policy=str(config.output / "bc"),
                                              round_guard=False))
    assert unguarded["rounds"][0]["policy_round"] == 1 and unguarded["after"]["success_sampled"] == 0.0
    assert unguarded["best"]["round"] == 0 and "--no-round-guard" in unguarded["rounds"][0]["decision"]
