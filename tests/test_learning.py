"""Learning tests on the embedded tiny model aligned by Diffusion-DPO (one session fixture, so one file: parallel
test runs give a file to one worker).

Pairs prefer the object on the left. After training, the implicit preference accuracy has risen and the held-out
placement reward of fixed-seed samples is higher than the base model's; sampling with RLG between the base and the
aligned model moves that reward monotonically with the guidance weight.
"""

import pytest

from mmalign.diffusion import world
from mmalign.diffusion.evaluate import evaluate_reward
from mmalign.diffusion.guidance import reinforcement_guidance
from mmalign.diffusion.models import load_pipeline


@pytest.mark.long
def test_diffusion_dpo_raises_implicit_accuracy_and_held_out_reward(aligned_tiny_sd, embedded):
    cfg, history = aligned_tiny_sd
    first, last = (sum(r["implicit_acc"] for r in rows) / len(rows) for rows in (history[:50], history[-50:]))
    assert last > 0.65 and last > first + 0.1, (first, last)

    gain, images = embedded.gain(cfg, seed=2000)
    assert gain["ci_low"] > 0, gain
    captions = [p for p in world.CAPTIONS for _ in range(4)]
    assert world.colour_match(images, captions).mean() > 0.9, "the aligned model still draws the asked colour"


@pytest.mark.long
def test_rlg_reward_rises_monotonically_with_the_weight(aligned_tiny_sd):
    cfg, _ = aligned_tiny_sd
    tuned = load_pipeline(cfg.output)
    base = load_pipeline(cfg.model)
    for pipe in (tuned, base):
        pipe.set_progress_bar_config(disable=True)
    means = []
    for weight in (0.0, 0.5, 1.0, 1.5):
        with reinforcement_guidance(tuned, weight, base=base.unet):
            summary, _, _ = evaluate_reward(tuned, list(world.CAPTIONS), lambda im, p: world.placement_reward(im),
                                            per_prompt=4, seed=3000)
        means.append(summary["mean"])
    assert means == sorted(means) and means[-1] - means[0] > 0.1, means
