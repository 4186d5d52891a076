"""Learning tests: a reward model learns the world's preference from pairs alone; its AI feedback aligns a generator.

The world prefers objects on the LEFT. A tiny open_clip ViT trained from scratch on the world's human pairs
must rank held-out pairs the same way; then it ranks the base model's own samples into pairs, Diffusion-DPO
trains on them, and the world's placement reward (never shown to the scorer) of fixed-seed samples rises.
A smaller version of scripts/ai_feedback_world.py.
"""

from pathlib import Path

import pytest

from mmalign.diffusion import dpo, world
from mmalign.diffusion.data import PreferencePairs
from mmalign.diffusion.rewards import pairs as reward_pairs
from mmalign.diffusion.rewards import train as reward_train

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output = tmp_path_factory.mktemp("reward") / "scorer"
    result = reward_train.run(reward_train.Config(
        scorer=str(ASSETS / "tiny-clip.json"), data=str(ASSETS / "tiny-sd-prefs" / "train.parquet"),
        eval_data=str(ASSETS / "tiny-sd-prefs" / "test.parquet"), output=output, max_steps=60,
        batch_size=32, learning_rate=1e-3, warmup_steps=5, report_to="none", checkpoint_every=0))
    return output, result


@pytest.mark.slow
def test_reward_model_learns_the_held_out_preference(trained):
    _, result = trained
    before, after = result["before"], result["after"]
    assert before["accuracy"] < 0.65 and after["accuracy"] > 0.9, (before, after)
    assert after["bt_loss"] < before["bt_loss"] - 0.3 and after["ece"] < 0.1, (before, after)


@pytest.mark.slow
def test_ai_feedback_pairs_align_the_generator(trained, tmp_path, embedded):
    scorer, _ = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(list(world.CAPTIONS) * 2) + "\n")
    report = reward_pairs.run(reward_pairs.Config(
        scorer=str(scorer), model=str(ASSETS / "tiny-sd"), prompts=str(prompts), output=tmp_path / "pairs",
        num_per_prompt=8, steps=10, batch_size=96, strategy="margin", max_pairs_per_prompt=4, seed=10_000))
    assert report["pairs"] >= 80
    assert world.placement_agreement(PreferencePairs(tmp_path / "pairs", resolution=32)) > 0.9, \
        "the scorer's AI labels agree with the world's own preference"

    config = embedded.config(dpo, tmp_path / "dpo", data=str(tmp_path / "pairs"), max_steps=150, batch_size=8)
    dpo.run(config)
    gain, _ = embedded.gain(config, seed=2000)
    assert gain["ci_low"] > 0, gain
