"""Meta-World environments: task names, reproducible initial states, vectorised rollouts with expert noise."""

import numpy as np
import pytest

from mmalign.robotics import envs
from mmalign.robotics.rollout import NoisyExpert, RandomPolicy, rollout

TASK = "button-press-v3"


def test_unknown_task_names_close_matches():
    with pytest.raises(ValueError, match=r"unknown Meta-World task 'button-press-v2'; did you mean button-press-v3"):
        envs.make_env("button-press-v2")
    with pytest.raises(ValueError, match="unknown Meta-World task"):
        envs.make_vector_env("no-such-task", 2)


def test_initial_state_follows_the_seed_not_the_history():
    env = envs.make_env(TASK, max_episode_steps=5)
    assert env.observation_space.shape == (envs.OBSERVATION_SIZE,) and env.action_space.shape == (envs.ACTION_SIZE,)
    first, _ = env.reset(seed=7)
    env.reset(seed=3)
    env.step(env.action_space.sample())
    again, _ = env.reset(seed=7)
    other, _ = env.reset(seed=8)
    by_option, _ = env.reset(options={"initial_state": 57})
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, by_option)
    assert np.abs(first - other).max() > 1e-3
    env.close()


def test_vectorised_rollout_matches_single_env_and_noise_lowers_return():
    vec = envs.make_vector_env(TASK, 3, max_episode_steps=80)
    clean = rollout(vec, NoisyExpert(TASK, 0.0), [0, 1, 2, 3], TASK)
    assert clean.observations.shape == (4, 80, 39) and clean.actions.shape == (4, 80, 4)
    assert clean.rewards.shape == clean.successes.shape == (4, 80)
    np.testing.assert_array_equal(clean.info["initial_state"], [0, 1, 2, 3])
    single = rollout(envs.make_vector_env(TASK, 1, max_episode_steps=80), NoisyExpert(TASK, 0.0), [3], TASK)
    np.testing.assert_allclose(single.rewards[0], clean.rewards[3], rtol=1e-5)
    assert clean.success().all(), "the scripted expert presses the button within 80 steps"

    noisy = rollout(vec, NoisyExpert(TASK, np.array([0.0, 1.5, 1.5]), seed=1), [0, 1, 2], TASK)
    np.testing.assert_allclose(noisy.rewards[0], clean.rewards[0], rtol=1e-5)
    assert noisy.returns()[1:].mean() < clean.returns()[1:3].mean()
    random = rollout(vec, RandomPolicy(seed=0), [0, 1, 2], TASK)
    assert np.abs(random.actions).max() <= 1 and random.returns().mean() < clean.returns().mean()
    vec.close()


@pytest.mark.slow
def test_async_vector_env_gives_the_sync_rollout():
    sync = rollout(envs.make_vector_env(TASK, 2, max_episode_steps=20), NoisyExpert(TASK, 0.0), [0, 1], TASK)
    vec = envs.make_vector_env(TASK, 2, max_episode_steps=20, mode="async")
    np.testing.assert_allclose(rollout(vec, NoisyExpert(TASK, 0.0), [0, 1], TASK).rewards, sync.rewards, rtol=1e-5)
    vec.close()


def test_noise_must_not_be_negative():
    with pytest.raises(ValueError, match="noise must not be negative"):
        NoisyExpert(TASK, -0.1)
