"""Flow-GRPO / DDPO: the policy steps, log-probs, KL and clipped objective by hand; short runs on tiny SD3, FLUX and SD
models; exact resume with a rollout split across checkpoints; bad settings are refused."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from mmalign.cli import main
from mmalign.diffusion import grpo, sde, world
from mmalign.diffusion.demo import ASSETS, FLOW_TWIN
from mmalign.errors import ConfigError


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square\n")
    return path


def normal_log_prob(x: float, mean: float, std: float) -> float:
    return -((x - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)


def test_flow_sde_step_and_log_prob_by_hand():
    x, v, sigma, sigma_next, eta, x_next = 0.3, -1.2, 0.6, 0.4, 0.7, 0.1
    std_t = eta * math.sqrt(sigma / (1 - sigma))
    dt = sigma_next - sigma
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_t * math.sqrt(-dt)
    got_mean, got_std = sde.flow_sde_step(torch.tensor([[x]]), torch.tensor([[v]]), torch.tensor([[sigma]]),
                                          torch.tensor([[sigma_next]]), 0.9, eta)
    assert got_mean.item() == pytest.approx(mean, rel=1e-6) and got_std.item() == pytest.approx(std, rel=1e-6)
    log_prob = sde.gaussian_log_prob(torch.tensor([[x_next]]), got_mean, got_std)
    assert log_prob.item() == pytest.approx(normal_log_prob(x_next, mean, std), rel=1e-5)


def reference_sde_step(sigmas, model_output, step_index, sample, noise_level, prev_sample):
    """Flow-GRPO's `sde_step_with_logprob` (sde_type 'sde'), retyped with the step index given."""
    sigma = sigmas[step_index].view(-1, *([1] * (len(sample.shape) - 1)))
    sigma_prev = sigmas[step_index + 1].view(-1, *([1] * (len(sample.shape) - 1)))
    sigma_max = sigmas[1].item()
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    prev_sample_mean = sample * (1 + std_dev_t**2 / (2 * sigma) * dt) + model_output * (
        1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    log_prob = (-((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
                - torch.log(std_dev_t * torch.sqrt(-1 * dt)) - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim))), prev_sample_mean, std_dev_t


@pytest.mark.parametrize("step", [0, 2])  # step 0 is sigma = 1, where sigma_max replaces sigma in 1 - sigma
def test_flow_sde_step_equals_flow_grpo_reference(step):
    g = torch.Generator().manual_seed(0)
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0])
    schedule = sde.FlowSchedule(sigmas, sigmas[:-1] * 1000)
    x, v, following = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    index = torch.full((3,), step)
    mean, std = schedule.step(x, v, index, 0.7)
    expected, expected_mean, std_t = reference_sde_step(sigmas, v, index, x, 0.7, following)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(sde.gaussian_log_prob(following, mean, std), expected)
    dt = (sigmas[step + 1] - sigmas[step]).item()
    kl = sde.gaussian_kl(mean, mean + 0.1, std)  # the brief's ||mean - mean_ref||^2 / (2 std_t^2 (-dt)) per element
    torch.testing.assert_close(kl, (0.01 / (2 * std_t**2 * -dt)).flatten().expand(3))


def test_flow_sde_mean_at_zero_noise_is_the_euler_step():
    g = torch.Generator().manual_seed(1)
    sigmas = torch.tensor([1.0, 0.7, 0.3, 0.0])
    schedule = sde.FlowSchedule(sigmas, sigmas[:-1] * 1000)
    x, v = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    for step in range(3):
        index = torch.full((2,), step)
        euler = x + v * (sigmas[step + 1] - sigmas[step])
        torch.testing.assert_close(schedule.step(x, v, index, 1e-8)[0], euler)
        mean, std = schedule.step(x, v, index, 0.0)
        torch.testing.assert_close(mean, euler)
        assert (std == 0).all()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_step_and_log_prob_by_hand(prediction):
    x, out, a, a_prev, eta, x_next = 0.4, 0.9, 0.5, 0.8, 1.0, 0.2
    if prediction == "epsilon":
        eps, x0 = out, (x - math.sqrt(1 - a) * out) / math.sqrt(a)
    else:
        eps, x0 = math.sqrt(a) * out + math.sqrt(1 - a) * x, math.sqrt(a) * x - math.sqrt(1 - a) * out
    std = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))  # sqrt(0.4 * 0.375)
    mean = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std**2) * eps
    schedule = sde.DDIMSchedule(torch.tensor([999, 500]), torch.tensor([0.1, a]), torch.tensor([0.5, a_prev]),
                                prediction, None)
    got_mean, got_std = schedule.step(torch.tensor([[x]]), torch.tensor([[out]]), torch.tensor([1]), eta)
    assert got_mean.item() == pytest.approx(mean, rel=1e-5) and got_std.item() == pytest.approx(std, rel=1e-5)
    log_prob = sde.gaussian_log_prob(torch.tensor([[x_next]]), got_mean, got_std)
    assert log_prob.item() == pytest.approx(normal_log_prob(x_next, mean, std), rel=1e-5)


def test_clipped_objective_by_hand():
    eps = 0.2
    log_ratio = torch.tensor([math.log(1.1), math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5)])
    advantages = torch.tensor([2.0, 1.0, 1.0, -1.0, -1.0])
    loss, ratio = sde.clipped_objective(log_ratio, torch.zeros(5), advantages, eps)
    # inside: 1.1 * 2; A > 0: min(1.5, 1.2) and min(0.5, 0.8); A < 0: min(-1.5, -1.2) and min(-0.5, -0.8)
    per_sample = [1.1 * 2, 1.2, 0.5, -1.5, -0.8]
    assert loss.item() == pytest.approx(-sum(per_sample) / 5, rel=1e-6)
    torch.testing.assert_close(ratio, log_ratio.exp())


def test_trained_steps_and_the_sliding_window():
    g = torch.Generator().manual_seed(0)
    assert grpo.trained_steps([0, 1, 2, 3, 4], 2, 0.6, "first", g, torch.device("cpu")).tolist() == [[0, 1, 2]] * 2
    chosen = grpo.trained_steps([0, 1, 2, 3, 4], 50, 0.4, "random", g, torch.device("cpu"))
    assert chosen.shape == (50, 2) and (chosen[:, 0] < chosen[:, 1]).all() and len(set(chosen[:, 0].tolist())) > 1
    assert grpo.stochastic_steps(6, 0, 0) == list(range(6)) and grpo.stochastic_steps(6, 2, 3) == [3, 4]
    assert [grpo.window_start(step, 6, 2, 10) for step in (0, 9, 10, 49, 50)] == [0, 0, 1, 4, 0]


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_a_short_flow_grpo_run(tiny_family, prompts, tmp_path, kind):
    output = tmp_path / "run"
    assert main(["diffusion", "grpo", "--model", str(tiny_family(kind)), "--prompts", str(prompts), "--output",
                 str(output), "--max-steps", "3", "--batch-size", "2", "--samples-per-prompt", "2", "--sample-steps",
                 "3", "--num-samples", "1", "--report-to", "none", "--checkpoint-every", "0", "--resolution", "32",
                 "--guidance-scale", "2", "--train-steps-fraction", "0.7"]) == 0
    history = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 3
    assert {"reward", "advantage", "ratio", "clip_fraction", "kl", "approx_kl", "diversity"} <= set(history[0])
    assert history[0]["ratio"] == pytest.approx(1.0, abs=1e-5) and history[0]["kl"] == 0.0  # on-policy, LoRA at 0
    for name in ("samples_before.png", "samples_after.png", "curves.png", "pytorch_lora_weights.safetensors"):
        assert (output / name).is_file(), name


def test_ddpo_on_a_diffusion_model_moves_off_policy(tiny_sd, prompts, tmp_path):
    cfg = grpo.Config(model=str(tiny_sd), prompts=str(prompts), output=tmp_path / "run", max_steps=2, batch_size=2,
                      samples_per_prompt=2, sample_steps=3, num_samples=0, report_to="none", checkpoint_every=0,
                      learning_rate=1e-2, sde_window=2, shared_noise=True)
    first, second = grpo.run(cfg)
    assert first["ratio"] == pytest.approx(1.0, abs=1e-6) and first["clip_fraction"] == 0.0
    assert second["ratio"] != pytest.approx(1.0, abs=1e-6) and second["clip_fraction"] > 0  # the rollout's second part
    assert second["kl"] > 0


def test_resume_is_exact_across_a_split_rollout(tiny_family, prompts, tmp_path):
    def config(output, steps, **kw):
        return grpo.Config(model=str(tiny_family("sd3")), prompts=str(prompts), output=output, max_steps=steps,
                           batch_size=2, samples_per_prompt=2, sample_steps=2, num_samples=0, report_to="none",
                           updates_per_rollout=4, learning_rate=1e-2, resolution=32, checkpoint_every=2, **kw)
    whole = grpo.run(config(tmp_path / "whole", 4))
    grpo.run(config(tmp_path / "split", 2))  # stops with two parts of the rollout still to train on
    resumed = grpo.run(config(tmp_path / "split", 4, resume="latest"))
    assert [row["loss"] for row in resumed] == pytest.approx([row["loss"] for row in whole[2:]], abs=0, rel=0)
    weights = [load_file(str(tmp_path / run / "pytorch_lora_weights.safetensors")) for run in ("whole", "split")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_bad_settings_name_their_option(prompts, tmp_path):
    common = dict(model="m", prompts=str(prompts), output=tmp_path / "run")
    for settings, flag in [({"samples_per_prompt": 1}, "--samples-per-prompt 1"),
                           ({"sde_window": 5, "sample_steps": 4}, "--sde-window 5"),
                           ({"train_steps_fraction": 0.0}, "--train-steps-fraction 0.0"),
                           ({"updates_per_rollout": 3, "batch_size": 2, "samples_per_prompt": 2},
                            "--updates-per-rollout 3"),
                           ({"clip_range": 0.0}, "--clip-range 0.0")]:
        with pytest.raises(ConfigError, match=flag):
            grpo.Config(**common, **settings)


@pytest.mark.slow
def test_two_processes_standardise_their_own_groups(tiny_family, prompts, tmp_path, cpu_launch):
    """Each process expands its prompts into their K samples, so a group lives on one process: with K = 2 every
    advantage is +-1/sqrt(2) (two samples standardised with Bessel's std; the 1e-6 added to the std lowers it a little
    at the tiny model's reward spread of about 1e-3), on both processes alike."""
    import os
    import subprocess

    path = tmp_path / "four.txt"
    path.write_text("a red circle\na blue square\na green triangle\na yellow circle\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    command = [*cpu_launch, "-m", "mmalign", "diffusion", "grpo", "--model", str(tiny_family("sd3")), "--prompts",
               str(path), "--output", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "1",
               "--samples-per-prompt", "2", "--sample-steps", "2", "--cpu", "--num-samples", "0", "--report-to",
               "none", "--resolution", "32", "--guidance-scale", "1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["advantage"] for row in history] == pytest.approx([2**-0.5] * 2, abs=3e-3)
    assert history[1]["ratio"] != 1.0  # the second micro-step trains on the rollout after an update, through DDP


@pytest.mark.slow
def test_flow_grpo_raises_the_held_out_placement_reward_of_the_flow_twin(embedded, tmp_path):
    """Flow-GRPO (LoRA, no guidance, half the steps trained) on the embedded flow twin, rewarded by placement: 72
    paired fixed-seed samples improve, and the colour asked for and the diversity are kept."""
    cfg = grpo.Config(model=str(FLOW_TWIN), prompts=str(ASSETS / "tiny-sd-prompts.txt"), output=tmp_path / "run",
                      reward=world.reward, max_steps=24, batch_size=4, samples_per_prompt=4, sample_steps=6,
                      guidance_scale=1.0, beta=0.0, train_steps_fraction=0.5, learning_rate=1e-3, num_samples=0,
                      report_to="none", checkpoint_every=0)
    grpo.run(cfg)
    summary = embedded.reward_run_summary(cfg)
    print(summary)
    assert summary["gain"]["ci_low"] > 0, summary
    assert summary["colour_match"] > 0.9, summary
    assert summary["diversity_ratio"] > 0.5, summary
