"""Learning test on the embedded flow twin (`assets/tiny-sd3`: the shapes world learnt by an SD3-architecture
flow-matching model).

Flow-DPO on the shipped pairs (the object on the left preferred) raises the held-out placement reward of 72 fixed-seed
samples and keeps the colour asked for; sampling with RLG between the base and the Flow-DPO model moves that reward
monotonically with the guidance weight. RLG at weight 0 is the base model and at weight 1 the tuned one, exactly
(v = (1 - w) v_base + w v_tuned), so the gain's own samples are those two points of the curve.
"""

from contextlib import nullcontext

import pytest

from mmalign.diffusion import flow_dpo, world
from mmalign.diffusion.demo import FLOW_TWIN
from mmalign.diffusion.evaluate import evaluate_reward
from mmalign.diffusion.guidance import reinforcement_guidance
from mmalign.stats import mean_ci

PER_PROMPT, SEED, STEPS = 6, 2000, 10  # 72 samples of 10 Euler steps


@pytest.mark.long
def test_flow_dpo_raises_the_held_out_reward_and_rlg_moves_it_with_the_weight(embedded, tmp_path):
    cfg = embedded.config(flow_dpo, tmp_path / "run", model=str(FLOW_TWIN), max_steps=60, batch_size=8)
    history = flow_dpo.run(cfg)
    first, last = (sum(r["implicit_acc"] for r in rows) / len(rows) for rows in (history[:20], history[-20:]))
    assert last > first, (first, last)

    base, tuned = embedded.pipelines(cfg)
    captions = list(world.CAPTIONS)
    rewards = {}
    for weight, pipe, mix in ((0.0, base, None), (0.5, tuned, 0.5), (1.0, tuned, None), (1.5, tuned, 1.5)):
        with reinforcement_guidance(tuned, mix, base=base.transformer) if mix is not None else nullcontext():
            _, rewards[weight], images = evaluate_reward(pipe, captions, world.reward, per_prompt=PER_PROMPT,
                                                         seed=SEED, steps=STEPS)
        if weight == 1.0:
            expanded = [c for c in captions for _ in range(PER_PROMPT)]
            assert world.colour_match(images, expanded).mean() > 0.9, "the aligned twin still draws the asked colour"
    gain = mean_ci(rewards[1.0] - rewards[0.0])
    means = [rewards[w].mean().item() for w in sorted(rewards)]
    print(gain, means)
    assert gain["ci_low"] > 0, gain
    assert means == sorted(means) and means[-1] - means[0] > 0.05, means

