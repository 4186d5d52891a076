"""Flow matching: the forward process by hand, Flow-DPO on a tiny SD3 model (learning), RLG on SD3."""

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from mmalign.cli import main
from mmalign.diffusion import flow_dpo
from mmalign.diffusion.flow import flow_noising
from mmalign.diffusion.guidance import reinforcement_guidance
from mmalign.diffusion.models import add_lora, load_pipeline, save_lora
from mmalign.diffusion.sample import generate
from mmalign.diffusion.tiny import tiny_pipeline


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd3")
    tiny_pipeline(kind="sd3").save_pretrained(path)
    return path


def test_flow_noising_by_hand():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0 = torch.randn(6, 4, 2, 2)
    noisy, timesteps, target = flow_noising(scheduler, x0, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    u = torch.rand(3, generator=g)
    eps = torch.randn(3, 4, 2, 2, generator=g).repeat(2, 1, 1, 1)
    index = (u * 1000).long()
    sigma = scheduler.sigmas[index].repeat(2).view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - sigma) * x0 + sigma * eps)
    torch.testing.assert_close(timesteps, scheduler.timesteps[index].repeat(2))
    torch.testing.assert_close(target, eps - x0)
    torch.testing.assert_close(timesteps / 1000, sigma.flatten())  # the transformer sees sigma * 1000


def test_flow_dpo_refuses_a_diffusion_model(tiny_sd, pickapic, tmp_path, capsys):
    code = main(["diffusion", "flow-dpo", "--model", str(tiny_sd), "--data", str(pickapic), "--output",
                 str(tmp_path / "r"), "--max-steps", "1", "--report-to", "none", "--num-samples", "0"])
    assert code == 1 and "not a flow-matching one" in capsys.readouterr().err


@pytest.mark.slow
def test_flow_dpo_learns_the_training_preferences(tiny_sd3, pickapic, tmp_path):
    cfg = flow_dpo.Config(model=str(tiny_sd3), data=str(pickapic), output=tmp_path / "run", full=True,
                          learning_rate=1e-3, beta=5000, max_steps=40, batch_size=8, num_samples=0,
                          report_to="none", checkpoint_every=0, prompt_dropout=0.0)
    history = flow_dpo.run(cfg)
    first, last = (sum(r["implicit_acc"] for r in rows) / len(rows) for rows in (history[:10], history[-10:]))
    assert last > 0.8 and last > first + 0.2, (first, last)
    assert history[-1]["loss"] < history[0]["loss"]
    assert json.loads((cfg.output / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
    assert type(load_pipeline(cfg.output)).__name__ == "StableDiffusion3Pipeline"


def test_rlg_on_sd3_weight_zero_and_one(tiny_sd3, tmp_path):
    def pipeline():
        pipe = load_pipeline(tiny_sd3)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    prompts = ["a red circle", "a blue square"]
    base = generate(pipeline(), prompts, seed=1, steps=3)
    pipe = pipeline()
    add_lora(pipe.transformer, rank=4)
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    save_lora(pipe, pipe.transformer, tmp_path)
    tuned_pipe = pipeline()
    tuned_pipe.load_lora_weights(tmp_path)
    tuned = generate(tuned_pipe, prompts, seed=1, steps=3)
    assert (tuned - base).abs().max() > 1e-3
    with reinforcement_guidance(tuned_pipe, 0.0):
        assert torch.equal(generate(tuned_pipe, prompts, seed=1, steps=3), base)
    with reinforcement_guidance(tuned_pipe, 1.0):
        assert torch.equal(generate(tuned_pipe, prompts, seed=1, steps=3), tuned)
