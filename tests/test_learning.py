"""Learning test: Diffusion-DPO on the embedded tiny model moves what it exists to move.

Pairs prefer the object on the left. After training, the implicit preference accuracy has risen and
the held-out placement reward of fixed-seed samples is higher than the base model's.
"""

import pytest

from mmalign.diffusion import world
from mmalign.diffusion.evaluate import evaluate_reward
from mmalign.diffusion.models import load_pipeline
from mmalign.stats import mean_ci


def placement(images, prompts):
    return world.placement_reward(images)


@pytest.mark.slow
def test_diffusion_dpo_raises_implicit_accuracy_and_held_out_reward(aligned_tiny_sd):
    cfg, history = aligned_tiny_sd
    first, last = (sum(r["implicit_acc"] for r in rows) / len(rows) for rows in (history[:50], history[-50:]))
    assert last > 0.65 and last > first + 0.1, (first, last)

    prompts = list(world.CAPTIONS)
    base = load_pipeline(cfg.model)
    aligned = load_pipeline(cfg.output)
    for pipe in (base, aligned):
        pipe.set_progress_bar_config(disable=True)
    _, base_rewards, _ = evaluate_reward(base, prompts, placement, per_prompt=4, seed=2000)
    _, aligned_rewards, images = evaluate_reward(aligned, prompts, placement, per_prompt=4, seed=2000)
    gain = mean_ci(aligned_rewards - base_rewards)
    assert gain["ci_low"] > 0, gain
    captions = [p for p in prompts for _ in range(4)]
    assert world.colour_match(images, captions).mean() > 0.9, "the aligned model still draws the asked colour"
