"""Shared fixtures: a tiny random SD pipeline and Pick-a-Pic data from the synthetic world, saved once per session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A random-weight tiny StableDiffusionPipeline saved with save_pretrained (loaded back by the code under test)."""
    from mmalign.diffusion.tiny import tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_pipeline(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def pickapic(tmp_path_factory):
    """24 Pick-a-Pic rows from the synthetic world (some ties), as Parquet."""
    from mmalign.diffusion.data import write_pickapic
    from mmalign.diffusion.world import preference_pairs

    return write_pickapic(preference_pairs(24, seed=3), tmp_path_factory.mktemp("prefs") / "train.parquet")


@pytest.fixture(scope="session")
def button_press(tmp_path_factory):
    """Noisy-expert button-press-v3 rollouts (60 steps): 40 training and 20 held-out episodes, as trajectory files."""
    from mmalign.robotics import collect

    root = tmp_path_factory.mktemp("button-press")
    common = dict(task="button-press-v3", noise=[0.0, 0.5, 1.0, 2.0, 3.0], max_episode_steps=60, num_envs=4)
    collect.run(collect.Config(output=root / "train.npz", episodes=40, seed=0, **common))
    collect.run(collect.Config(output=root / "eval.npz", episodes=20, seed=1, first_state=40, **common))
    return root
