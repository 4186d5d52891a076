"""AC-Flow: shaping, diversity and the critic by hand; a run on a tiny SD3 model; bad rewards and models stop."""

from pathlib import Path

import pytest
import torch

from mmalign.cli import main
from mmalign.diffusion import acflow, latents, world
from mmalign.diffusion.demo import ASSETS, FLOW_TWIN
from mmalign.diffusion.models import load_pipeline
from mmalign.diffusion.rewards import load_scorer, save_scorer

FLOW_FAMILIES = ["sd3", "sd35", "flux"]
ACFLOW_TWIN = dict(max_steps=60, batch_size=4, samples_per_prompt=4, sample_steps=8, critic_warmup=10,
                   learning_rate=1e-3, warmup_steps=5)


@pytest.fixture(scope="module")
def tiny_sd3(tiny_family):
    return tiny_family("sd3")


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square\n")
    return path


def test_reward_shaping_and_diversity_by_hand():
    rewards = torch.tensor([1.0, 3.0, 10.0, 10.0, 10.0, 16.0])
    shaped = acflow.shape_rewards(rewards, 3)
    first = (rewards[:3] - 14 / 3) / (rewards[:3].std() + 1e-6)
    torch.testing.assert_close(shaped[:3], first)
    assert shaped[3:].mean().abs() < 1e-6 and shaped[5] > 0
    images = torch.zeros(4, 3, 2, 2)
    images[1] += 1.0  # prompt 0: two images sqrt(12) apart; prompt 1: identical images
    assert acflow.diversity(images, 2).item() == pytest.approx(12 ** 0.5 / 2)


def test_critic_takes_state_noise_level_and_prompt():
    critic = acflow.Critic(latent_channels=4, prompt_dim=8, width=16)
    value = critic(torch.randn(5, 4, 8, 8), torch.rand(5), torch.randn(5, 8))
    assert value.shape == (5,)


@pytest.mark.parametrize("kind", FLOW_FAMILIES)
def test_a_short_run_trains_actor_and_critic(tiny_family, prompts, tmp_path, kind):
    cfg = acflow.Config(model=str(tiny_family(kind)), prompts=str(prompts), output=tmp_path / "run", max_steps=3,
                        batch_size=2, samples_per_prompt=2, sample_steps=2, critic_warmup=1, num_samples=1,
                        report_to="none", learning_rate=1e-3, checkpoint_every=0, resolution=32)
    history = acflow.run(cfg)
    assert [row["critic_warmup"] for row in history] == [1.0, 0.0, 0.0]
    assert {"reward", "critic_loss", "diversity", "w2", "advantage"} <= set(history[0])
    assert history[0]["w2"] == 0.0  # the LoRA starts at zero: actor == reference
    assert (cfg.output / "critic.safetensors").is_file() and (cfg.output / "curves.png").is_file()
    assert (cfg.output / "pytorch_lora_weights.safetensors").is_file()


def test_a_reward_model_folder_is_a_reward(tiny_sd3, prompts, tmp_path):
    arch = Path(__file__).resolve().parents[1] / "assets" / "tiny-clip.json"
    save_scorer(load_scorer(str(arch)), tmp_path / "rm")
    cfg = acflow.Config(model=str(tiny_sd3), prompts=str(prompts), output=tmp_path / "run", reward=str(tmp_path / "rm"),
                        max_steps=1, batch_size=2, samples_per_prompt=2, sample_steps=1, num_samples=0,
                        report_to="none", checkpoint_every=0)
    (row,) = acflow.run(cfg)
    assert torch.isfinite(torch.tensor(row["reward"])) and row["reward"] != 0.0


def nan_reward(images, prompts):
    return torch.full((len(prompts),), float("nan"))


def test_bad_reward_and_non_flow_model_are_errors(tiny_sd3, tiny_sd, prompts, tmp_path, capsys):
    common = ["--prompts", str(prompts), "--max-steps", "1", "--batch-size", "2", "--samples-per-prompt", "2",
              "--sample-steps", "1", "--num-samples", "0", "--report-to", "none"]
    assert main(["diffusion", "acflow", "--model", str(tiny_sd3), "--output", str(tmp_path / "a"),
                 "--reward", f"{__name__}:nan_reward", *common]) == 1
    assert "with NaN or inf" in capsys.readouterr().err
    assert main(["diffusion", "acflow", "--model", str(tiny_sd3), "--output", str(tmp_path / "b"),
                 "--reward", "no.such.module:fn", *common]) == 1
    assert "cannot import it" in capsys.readouterr().err
    assert main(["diffusion", "acflow", "--model", str(tiny_sd), "--output", str(tmp_path / "c"), *common]) == 1
    assert "needs a flow-matching pipeline" in capsys.readouterr().err


@pytest.mark.slow
def test_the_held_out_placement_reward_of_the_flow_twin_rises_keeping_colour_and_diversity(embedded, tmp_path):
    """AC-Flow on the embedded flow twin, rewarded by placement: 72 paired fixed-seed samples improve."""
    cfg = acflow.Config(model=str(FLOW_TWIN), prompts=str(ASSETS / "tiny-sd-prompts.txt"), output=tmp_path / "run",
                        reward=world.reward, **ACFLOW_TWIN, num_samples=0, report_to="none", checkpoint_every=0)
    acflow.run(cfg)
    summary = embedded.reward_run_summary(cfg)
    print(summary)
    assert summary["gain"]["ci_low"] > 0, summary
    assert summary["colour_match"] > 0.9, summary
    assert summary["diversity_ratio"] > 0.5, summary


def test_samples_are_decoded_by_the_inverse_of_the_training_latents(tiny_sd3):
    """from_latents(to_latents(z)) = decode(z) on SD3's shifted, scaled latents (shift_factor 0.1 here)."""
    pipe = load_pipeline(tiny_sd3)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    x0 = latents.to_latents(z, torch.zeros_like(z), torch.Generator(), pipe.vae)
    assert not torch.allclose(x0, z)
    with torch.no_grad():
        expected = (pipe.vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
        assert torch.allclose(latents.from_latents(x0, pipe.vae), expected, atol=1e-5)
