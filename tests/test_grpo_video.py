"""Flow-GRPO on a text-to-video pipeline (tiny Wan 2.1): the rollout's log-probability over the whole video latent by
hand on the flow sigmas of Wan's own sampler, frame-averaged rewards, frame counts checked, a CLI run that resumes
exactly, DDPO on a UNet3D video pipeline, and a brightness reward that rises while the frames stay finite and as
steady in time."""

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import UniPCMultistepScheduler
from safetensors.torch import load_file

from mmalign.cli import main
from mmalign.diffusion import base, grpo, latents, sde
from mmalign.diffusion.evaluate import checked_rewards
from mmalign.diffusion.models import denoiser_of, load_pipeline
from mmalign.diffusion.rewards import load_scorer
from mmalign.diffusion.sample import generate
from mmalign.errors import ConfigError
from mmalign.stats import mean_ci
from mmalign.trainer import Trainer

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square\n")
    return path


def brightness(images, prompts):
    """Mean pixel value of each image [N,3,H,W] in [0, 1]."""
    return images.mean(dim=(1, 2, 3))


def test_a_wan_rollout_step_is_the_gaussian_sde_step_by_hand(tiny_family, prompts, tmp_path):
    """Sigmas and timesteps are those of Wan's UniPC sampler (its first sigma 1 - 1e-6 put back to 1); each stored
    log-probability is log N(x_{i+1}; mean, std^2) averaged over the video latent [C,F',h,w], with the guided velocity
    and Flow-GRPO's mean and std written out here; the reward is the mean brightness of the decoded frames."""
    cfg = grpo.Config(model=str(tiny_family("wan")), prompts=str(prompts), output=tmp_path / "run", num_frames=5,
                      resolution=32, sample_steps=3, batch_size=1, samples_per_prompt=2, updates_per_rollout=1,
                      guidance_scale=2.0, num_samples=0, report_to="none")
    pipe, parts = base.prepare(cfg, Trainer(cfg))
    latent = latents.latent_shape(pipe, parts.resolution, grpo.video_frames(parts))
    assert latent == (4, 2, 8, 8)  # 5 frames: 1 + (5-1)/4 latent frames, 32 px / 4
    schedule = sde.policy_schedule(pipe, parts.noise_scheduler, 3, latent[-1], torch.device("cpu"))
    sampler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    sampler.set_timesteps(3)
    assert schedule.sigmas[0] == 1 and 0 < 1 - sampler.sigmas[0] < 1e-5
    torch.testing.assert_close(schedule.sigmas[1:], sampler.sigmas[1:])
    torch.testing.assert_close(schedule.timesteps, sampler.timesteps.float())

    scored = []
    reward = lambda images, prompts: scored.append(images.shape) or brightness(images, prompts)  # noqa: E731
    (part,) = grpo.rollout(denoiser_of(pipe), ["a red circle"], torch.Generator().manual_seed(0), parts, schedule,
                           reward, 0, latent)
    assert part["latents"].shape == part["next_latents"].shape == (2, 3, *latent)
    assert scored == [(2 * 5, 3, 32, 32)]  # two videos of five frames, scored frame by frame
    videos = latents.from_latents(part["next_latents"][:, -1], pipe.vae)
    assert part["reward"].item() == pytest.approx(videos.mean().item(), rel=1e-6)

    transformer, sigmas = denoiser_of(pipe), schedule.sigmas.tolist()
    text = pipe.encode_prompt(prompt=["", "a red circle"], do_classifier_free_guidance=False,
                              max_sequence_length=512)[0]
    for s in range(3):
        x, timestep = part["latents"][:, s], schedule.timesteps[s].expand(2)
        with torch.no_grad():
            uncond, cond = (transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=text[i:i + 1].expand(
                2, -1, -1)).sample for i in (0, 1))
        velocity = uncond + 2.0 * (cond - uncond)
        sigma, dt = sigmas[s], sigmas[s + 1] - sigmas[s]
        std_t = 0.7 * math.sqrt(sigma / (1 - (sigmas[1] if sigma == 1 else sigma)))
        mean = x * (1 + std_t**2 / (2 * sigma) * dt) + velocity * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
        normal = torch.distributions.Normal(mean, std_t * math.sqrt(-dt))
        expected = normal.log_prob(part["next_latents"][:, s]).flatten(1).mean(1)
        torch.testing.assert_close(part["log_probs"][:, s], expected, rtol=1e-5, atol=1e-5)


def test_a_videos_reward_is_the_mean_of_its_frames_rewards():
    videos = torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    calls = []

    def reward(images, prompts):
        calls.append((tuple(images.shape), list(prompts)))
        return images[:, 0].mean(dim=(1, 2)) * torch.tensor([len(p) for p in prompts])

    expected = [sum(videos[i, f, 0].mean().item() * len(p) for f in range(3)) / 3 for i, p in enumerate(["ab", "abc"])]
    assert checked_rewards(reward, videos, ["ab", "abc"], "r").tolist() == pytest.approx(expected, rel=1e-6)
    assert calls == [((6, 3, 32, 32), ["ab"] * 3 + ["abc"] * 3)]
    scorer = load_scorer(ASSETS / "tiny-clip.json")  # a reward model scores videos frame by frame as well
    frames = scorer.score(videos.flatten(0, 1), ["a red circle"] * 6).view(2, 3).mean(1)
    torch.testing.assert_close(checked_rewards(scorer.score, videos, ["a red circle"] * 2, "clip"), frames)
    with pytest.raises(ConfigError, match=r"--reward r returned \(2,\) values; expected 6 finite numbers, one per "
                                          r"image \(per frame of a video\)"):
        checked_rewards(lambda images, prompts: torch.zeros(2), videos, ["ab", "abc"], "r")


def test_frame_counts_are_checked(tiny_family, tiny_sd, prompts, tmp_path, refused):
    common = ["diffusion", "grpo", "--prompts", prompts, "--resolution", "32", "--report-to", "none"]
    message = refused(*common, "--model", tiny_family("wan"), "--num-frames", "6", "--output", tmp_path / "a",
                      output=tmp_path / "a")
    assert "--num-frames 6: WanPipeline's VAE encodes 1 + 4k frames (1 + k latent frames); use 5 or 9" in message
    message = refused(*common, "--model", tiny_sd, "--num-frames", "5", "--output", tmp_path / "b",
                      output=tmp_path / "b")
    assert "--num-frames 5" in message and "is an image pipeline (StableDiffusionPipeline)" in message
    with pytest.raises(ConfigError, match="--num-frames 0: must be at least 1"):
        grpo.Config(model="m", prompts=str(prompts), output=tmp_path / "c", num_frames=0)


def test_a_wan_run_from_the_cli_resumes_exactly(tiny_family, prompts, tmp_path):
    """Four optimizer steps on one rollout split in four, interrupted after two (a checkpoint holding the untrained
    half of the rollout) and resumed: the losses and the LoRA are those of the run that went straight through."""
    def run(output, steps, *extra):
        assert main(["diffusion", "grpo", "--model", str(tiny_family("wan")), "--prompts", str(prompts), "--output",
                     str(output), "--max-steps", str(steps), "--batch-size", "2", "--samples-per-prompt", "2",
                     "--num-frames", "5", "--resolution", "32", "--sample-steps", "2", "--guidance-scale", "2",
                     "--updates-per-rollout", "4", "--learning-rate", "1e-2", "--checkpoint-every", "2",
                     "--num-samples", "1", "--report-to", "none", *extra]) == 0
        return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]

    whole = run(tmp_path / "whole", 4)
    assert whole[0]["ratio"] == pytest.approx(1.0, abs=1e-5) and whole[0]["kl"] == 0.0  # on-policy, LoRA at 0
    for name in ("samples_before.png", "samples_after.png", "curves.png", "pytorch_lora_weights.safetensors"):
        assert (tmp_path / "whole" / name).is_file(), name
    run(tmp_path / "split", 2)
    assert sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir()) == ["checkpoint-2"]
    resumed = run(tmp_path / "split", 4, "--resume", "latest")
    assert [row["loss"] for row in resumed] == pytest.approx([row["loss"] for row in whole], abs=0, rel=0)
    weights = [load_file(str(tmp_path / run / "pytorch_lora_weights.safetensors")) for run in ("whole", "split")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_unet3d_video_pipeline_trains_on_latents_decoded_frame_by_frame(tiny_family, prompts, tmp_path):
    """TextToVideoSDPipeline's image VAE decodes video latents [N,C,F,h,w] one frame at a time; DDPO runs on it."""
    model = tiny_family("video")
    vae = load_pipeline(model).vae
    x0 = torch.randn(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    videos = latents.from_latents(x0, vae)
    assert videos.shape == (2, 3, 3, 32, 32)
    torch.testing.assert_close(videos[1, 2], latents.from_latents(x0[1:, :, 2], vae)[0])
    history = grpo.run(grpo.Config(model=str(model), prompts=str(prompts), output=tmp_path / "run", num_frames=3,
                                   resolution=32, max_steps=1, batch_size=1, samples_per_prompt=2, sample_steps=2,
                                   guidance_scale=1.0, num_samples=0, report_to="none", checkpoint_every=0))
    assert history[0]["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def frame_statistics(pipe):
    """Fixed-seed videos of the deployed sampler (8, 5 frames at 32 px): per-video brightness, the mean absolute change
    between consecutive frames, and whether every pixel is finite."""
    pipe.set_progress_bar_config(disable=True)
    videos = generate(pipe, ["a red circle", "a blue square"] * 4, seed=100, steps=4, guidance_scale=1.0, num_frames=5,
                      height=32, width=32)
    return videos.mean(dim=(1, 2, 3, 4)), (videos[:, 1:] - videos[:, :-1]).abs().mean().item(), \
        bool(torch.isfinite(videos).all())


@pytest.mark.slow
def test_flow_grpo_brightens_the_tiny_wans_videos_and_keeps_them_steady(tiny_family, prompts, tmp_path):
    """Eight on-policy rollouts of 2 prompts x 8 videos (full fine-tune), rewarded by frame brightness: the sampler's
    fixed-seed videos get brighter, each of the 8 paired, while they stay finite and their frame-to-frame change
    (temporal consistency) stays within 10% of the base model's."""
    cfg = grpo.Config(model=str(tiny_family("wan")), prompts=str(prompts), output=tmp_path / "run", reward=brightness,
                      max_steps=8, batch_size=2, samples_per_prompt=8, updates_per_rollout=1, sample_steps=4,
                      num_frames=5, resolution=32, guidance_scale=1.0, beta=0.0, full=True, learning_rate=3e-2,
                      num_samples=0, report_to="none", checkpoint_every=0)
    history = grpo.run(cfg)
    assert history[-1]["reward"] > history[0]["reward"], [row["reward"] for row in history]
    (base_bright, base_change, _), (bright, change, finite) = (frame_statistics(load_pipeline(model))
                                                               for model in (cfg.model, cfg.output))
    gain = mean_ci(bright - base_bright)
    print({"rollout_reward": [round(row["reward"], 4) for row in history], "gain": gain,
           "frame_change": (base_change, change)})
    assert (bright > base_bright).all() and gain["ci_low"] > 0, gain
    assert finite and abs(change / base_change - 1) < 0.1, (base_change, change)
