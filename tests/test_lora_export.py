"""Exported LoRAs with alpha != rank reproduce the trained model when loaded by diffusers, by peft and by mmalign.

Every family (SD, SDXL, SD3, SD3.5, FLUX.1, text-to-video UNet3D and Wan 2.1, LLaVA) gets a rank-4 LoRA at alpha 16
and alpha 1 with random non-zero weights; its output on fixed inputs must come back from every loader to within
TOLERANCE (float32, CPU: the loaded adapter computes the same products, only a merged one rounds differently).
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from mmalign.diffusion.models import (
    LORA_TARGETS,
    add_lora,
    denoiser_name,
    denoiser_of,
    load_pipeline,
    sampling_pipeline,
    save_lora,
)
from mmalign.vision import models as vision_models
from mmalign.vision.tiny import tiny_llava

RANK = 4
TOLERANCE = 1e-5
CASES = [("sd", LORA_TARGETS), ("sd", (*LORA_TARGETS, "conv1", "conv2")), ("sdxl", LORA_TARGETS),
         ("sd3", LORA_TARGETS), ("sd35", LORA_TARGETS), ("flux", LORA_TARGETS), ("video", LORA_TARGETS),
         ("wan", LORA_TARGETS)]


@pytest.fixture(scope="module")
def tiny_models(tiny_family, tiny_dir):
    """kind -> folder of a saved tiny pipeline (sd, sdxl, sd3, sd35, flux, video, wan) or LLaVA model and
    processor."""
    return {**{kind: tiny_family(kind) for kind, _ in CASES}, "llava": tiny_dir}


def perturb(model) -> None:
    """Random non-zero LoRA weights (B starts at zero, which would hide any scale)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.1)


def denoiser_inputs(denoiser) -> dict:
    """Fixed inputs for one forward of a UNet2D/3D or an SD3, FLUX or Wan transformer (two samples, two timesteps)."""
    generator = torch.Generator().manual_seed(0)
    c = denoiser.config
    size, timestep = c.get("sample_size", 4), torch.tensor([10.0, 500.0])

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    if type(denoiser).__name__ == "FluxTransformer2DModel":
        return dict(hidden_states=randn(2, 16, c.in_channels), timestep=timestep / 1000,
                    guidance=torch.tensor([3.5, 3.5]), encoder_hidden_states=randn(2, 5, c.joint_attention_dim),
                    pooled_projections=randn(2, c.pooled_projection_dim), txt_ids=torch.zeros(5, 3),
                    img_ids=torch.rand(16, 3, generator=generator) * 4)
    if type(denoiser).__name__ == "WanTransformer3DModel":
        return dict(hidden_states=randn(2, c.in_channels, 2, 4, 4), timestep=timestep,
                    encoder_hidden_states=randn(2, 5, c.text_dim))
    if type(denoiser).__name__ == "SD3Transformer2DModel":
        return dict(hidden_states=randn(2, c.in_channels, size, size), timestep=timestep,
                    encoder_hidden_states=randn(2, 5, c.joint_attention_dim),
                    pooled_projections=randn(2, c.pooled_projection_dim))
    frames = (3,) if type(denoiser).__name__ == "UNet3DConditionModel" else ()
    inputs = dict(sample=randn(2, c.in_channels, *frames, size, size), timestep=timestep,
                  encoder_hidden_states=randn(2, 5, c.cross_attention_dim))
    if c.get("addition_embed_type") == "text_time":
        time_ids = 6 * c.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": randn(2, c.projection_class_embeddings_input_dim - time_ids),
                                       "time_ids": randn(2, 6)}
    return inputs


def denoise(denoiser) -> torch.Tensor:
    with torch.no_grad():
        return denoiser(**denoiser_inputs(denoiser), return_dict=False)[0]


def peft_loaded(folder, output):
    """The denoiser with the saved LoRA applied by peft alone, from the config the export carries."""
    from peft import LoraConfig, PeftModel, inject_adapter_in_model, set_peft_model_state_dict

    pipe = load_pipeline(folder)
    model, name = denoiser_of(pipe), denoiser_name(pipe)
    if (output / "adapter_config.json").is_file():  # peft's own adapter files, injected into `model` in place
        PeftModel.from_pretrained(model, str(output))
        return model
    with safe_open(str(output / "pytorch_lora_weights.safetensors"), "pt") as file:
        metadata = json.loads(file.metadata()["lora_adapter_metadata"])
    config = LoraConfig(**{k.removeprefix(f"{name}."): v for k, v in metadata.items() if k.startswith(f"{name}.")})
    state = load_file(str(output / "pytorch_lora_weights.safetensors"))
    inject_adapter_in_model(config, model)
    result = set_peft_model_state_dict(model, {k.removeprefix(f"{name}."): v for k, v in state.items()})
    assert not result.unexpected_keys
    return model


def diffusers_loaded(folder, output):
    """The denoiser of a fresh pipeline after diffusers' own `load_lora_weights`."""
    pipe = load_pipeline(folder)
    pipe.load_lora_weights(str(output))
    return denoiser_of(pipe)


def mmalign_loaded(folder, output):
    """The denoiser of mmalign's sampling pipeline (`diffusion sample`, `diffusion rlg`) with the LoRA."""
    return denoiser_of(sampling_pipeline(folder, lora=str(output), cpu=True))


LOADERS = {"diffusers": diffusers_loaded, "peft": peft_loaded, "mmalign": mmalign_loaded}


@pytest.mark.parametrize("alpha", [16, 1])
@pytest.mark.parametrize("kind,targets", CASES, ids=["sd", "sd-conv", "sdxl", "sd3", "sd35", "flux", "video", "wan"])
def test_diffusion_lora_reloads_to_the_trained_denoiser(tiny_models, tmp_path, kind, targets, alpha):
    pipe = load_pipeline(tiny_models[kind])
    trained = denoiser_of(pipe)
    add_lora(trained, RANK, alpha, targets)
    perturb(trained)
    expected = denoise(trained)
    save_lora(pipe, trained, tmp_path)
    # the text-to-video UNet has no diffusers LoRA loader: its adapter is peft's files
    loaders = {k: v for k, v in LOADERS.items() if k != "diffusers" or kind != "video"}
    gaps = {loader: (denoise(load(tiny_models[kind], tmp_path)) - expected).abs().max().item()
            for loader, load in loaders.items()}
    assert max(gaps.values()) <= TOLERANCE, f"max |loaded - trained| by loader: {gaps}"


def llava_logits(model) -> torch.Tensor:
    """Logits of one fixed image + question."""
    processor = tiny_llava(seed=0)[1]
    image = Image.fromarray((np.arange(32 * 32 * 3) % 251).reshape(32, 32, 3).astype(np.uint8))
    batch = processor(images=image, text="user : <image> what colour is the circle assistant :", return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("alpha", [16, 1])
def test_vision_lora_reloads_to_the_trained_model(tiny_models, tmp_path, alpha):
    from peft import PeftModel

    from mmalign.vision import demo

    model, processor = vision_models.load(tiny_models["llava"])
    trained = vision_models.add_lora(model, RANK, alpha, vision_models.LORA_TARGETS)
    perturb(trained)
    expected = llava_logits(trained)
    vision_models.save(trained, processor, tmp_path)
    loaded = {"peft": PeftModel.from_pretrained(vision_models.load(tiny_models["llava"])[0], str(tmp_path)),
              "mmalign": demo.load_aligned(demo.Config(model=str(tiny_models["llava"]), output=tmp_path, full=False))}
    gaps = {loader: (llava_logits(model) - expected).abs().max().item() for loader, model in loaded.items()}
    assert max(gaps.values()) <= TOLERANCE, f"max |loaded - trained| by loader: {gaps}"


@pytest.mark.parametrize("kind,targets", [("video", ("to_q", "conv1")), ("sd", ("nothing_here",))])
def test_targets_a_lora_cannot_fit_are_refused_by_name(tiny_models, kind, targets):
    """The text-to-video UNet's temporal conv1 is a Sequential; `nothing_here` names no module."""
    from mmalign.errors import ConfigError

    with pytest.raises(ConfigError, match=f"--lora-targets {' '.join(targets)}: no LoRA fits"):
        add_lora(denoiser_of(load_pipeline(tiny_models[kind])), RANK, 16, targets)
