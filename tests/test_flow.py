"""Flow matching: the forward process by hand, Flow-DPO on a tiny SD3 model (learning), Flow-DPO runs and RLG on
tiny SD3, SD3.5 and FLUX.1 models."""

import functools
import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from PIL import Image

from mmalign.cli import main
from mmalign.diffusion import base, dpo, flow_dpo
from mmalign.diffusion.data import PreferencePairs, collate_pairs
from mmalign.diffusion.flow import flow_noising
from mmalign.diffusion.guidance import reinforcement_guidance
from mmalign.diffusion.models import add_lora, load_pipeline, save_lora
from mmalign.diffusion.sample import generate as generate_images
from mmalign.trainer import Trainer, step_generator

FLOW_FAMILIES = ["sd3", "sd35", "flux"]


@pytest.fixture(scope="module")
def tiny_sd3(tiny_family):
    return tiny_family("sd3")


@pytest.mark.parametrize("sampler, shape", [
    (FlowMatchEulerDiscreteScheduler(shift=3.0), (6, 4, 2, 2)),
    (UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0), (6, 4, 3, 2, 2)),
], ids=["sd3-image", "wan-video"])
def test_flow_noising_by_hand(sampler, shape):
    """x_t = (1 - sigma) x0 + sigma eps at sigma = s r / (1 + (s - 1) r), r = 1 - floor(1000 u) / 1000, with the
    sampler's shift s (SD3's `shift`, Wan's UniPC `flow_shift`); the transformer sees sigma * 1000; one eps over a
    whole video."""
    scheduler = base.training_scheduler(SimpleNamespace(scheduler=sampler))
    x0, ones = torch.randn(*shape), [1] * (len(shape) - 1)
    noisy, timesteps, target = flow_noising(scheduler, x0, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    u = torch.rand(3, generator=g)
    eps = torch.randn(3, *shape[1:], generator=g).repeat(2, *ones)
    shift, r = sampler.config.get("flow_shift") or sampler.config.shift, 1 - (u * 1000).long() / 1000
    sigma = (shift * r / (1 + (shift - 1) * r)).repeat(2)
    torch.testing.assert_close(noisy, (1 - sigma.view(-1, *ones)) * x0 + sigma.view(-1, *ones) * eps)
    torch.testing.assert_close(target, eps - x0)
    torch.testing.assert_close(timesteps / 1000, sigma)  # the transformer sees sigma * 1000


def test_flow_dpo_refuses_a_diffusion_model(tiny_sd, pickapic, tmp_path, capsys):
    code = main(["diffusion", "flow-dpo", "--model", str(tiny_sd), "--data", str(pickapic), "--output",
                 str(tmp_path / "r"), "--max-steps", "1", "--report-to", "none", "--num-samples", "0"])
    assert code == 1 and "not a flow-matching one" in capsys.readouterr().err


def test_flow_dpo_moves_the_right_way_on_a_fixed_batch(tiny_sd3, pickapic, tmp_path):
    """With the noise draw held fixed, optimising the Flow-DPO loss drives the implicit accuracy to 1."""
    cfg = flow_dpo.Config(model=str(tiny_sd3), data=str(pickapic), output=tmp_path / "run", full=True, beta=500,
                          max_steps=1, batch_size=4, num_samples=0, report_to="none", prompt_dropout=0.0)
    trainer = Trainer(cfg)
    pipe, parts = base.prepare(cfg, trainer)
    pairs = PreferencePairs(cfg.data, resolution=parts.resolution)
    batch = collate_pairs([pairs[i] for i in range(4)])
    step = functools.partial(dpo.dpo_step, parts=parts)
    optimizer = torch.optim.Adam([p for p in pipe.transformer.parameters() if p.requires_grad], lr=1e-4)
    losses, accuracy = [], []
    for _ in range(20):
        loss, stats = step(pipe.transformer, batch, step_generator(0, 0, 0, "cpu"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        accuracy.append(stats["implicit_acc"].item())
    assert losses[0] == pytest.approx(0.6931, abs=1e-4)
    assert losses[-1] < 0.5 * losses[0] and accuracy[-1] == 1.0, (losses, accuracy)


@pytest.mark.parametrize("kind", FLOW_FAMILIES)
def test_flow_dpo_run_saves_a_lora_the_pipeline_loads(tiny_family, pickapic, tmp_path, kind):
    cfg = flow_dpo.Config(model=str(tiny_family(kind)), data=str(pickapic), output=tmp_path / "run", max_steps=2,
                          batch_size=2, num_samples=1, sample_steps=2, report_to="none", learning_rate=1e-3,
                          resolution=32)
    history = flow_dpo.run(cfg)
    assert history[0]["loss"] == pytest.approx(0.6931, abs=1e-4) and history[1]["model_diff"] != history[1]["ref_diff"]
    assert json.loads((cfg.output / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
    assert (cfg.output / "samples_after.png").is_file()
    pipe = load_pipeline(tiny_family(kind))
    pipe.load_lora_weights(cfg.output)
    assert any("lora" in name for name, _ in pipe.transformer.named_parameters())


@pytest.mark.parametrize("kind", FLOW_FAMILIES)
def test_rlg_weight_zero_and_one(tiny_family, tmp_path, kind):
    def pipeline():
        pipe = load_pipeline(tiny_family(kind))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    prompts = ["a red circle", "a blue square"]
    generate = functools.partial(generate_images, height=32, width=32)
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


def test_flux_full_fine_tune_saves_a_pipeline_that_samples(tiny_family, pickapic, tmp_path):
    """--full writes a whole FluxPipeline folder; `mmalign diffusion sample` reads it, at the given resolution."""
    cfg = flow_dpo.Config(model=str(tiny_family("flux")), data=str(pickapic), output=tmp_path / "run", max_steps=1,
                          batch_size=2, num_samples=0, report_to="none", full=True, resolution=32)
    flow_dpo.run(cfg)
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    assert main(["diffusion", "sample", "--model", str(cfg.output), "--prompts", str(tmp_path / "prompts.txt"),
                 "--output", str(tmp_path / "samples"), "--num", "2", "--steps", "2", "--resolution", "32",
                 "--guidance-scale", "3.5"]) == 0
    images = sorted((tmp_path / "samples").glob("sample_*.png"))
    assert len(images) == 2 and Image.open(images[0]).size == (32, 32)
