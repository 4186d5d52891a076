"""Learning tests on the embedded flow twin (`assets/tiny-sd3`: the shapes world learnt by an SD3-architecture
flow-matching model; one module fixture, so one file).

Flow-DPO on the shipped pairs (the object on the left preferred) raises the held-out placement reward of fixed-seed
samples and keeps the colour asked for; sampling with RLG between the base and the Flow-DPO model moves that reward
monotonically with the guidance weight.
"""

import pytest

from mmalign.diffusion import flow_dpo, world
from mmalign.diffusion.demo import FLOW_TWIN
from mmalign.diffusion.evaluate import evaluate_reward
from mmalign.diffusion.guidance import reinforcement_guidance
from mmalign.diffusion.models import load_pipeline

FLOW_DPO = dict(model=str(FLOW_TWIN), max_steps=150, batch_size=16, learning_rate=1e-4, beta=5000)


@pytest.fixture(scope="module")
def aligned_flow_twin(tmp_path_factory, embedded):
    """The flow twin after a full Flow-DPO fine-tune on the embedded pairs: (config, history)."""
    cfg = embedded.config(flow_dpo, tmp_path_factory.mktemp("flow-aligned") / "run", **FLOW_DPO)
    return cfg, flow_dpo.run(cfg)


@pytest.mark.slow
def test_flow_dpo_raises_the_held_out_reward_and_keeps_the_colour(aligned_flow_twin, embedded):
    cfg, history = aligned_flow_twin
    first, last = (sum(r["implicit_acc"] for r in rows) / len(rows) for rows in (history[:30], history[-30:]))
    assert last > first, (first, last)
    gain, images = embedded.gain(cfg, seed=2000, per_prompt=6)
    assert gain["ci_low"] > 0, gain
    captions = [p for p in world.CAPTIONS for _ in range(6)]
    assert world.colour_match(images, captions).mean() > 0.9, "the aligned twin still draws the asked colour"


@pytest.mark.slow
def test_rlg_on_the_flow_twin_moves_the_reward_with_the_weight(aligned_flow_twin):
    cfg, _ = aligned_flow_twin
    tuned, base = load_pipeline(cfg.output), load_pipeline(cfg.model)
    for pipe in (tuned, base):
        pipe.set_progress_bar_config(disable=True)
    means = []
    for weight in (0.0, 0.5, 1.0, 1.5):
        with reinforcement_guidance(tuned, weight, base=base.transformer):
            summary, _, _ = evaluate_reward(tuned, list(world.CAPTIONS), world.reward, per_prompt=6, seed=3000)
        means.append(summary["mean"])
    assert means == sorted(means) and means[-1] - means[0] > 0.05, means
