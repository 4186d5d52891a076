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
def aligned_tiny_sd(tmp_path_factory):
    """The embedded tiny model after 300 full Diffusion-DPO steps (the demo's settings): (config, history)."""
    from pathlib import Path

    from mmalign.diffusion import dpo

    assets = Path(__file__).resolve().parents[1] / "assets"
    cfg = dpo.Config(model=str(assets / "tiny-sd"), data=str(assets / "tiny-sd-prefs" / "train.parquet"),
                     output=tmp_path_factory.mktemp("aligned") / "run", full=True, beta=5000, learning_rate=1e-4,
                     warmup_steps=10, max_steps=300, batch_size=16, num_samples=0, report_to="none",
                     checkpoint_every=0)
    return cfg, dpo.run(cfg)
