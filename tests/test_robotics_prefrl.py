"""Preference RL (PEBBLE / B-Pref): query selection and relabelling by hand, exact resume, learning on a tiny env."""

import json
import shutil

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmalign.cli import main
from mmalign.robotics.prefrl import Config, member_returns, reward_function, round_ends, run
from mmalign.robotics.queries import disagreement, entropy, preference_probabilities, uniform
from mmalign.robotics.replay import PreferenceReplayBuffer, relabel, segment_starts, state_entropy
from mmalign.robotics.reward_models import RewardArch, RewardModel

POINT = "mmalign-test/Point-v0"


class Point(gym.Env):
    """x' = clip(x + 0.25 a), reward -||x||: move to the origin of the plane from a random start."""

    observation_space = gym.spaces.Box(-2.0, 2.0, (2,), dtype=np.float64)  # as Meta-World's
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = self.np_random.uniform(-1.0, 1.0, 2)
        return self.x.copy(), {}

    def step(self, action):
        self.x = np.clip(self.x + 0.25 * np.asarray(action, dtype=np.float64), -2.0, 2.0)
        return self.x.copy(), -float(np.linalg.norm(self.x)), False, False, {}


if POINT not in gym.registry:
    gym.register(POINT, entry_point=lambda **_: Point())


def test_query_selection_by_hand():
    p = np.array([[0.5, 0.9, 0.2, 0.6], [0.5, 0.1, 0.3, 0.6]])  # K=2 members, M=4 candidates
    # std over members: 0, 0.4, 0.05, 0 -> 1, then 2
    assert disagreement(p, 2).tolist() == [1, 2]
    # mean p: 0.5, 0.5, 0.25, 0.6 -> entropy largest at 0 and 1 (tie, lower index first), then 3 (0.6), then 2
    assert entropy(p, 3).tolist() == [0, 1, 3]
    assert preference_probabilities([[0.0]], [[np.log(3.0)]])[0, 0] == pytest.approx(0.75)
    picked = uniform(10, 4, np.random.default_rng(0))
    assert len(set(picked.tolist())) == 4 and picked.min() >= 0 and picked.max() < 10


def test_segments_stay_inside_episodes_and_state_entropy_by_hand():
    dones = np.array([0, 0, 1, 0, 0, 0, 1])
    assert segment_starts(dones, 2).tolist() == [0, 1, 3, 4, 5]  # a segment may end on an episode's last step
    assert segment_starts(dones, 3).tolist() == [0, 3, 4]
    states = torch.tensor([[0.0], [1.0], [3.0]])
    # k = 2 (a state is its own nearest): distances to the 2nd nearest are 1, 1 and 2
    assert state_entropy(states, states, 2).tolist() == [1.0, 1.0, 2.0]


def test_relabel_gives_every_stored_step_the_reward_models_reward():
    obs_space, act_space = Point.observation_space, Point.action_space
    buffer = PreferenceReplayBuffer(8, obs_space, act_space, device="cpu")
    rng = np.random.default_rng(0)
    for t in range(5):
        obs, act = rng.normal(size=(1, 2)), rng.uniform(-1, 1, (1, 2))
        buffer.add(obs, obs, act, np.array([7.0]), np.array([t == 4]), [{"true_reward": -t}])
    torch.manual_seed(0)
    model = RewardModel(RewardArch(2, 2, hidden=8, layers=1, members=2)).eval()
    relabel(buffer, reward_function(model), batch=2)
    with torch.no_grad():
        obs = torch.as_tensor(buffer.observations[:5, 0], dtype=torch.float32)
        act = torch.as_tensor(buffer.actions[:5, 0], dtype=torch.float32)
        by_hand = (sum(member(torch.cat([obs, act], -1))[:, 0] for member in model.members) / 2).numpy()
    assert np.allclose(buffer.rewards[:5, 0], by_hand, atol=1e-6)
    assert (buffer.rewards[5:] == 0).all()  # nothing stored there
    assert buffer.true_rewards[:5, 0].tolist() == [0, -1, -2, -3, -4]
    # a segment's member returns are the sums of the members' rewards
    returns = member_returns(model, buffer.observations[None, :5, 0], buffer.actions[None, :5, 0])
    assert returns.shape == (2, 1) and returns.mean() == pytest.approx(by_hand.sum(), abs=1e-5)


def test_round_ends_fall_on_episode_ends():
    config = Config(env=POINT, output="unused", max_episode_steps=25, segment_length=10, learning_starts=50,
                    unsup_steps=25, feedback_every=100, steps=300)
    assert round_ends(config) == [75, 175, 275, 300]
    with pytest.raises(ValueError, match="multiple of max_episode_steps"):
        Config(env=POINT, output="unused", max_episode_steps=25, segment_length=10, feedback_every=110)


TINY = ["--env", POINT, "--max-episode-steps", "25", "--steps", "150", "--learning-starts", "25", "--unsup-steps",
        "25", "--feedback-every", "50", "--queries-per-round", "4", "--total-queries", "8", "--segment-length", "5",
        "--candidates", "3", "--eval-episodes", "2", "--sac-hidden", "16", "--sac-batch-size", "16", "--hidden", "16",
        "--layers", "1", "--max-steps", "5", "--report-to", "none", "--cpu"]


def test_cli_run_checkpoints_and_resumes_exactly(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(["robotics", "prefrl", *TINY, "--output", str(whole)]) == 0
    names = sorted(p.name for p in (whole / "checkpoints").iterdir())
    assert names == ["checkpoint-100", "checkpoint-150", "checkpoint-50"]  # rounds end at 50, 100, 150
    curve = (whole / "curve.csv").read_text().splitlines()
    assert curve[0] == "round,step,queries,labels,true_return" and len(curve) == 1 + 4
    assert [json.loads((whole / "checkpoints" / n / "progress.json").read_text())["queries"] for n in
            ("checkpoint-50", "checkpoint-100", "checkpoint-150")] == [4, 8, 8]  # the budget of 8 ends after round 1
    # an interruption after round 0: the folder as it was then, resumed
    later = {"checkpoint-100", "checkpoint-150", "round-1", "round-2", "curve.csv", "curve.png", "eval.json",
             "reward_model.json", "reward_model.safetensors"}
    shutil.copytree(whole, resumed, ignore=lambda folder, names: [n for n in names if n in later and
                                                                  "checkpoint-50" not in folder])
    assert main(["robotics", "prefrl", *TINY, "--output", str(resumed), "--resume", "latest"]) == 0
    assert (resumed / "curve.csv").read_text() == (whole / "curve.csv").read_text()
    for name in ("sac.safetensors", "reward_model.safetensors"):
        a, b = load_file(whole / "checkpoints/checkpoint-150" / name), load_file(resumed / "checkpoints/checkpoint-150"
                                                                                 / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("replay.npz", "labels.npz"):
        with np.load(whole / "checkpoints/checkpoint-150" / name) as a, \
                np.load(resumed / "checkpoints/checkpoint-150" / name) as b:
            assert all(np.array_equal(a[k], b[k]) for k in a.files)
    # a finished run's folder is not run again by accident
    assert main(["robotics", "prefrl", *TINY, "--output", str(whole)]) == 1


def test_prefrl_raises_the_true_return_over_the_initial_policy(tmp_path):
    gains = []
    for seed in range(3):
        config = Config(env=POINT, output=tmp_path / str(seed), seed=seed, max_episode_steps=25, steps=1000,
                        learning_starts=200, feedback_every=200, queries_per_round=10, total_queries=50,
                        segment_length=10, candidates=4, eval_episodes=10, sac_hidden=64, sac_batch_size=64,
                        hidden=64, layers=2, max_steps=50, gamma=0.9, sac_learning_rate=1e-3, report_to="none",
                        cpu=True)
        report = run(config)
        assert report["labels"] == report["queries"] == 50  # the oracle labels every query it is asked
        gains.append(report["true_return"] - report["before"]["true_return"])
    # paired over seeds: every seed's policy beats its own initial policy on the same evaluation episodes
    assert min(gains) > 0 and np.mean(gains) > 5, gains
