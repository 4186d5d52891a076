"""InPO: the published inversion grid, DDIM inversion by hand, one timestep per batch, inversion without gradients,
ln 2 at step 0, learning."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler

from mmalign.diffusion import base, inpo
from mmalign.diffusion.data import PreferencePairs, collate_pairs
from mmalign.diffusion.scoring import Condition
from mmalign.diffusion.tiny import sd_scheduler
from mmalign.trainer import Trainer, step_generator


class ConstantEps(torch.nn.Module):
    """A stand-in denoiser predicting the same noise everywhere, recording the timesteps it saw."""

    def __init__(self, eps):
        super().__init__()
        self.eps, self.seen = eps, []

    def forward(self, sample, timestep, **condition):
        x, t = sample, timestep
        self.seen.append(int(t[0]))
        return SimpleNamespace(sample=self.eps.expand_as(x))


def inverse_scheduler(steps=10, prediction_type="epsilon", spacing="leading"):
    inverse = DDIMInverseScheduler.from_config(sd_scheduler(prediction_type).config, timestep_spacing=spacing)
    inverse.set_timesteps(steps)
    return inverse


def published_grid(num_train, steps, offset, spacing):
    """The inversion grid of diffusers 0.20.0's DDIMInverseScheduler.set_timesteps (pinned by JaydenLyh/InPO)."""
    if spacing == "leading":
        ratio = num_train // steps
        grid = (np.arange(0, steps) * ratio).round().astype(np.int64) + offset
    else:
        ratio = num_train / steps
        grid = np.round(np.arange(num_train, 0, -ratio)[::-1]).astype(np.int64) - 1
    grid = np.roll(grid, 1)
    grid[0] = int(grid[1] - ratio)
    return grid.tolist()


@pytest.mark.parametrize("steps", [10, 20, 4])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_inversion_grid_is_the_published_one(steps, spacing):
    grid = inpo.inversion_grid(inverse_scheduler(steps, spacing=spacing))
    assert grid == published_grid(1000, steps, 1, spacing)
    if (steps, spacing) == (10, "leading"):
        assert grid == [-99, 1, 101, 201, 301, 401, 501, 601, 701, 801]


def test_ddim_inversion_by_hand():
    inverse = inverse_scheduler()
    abar = inverse.alphas_cumprod
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(1, 4, 3, 3)
    unet = ConstantEps(eps)
    cond = Condition({"encoder_hidden_states": torch.zeros(2, 1, 8)})
    gen = torch.Generator().manual_seed(0)
    out = inpo.ddim_invert(unet, x0, 250, cond, inverse, gen, eta=0.1)
    assert unet.seen == [-99, 1, 101, 201]  # every published grid point below t = 250

    x, draws = x0.clone(), torch.Generator().manual_seed(0)
    levels = [abar[0], abar[1], abar[101], abar[201], abar[301]]  # from x0 (alphas_cumprod[0]: set_alpha_to_one=False)
    for a, a_next in zip(levels[:-1], levels[1:]):
        pred_x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_next.sqrt() * pred_x0 + (1 - a_next).sqrt() * eps
        var = (1 - a) / (1 - a_next) * (1 - a_next / a)  # the interval just crossed
        x = x + 0.1 * var.sqrt() * torch.randn(x.shape, generator=draws)
    torch.testing.assert_close(out, x)


@pytest.mark.parametrize(("t", "level"), [(0, 1), (1, 1), (2, 101), (101, 101), (102, 201), (901, 901), (999, 901)])
def test_inversion_ends_at_the_first_grid_level_at_or_above_t(t, level):
    """Without noise and with a constant eps, x ends exactly on the DDIM path sqrt(a) x0' + sqrt(1 - a) eps."""
    inverse = inverse_scheduler()
    abar = inverse.alphas_cumprod
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(1, 4, 3, 3)
    cond = Condition({"encoder_hidden_states": torch.zeros(2, 1, 8)})
    out = inpo.ddim_invert(ConstantEps(eps), x0, t, cond, inverse, torch.Generator(), eta=0.0)
    start = (x0 - (1 - abar[0]).sqrt() * eps) / abar[0].sqrt()
    torch.testing.assert_close(out, abar[level].sqrt() * start + (1 - abar[level]).sqrt() * eps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_move_is_diffusers_inverse_step_between_the_same_levels(prediction_type):
    """This diffusers' DDIMInverseScheduler.step(pred, s + stride, x) moves x from level s to s + stride."""
    inverse = inverse_scheduler(prediction_type=prediction_type)
    abar = inverse.alphas_cumprod
    x, prediction = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    for s in (-99, 1, 401, 801):
        a = abar[s] if s >= 0 else inverse.initial_alpha_cumprod
        moved = inpo.ddim_move(inverse, x, prediction, a, abar[s + 100])
        torch.testing.assert_close(moved, inverse.step(prediction, s + 100, x).prev_sample)


def test_one_timestep_per_batch_and_only_the_policy_forward_has_gradients(tiny_sd, pickapic, tmp_path, monkeypatch):
    cfg = inpo.Config(model=str(tiny_sd), data=str(pickapic), output=tmp_path / "run", max_steps=1, batch_size=3,
                      num_samples=0, report_to="none", checkpoint_every=0, prompt_dropout=0.0)
    trainer = Trainer(cfg)
    pipe, parts = base.prepare(cfg, trainer)
    pairs = PreferencePairs(cfg.data, resolution=parts.resolution)
    batch = collate_pairs([pairs[i] for i in range(3)])
    calls = []
    forward = type(pipe.unet).forward

    def recording(self, sample, timestep, *args, **kwargs):
        t = torch.as_tensor(timestep)
        calls.append((sample.shape[0], torch.is_grad_enabled(), t.unique().tolist()))
        return forward(self, sample, timestep, *args, **kwargs)

    monkeypatch.setattr(type(pipe.unet), "forward", recording)
    step = inpo.make_step(parts)
    loss, stats = step(pipe.unet, batch, step_generator(0, 4, 0, torch.device("cpu")))
    *inversion, policy, reference = calls
    t = policy[2]
    assert len(t) == 1 and reference[2] == t
    assert [c[2][0] for c in inversion] == [s for s in [-99, *range(1, 900, 100)] if s < t[0]]
    assert all(size == 6 for size, _, _ in calls)
    assert [grad for _, grad, _ in calls] == [False] * len(inversion) + [True, False]
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_cli_run_starts_at_ln2(tiny_sd, pickapic, tmp_path):
    from mmalign.cli import main

    assert main(["diffusion", "inpo", "--model", str(tiny_sd), "--data", str(pickapic), "--output",
                 str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "2", "--num-samples", "0",
                 "--report-to", "none", "--learning-rate", "1e-3"]) == 0
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and len(log) == 2
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_inpo_learns_the_training_preference(embedded, tmp_path):
    """Implicit accuracy at the inverted latents rises, and so does the held-out placement reward (BENCHMARKS.md,
    "InPO against the published code": +0.153, 95% CI +0.096..+0.210 at these settings)."""
    config = embedded.config(inpo, tmp_path / "run", beta=2000, max_steps=150, batch_size=8)
    history = inpo.run(config)
    first, last = (sum(r["implicit_acc"] for r in rows) / len(rows) for rows in (history[:30], history[-50:]))
    assert last > 0.8 and last > first + 0.1, (first, last)
    gain, _ = embedded.gain(config, seed=6000)
    assert gain["ci_low"] > 0, gain
