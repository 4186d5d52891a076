"""Every diffusion family's training forward is the pipeline's own denoiser call (Wan's video transformer too);
FLUX's packing is diffusers'."""

import inspect

import pytest
import torch
from diffusers import FluxPipeline

from mmalign.diffusion import flux
from mmalign.diffusion.base import native_resolution
from mmalign.diffusion.models import denoiser_of, load_pipeline
from mmalign.diffusion.scoring import encode_prompts, predict

IMAGE_FAMILIES = ["sd", "sdxl", "sd3", "sd35", "flux"]
# video families: the sampler's frame count and the latent frames the denoiser sees (Wan: 1 + (5-1)/4)
VIDEO_CALLS = {"wan": ({"num_frames": 5}, (2,))}
PROMPTS = ["a red circle on the left", "a blue square"]


def first_denoiser_call(pipe, **call):
    """The arguments (by name) and output of the denoiser's first call while `pipe(**call)` samples."""
    denoiser = denoiser_of(pipe)
    original, calls = denoiser.forward, []

    def recording(*args, **kwargs):
        output = original(*args, **kwargs)
        calls.append((inspect.signature(original).bind(*args, **kwargs).arguments, output))
        return output

    denoiser.forward = recording
    try:
        pipe(**call)
    finally:
        del denoiser.forward
    return calls[0]


@pytest.mark.parametrize("kind", [*IMAGE_FAMILIES, *VIDEO_CALLS])
def test_the_training_forward_is_the_pipelines_own_denoiser_call(tiny_family, kind):
    """`predict` on latents [B,C,(F,)h,w] under `encode_prompts` gives what the pipeline's first denoising step
    computes (inputs packed, timestep scaled, text, pooled text, size ids, position ids, FLUX's guidance embedding,
    Wan's UMT5 states over all latent frames)."""
    pipe = load_pipeline(tiny_family(kind))
    pipe.set_progress_bar_config(disable=True)
    resolution, guidance = 32, 2.0  # FLUX: its guidance embedding; the others: 1 (no CFG batch doubling)
    frames, latent_frames = VIDEO_CALLS.get(kind, ({}, ()))
    arguments, output = first_denoiser_call(
        pipe, prompt=PROMPTS, num_inference_steps=2, height=resolution, width=resolution, output_type="latent",
        guidance_scale=guidance if kind == "flux" else 1.0, generator=torch.Generator().manual_seed(0), **frames)
    sample = arguments.get("sample", arguments.get("hidden_states"))
    timestep = torch.as_tensor(arguments["timestep"]).expand(len(PROMPTS))
    side = resolution // getattr(pipe, "vae_scale_factor_spatial", getattr(pipe, "vae_scale_factor", None))
    if kind == "flux":
        sample, timestep = flux.unpack(sample, torch.Size((side, side))), timestep * 1000
        output = (flux.unpack(output[0], torch.Size((side, side))),)
    channels = pipe.vae.config.get("latent_channels") or pipe.vae.config.z_dim
    assert sample.shape == (len(PROMPTS), channels, *latent_frames, side, side)
    condition = encode_prompts(pipe, PROMPTS, resolution, torch.device("cpu"), distilled_guidance=guidance)
    with torch.no_grad():
        ours = predict(denoiser_of(pipe), sample, timestep, condition)
    torch.testing.assert_close(ours, output[0], rtol=1e-5, atol=1e-5)


def test_flux_packing_is_diffusers_own():
    latents = torch.randn(2, 4, 6, 8)
    tokens = FluxPipeline._pack_latents(latents, 2, 4, 6, 8)
    torch.testing.assert_close(flux.pack(latents), tokens)
    torch.testing.assert_close(flux.unpack(tokens, latents.shape), latents)
    # the pipeline's own unpacking takes pixel sizes (vae scale factor 8 here)
    torch.testing.assert_close(FluxPipeline._unpack_latents(tokens, 48, 64, 8), latents)


def test_flux_native_resolution_is_the_pipelines_default(tiny_family):
    pipe = load_pipeline(tiny_family("flux"))
    assert native_resolution(pipe) == pipe.default_sample_size * pipe.vae_scale_factor
