"""Learning test: Diffusion-DPO on the embedded tiny model moves what it exists to move.

Pairs prefer the object on the left. After training, the implicit preference accuracy has risen and
the held-out placement reward of fixed-seed samples is higher than the base model's.
"""

import pytest

from mmalign.diffusion import world


@pytest.mark.slow
@pytest.mark.xdist_group("aligned_tiny_sd")  # one worker trains the session's aligned model
def test_diffusion_dpo_raises_implicit_accuracy_and_held_out_reward(aligned_tiny_sd, embedded):
    cfg, history = aligned_tiny_sd
    first, last = (sum(r["implicit_acc"] for r in rows) / len(rows) for rows in (history[:50], history[-50:]))
    assert last > 0.65 and last > first + 0.1, (first, last)

    gain, images = embedded.gain(cfg, seed=2000)
    assert gain["ci_low"] > 0, gain
    captions = [p for p in world.CAPTIONS for _ in range(4)]
    assert world.colour_match(images, captions).mean() > 0.9, "the aligned model still draws the asked colour"
