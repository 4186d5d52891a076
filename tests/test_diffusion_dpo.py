"""Diffusion-DPO: the loss against the official formula, shared noise and timestep, one policy and one reference
forward per step, ln 2 at step 0, LoRA and full fine-tune outputs loaded back through diffusers, exact resume."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer

from mmalign.data import Guarded
from mmalign.diffusion import base, dpo, pairwise
from mmalign.diffusion.data import PreferencePairs, collate_pairs, write_pickapic
from mmalign.diffusion.models import load_pipeline
from mmalign.diffusion.sample import generate
from mmalign.diffusion.world import preference_pairs
from mmalign.errors import BadRow, ConfigError, DataError, RunFolderError
from mmalign.reference import FrozenCopy
from mmalign.trainer import Trainer, step_generator

CAPTIONS = ["a red circle", "a blue square"]


def config(tiny_sd, pickapic, tmp_path, **overrides):
    settings = dict(model=str(tiny_sd), data=str(pickapic), output=tmp_path / "run", max_steps=2, batch_size=2,
                    num_samples=0, report_to="none", checkpoint_every=0)
    settings.update(overrides)
    return dpo.Config(**settings)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_equals_the_official_formula():
    """diffusers examples/research_projects/diffusion_dpo/train_diffusion_dpo.py, written out on fixed tensors."""
    torch.manual_seed(0)
    pred, ref_pred, target = torch.randn(3, 8, 4, 5, 5)
    model_losses = (pred - target).pow(2).mean(dim=[1, 2, 3])
    ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
    model_w, model_l = model_losses.chunk(2)
    ref_w, ref_l = ref_losses.chunk(2)
    beta = 5000.0
    inside = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))
    official = -F.logsigmoid(inside).mean()
    implicit_acc = (inside > 0).float().mean()

    losses, stats = pairwise.dpo_loss(model_losses, ref_losses, beta=beta)
    torch.testing.assert_close(losses.mean(), official)
    torch.testing.assert_close(stats["implicit_acc"], implicit_acc)
    torch.testing.assert_close(stats["reward_margin"], inside.mean())
    # diffusers' form: -beta' * (...) with beta' = beta / 2 is the same objective
    torch.testing.assert_close(-F.logsigmoid(-2500.0 * ((model_w - model_l) - (ref_w - ref_l))).mean(), official)


def test_one_step_shares_noise_and_timestep_and_runs_two_forwards(tiny_sd, pickapic, tmp_path, monkeypatch):
    cfg = config(tiny_sd, pickapic, tmp_path, prompt_dropout=0.0)
    trainer = Trainer(cfg)
    pipe, parts = base.prepare(cfg, trainer)
    pairs = PreferencePairs(cfg.data, resolution=parts.resolution)
    batch = collate_pairs([pairs[0], pairs[1], pairs[2]])
    calls, noises = [], []
    forward = type(pipe.unet).forward

    def recording_forward(self, sample, timestep, *args, **kwargs):
        lora_on = any(not m.disable_adapters for m in self.modules() if isinstance(m, BaseTunerLayer))
        calls.append((sample.shape[0], torch.is_grad_enabled(), timestep.clone(), lora_on))
        return forward(self, sample, timestep, *args, **kwargs)

    add_noise = parts.noise_scheduler.add_noise
    monkeypatch.setattr(type(pipe.unet), "forward", recording_forward)
    monkeypatch.setattr(parts.noise_scheduler, "add_noise", lambda x, n, t: noises.append(n) or add_noise(x, n, t))
    loss, stats = dpo.dpo_step(pipe.unet, batch, step_generator(0, 0, 0, torch.device("cpu")), parts)

    assert [(c[0], c[1]) for c in calls] == [(6, True), (6, False)]
    assert calls[0][3] and not calls[1][3], "policy forward with the LoRA on, reference with it off"
    for timesteps in (calls[0][2], calls[1][2]):
        torch.testing.assert_close(timesteps[:3], timesteps[3:])
    torch.testing.assert_close(noises[0][:3], noises[0][3:])
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # zero-initialised LoRA: policy == reference
    assert stats["implicit_acc"].item() == 0.5


def test_lora_run_starts_at_ln2_and_round_trips_through_diffusers(tiny_sd, pickapic, tmp_path):
    cfg = config(tiny_sd, pickapic, tmp_path, max_steps=3, learning_rate=1e-2, lora_rank=4)
    dpo.run(cfg)
    log = metrics(cfg.output)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and log[0]["implicit_acc"] == 0.5
    assert {"implicit_acc", "model_mse", "ref_mse", "reward_margin", "lr"} <= set(log[0])
    assert log[-1]["model_mse"] != log[-1]["ref_mse"]

    base = StableDiffusionPipeline.from_pretrained(tiny_sd)
    base.set_progress_bar_config(disable=True)
    before = generate(base, CAPTIONS, seed=7, steps=4)
    base.load_lora_weights(cfg.output)
    after = generate(base, CAPTIONS, seed=7, steps=4)
    assert (after - before).abs().max() > 1e-3, "the trained LoRA changes the images"

    # the same LoRA applied in-process by peft, without the diffusers file round trip
    trained = StableDiffusionPipeline.from_pretrained(tiny_sd)
    trained.set_progress_bar_config(disable=True)
    from safetensors.torch import load_file

    from mmalign.diffusion.models import add_lora

    add_lora(trained.unet, rank=4)
    state = load_file(str(cfg.output / "pytorch_lora_weights.safetensors"))
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(trained.unet, convert_unet_state_dict_to_peft(
        {k.removeprefix("unet."): v for k, v in state.items()}))
    torch.testing.assert_close(generate(trained, CAPTIONS, seed=7, steps=4), after, rtol=0, atol=1e-5)


def test_full_fine_tune_keeps_a_frozen_reference_and_saves_a_pipeline(tiny_sd, pickapic, tmp_path):
    cfg = config(tiny_sd, pickapic, tmp_path, full=True, max_steps=2, learning_rate=1e-3)
    trainer = Trainer(cfg)
    pipe, parts = base.prepare(cfg, trainer)
    assert isinstance(parts.reference, FrozenCopy)
    assert all(p.requires_grad for p in pipe.unet.parameters())
    assert not any(p.requires_grad for p in parts.reference.model.parameters())

    cfg2 = config(tiny_sd, pickapic, tmp_path, full=True, max_steps=2, learning_rate=1e-3, output=tmp_path / "full")
    dpo.run(cfg2)
    saved = StableDiffusionPipeline.from_pretrained(cfg2.output)
    original = StableDiffusionPipeline.from_pretrained(tiny_sd)
    changed = [n for (n, a), b in zip(saved.unet.named_parameters(), original.unet.parameters())
               if not torch.equal(a, b)]
    assert changed, "the saved UNet is the trained one"
    for a, b in zip(saved.vae.parameters(), original.vae.parameters()):
        assert torch.equal(a, b)


def test_resume_equals_uninterrupted(tiny_sd, pickapic, tmp_path):
    full = config(tiny_sd, pickapic, tmp_path, output=tmp_path / "full", max_steps=4, learning_rate=1e-3)
    dpo.run(full)
    part = config(tiny_sd, pickapic, tmp_path, output=tmp_path / "part", max_steps=2, learning_rate=1e-3)
    dpo.run(part)
    dpo.run(config(tiny_sd, pickapic, tmp_path, output=tmp_path / "part", max_steps=4, learning_rate=1e-3,
                   resume="latest"))
    assert [r["loss"] for r in metrics(tmp_path / "part")] == [r["loss"] for r in metrics(tmp_path / "full")]


def test_v_prediction_target(tiny_sd, tmp_path):
    from diffusers import DDPMScheduler

    from mmalign.diffusion.scoring import training_target

    scheduler = DDPMScheduler(prediction_type="v_prediction")
    x0, noise, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(training_target(scheduler, x0, noise, t), abar.sqrt() * noise - (1 - abar).sqrt() * x0)
    assert training_target(DDPMScheduler(), x0, noise, t) is noise
    with pytest.raises(ValueError, match="sample"):
        training_target(DDPMScheduler(prediction_type="sample"), x0, noise, t)


PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "v_prediction": "StableDiffusionPipeline",
             "sd3": "StableDiffusion3Pipeline"}


@pytest.mark.parametrize("variant", list(PIPELINES))
def test_sdxl_v_prediction_and_sd3_models_train(variant, pickapic, tmp_path):
    from mmalign.diffusion.tiny import tiny_pipeline

    model = tmp_path / variant
    tiny_pipeline(kind="sd" if variant == "v_prediction" else variant,
                  prediction_type="v_prediction" if variant == "v_prediction" else "epsilon").save_pretrained(model)
    cfg = config(model, pickapic, tmp_path, max_steps=2, learning_rate=1e-3)
    dpo.run(cfg)
    log = metrics(cfg.output)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert log[1]["loss"] != log[0]["loss"]
    pipe = load_pipeline(model)
    assert type(pipe).__name__ == PIPELINES[variant]
    pipe.load_lora_weights(cfg.output)


def test_bf16_mixed_precision_keeps_lora_weights_in_float32(tiny_sd, pickapic, tmp_path):
    cfg = config(tiny_sd, pickapic, tmp_path, mixed_precision="bf16", max_steps=2, learning_rate=1e-3)
    trainer = Trainer(cfg)
    pipe, parts = base.prepare(cfg, trainer)
    dtypes = {n: p.dtype for n, p in pipe.unet.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora" not in n} == {torch.bfloat16}
    assert pipe.vae.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    dpo.run(config(tiny_sd, pickapic, tmp_path, mixed_precision="bf16", max_steps=2, learning_rate=1e-3,
                   output=tmp_path / "bf16"))
    log = metrics(tmp_path / "bf16")
    assert all(math.isfinite(r["loss"]) for r in log) and log[0]["implicit_acc"] == 0.5


def test_cached_latents_give_the_same_step_as_encoding_each_time(tiny_sd, pickapic, tmp_path):
    cfg = config(tiny_sd, pickapic, tmp_path)
    trainer = Trainer(cfg)
    pipe, parts = base.prepare(cfg, trainer)
    pairs = PreferencePairs(cfg.data, resolution=parts.resolution)
    cached = pairwise.cache_pair_latents(pipe.vae, pairs, torch.float32, "cpu", batch_size=5)
    assert len(cached) == len(pairs)
    items = [0, 3, 4]
    fresh = dpo.dpo_step(pipe.unet, collate_pairs([pairs[i] for i in items]), step_generator(0, 9, 0, "cpu"), parts)
    reused = dpo.dpo_step(pipe.unet, collate_pairs([cached[i] for i in items]), step_generator(0, 9, 0, "cpu"), parts)
    torch.testing.assert_close(reused[1]["model_mse"], fresh[1]["model_mse"])
    torch.testing.assert_close(reused[0], fresh[0])
    with pytest.raises(ValueError, match="exclude each other"):
        config(tiny_sd, pickapic, tmp_path, cache_latents=True, random_flip=True)


def test_the_latent_cache_stops_at_a_bad_pair_or_leaves_it_for_training_to_skip(tiny_sd, tmp_path):
    rows = preference_pairs(5, seed=0)
    for row in rows:
        row["label_0"] = 1.0
    rows[2]["jpg_1"] = b"not an image"
    pairs = PreferencePairs(write_pickapic(rows, tmp_path / "pairs.parquet"), resolution=32)
    vae = load_pipeline(tiny_sd).vae
    with pytest.raises(DataError, match=r"pairs.parquet: record 2, field 'jpg_1': cannot be read .*met while caching "
                                        "latents, before training: nothing was trained.*--bad-rows skip"):
        pairwise.cache_pair_latents(vae, pairs, torch.float32, "cpu", batch_size=2)
    cached = pairwise.cache_pair_latents(vae, pairs, torch.float32, "cpu", batch_size=2, bad_rows="skip")
    with pytest.raises(BadRow, match="record 2, field 'jpg_1'"):
        cached[2]
    item, bad = Guarded(cached, skip=True)[2]  # what training does with it under --bad-rows skip
    assert item["index"] == 3 and [(row.index, row.field) for row in bad] == [(2, "jpg_1")]
    fresh = pairwise.encode_pairs(vae, pairs[3]["pixel_values"][None], torch.float32)[0]
    torch.testing.assert_close(item["latent_mean"], torch.stack(fresh.chunk(2), dim=1)[0])


@pytest.mark.slow
def test_a_compiled_denoiser_gives_the_eager_run_and_saves_a_loadable_lora(tiny_sd, pickapic, tmp_path, monkeypatch):
    """--compile traces the denoiser with TorchDynamo and AOTAutograd (forward and backward graphs, the LoRA layers
    inside them); the graphs run eagerly here (backend aot_eager), for inductor's C++ build of a CPU kernel per graph
    takes minutes on two cores and tests torch, not mmalign."""
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend="aot_eager", **kw))
    eager = config(tiny_sd, pickapic, tmp_path / "eager", max_steps=3, learning_rate=1e-2)
    compiled = config(tiny_sd, pickapic, tmp_path / "compiled", max_steps=3, learning_rate=1e-2, compile=True)
    dpo.run(eager)
    dpo.run(compiled)
    for a, b in zip(metrics(eager.output), metrics(compiled.output)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-5)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_lora_weights(compiled.output)


def test_from_python_bad_input_stops_before_the_run_folder_exists(tiny_sd, pickapic, tmp_path):
    """Trainer creation writes nothing; the data, the grid prompts and the model are checked before `trainer.begin`."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": "a red circle", "jpg_0": "../a.png", "jpg_1": "b.png", "label_0": 1}\n')
    with pytest.raises(DataError, match="record 0, field 'jpg_0': cannot be read .* is outside the data folder"):
        dpo.run(config(tiny_sd, bad, tmp_path))
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("un carré rouge\n".encode("latin-1"))
    with pytest.raises(DataError, match="prompts.txt: line 1 is not UTF-8"):
        dpo.run(config(tiny_sd, pickapic, tmp_path, sample_prompts=str(prompts), num_samples=1))
    sample_model = tmp_path / "sample-prediction"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.scheduler.register_to_config(prediction_type="sample")
    pipe.save_pretrained(sample_model)
    with pytest.raises(ConfigError, match="scheduler predicts 'sample'; training supports epsilon and v_prediction"):
        dpo.run(config(sample_model, pickapic, tmp_path))
    assert not (tmp_path / "run").exists()


def test_the_demo_checks_its_captions_and_claims_its_folder(tmp_path):
    from mmalign.diffusion import demo

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na purple dragon\n")
    with pytest.raises(DataError, match="'a purple dragon' is not of the form 'a <colour> <shape>'"):
        demo.run(demo.Config(output=tmp_path / "new", sample_prompts=str(prompts)))
    assert not (tmp_path / "new").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("the user's notes\n")
    with pytest.raises(RunFolderError, match="is not empty"):
        demo.run(demo.Config(output=tmp_path / "full"))
    assert (tmp_path / "full" / "notes.txt").read_text() == "the user's notes\n"


def test_the_demo_needs_its_evaluation_prompts(tmp_path, refused):
    config = tmp_path / "demo.yaml"
    config.write_text("sample_prompts: null\n")
    message = refused("demo", "--config", config, "--output", tmp_path / "run", output=tmp_path / "run")
    assert "key 'sample_prompts': a value is required" in message
