"""Tiny Stable-Diffusion-architecture pipelines built offline: the embedded base model's skeleton and test models.

Every part is the real diffusers/transformers class (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
CLIPTokenizer), only small; the CLIP tokenizer is built from open_clip's bundled BPE merges, so
nothing is downloaded.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import torch


def clip_tokenizer(model_max_length: int = 16):
    """The standard CLIP BPE tokenizer (49408 tokens), built from open_clip's bundled merges file."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                             model_max_length=model_max_length)


def sd_scheduler(prediction_type: str = "epsilon"):
    """Stable Diffusion's DDIM scheduler: 1000 steps of the scaled-linear betas 0.00085..0.012."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def tiny_components(image_size: int = 32, seed: int = 0, prediction_type: str = "epsilon", text_dim: int = 32,
                    kind: str = "sd", sd3_layers: int = 2, sd3_heads: int = 4) -> dict:
    """Randomly initialised parts of a tiny pipeline of `kind` sd, sdxl, sd3 or video; latents at half resolution.

    sd: UNet, VAE, CLIP text encoder, DDIM scheduler. sdxl: a second text encoder with projection, the UNet
    conditioned on both encoders' states plus pooled text and size ids. sd3: an SD3 transformer (joint
    attention, pooled projections; `sd3_layers` blocks of `sd3_heads` heads of width 8) on two CLIP encoders
    without T5, a flow-matching Euler scheduler.
    video: a UNet3DConditionModel (text-to-video) with the image VAE applied per frame.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        UNet2DConditionModel,
        UNet3DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if kind not in ("sd", "sdxl", "sd3", "video"):
        raise ValueError(f"kind must be sd, sdxl, sd3 or video, got {kind!r}")
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=text_dim,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=image_size, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), shift_factor=0.1 if kind == "sd3" else None,
    )
    if kind == "sd3":
        transformer = SD3Transformer2DModel(
            sample_size=image_size // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=sd3_layers,
            attention_head_dim=8, num_attention_heads=sd3_heads, joint_attention_dim=2 * text_dim,
            caption_projection_dim=8 * sd3_heads, pooled_projection_dim=2 * text_dim)
        return {"transformer": transformer, "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
                "text_encoder": CLIPTextModelWithProjection(text_config), "tokenizer": tokenizer,
                "text_encoder_2": CLIPTextModelWithProjection(text_config), "tokenizer_2": tokenizer,
                "text_encoder_3": None, "tokenizer_3": None}
    scheduler = sd_scheduler(prediction_type)
    if kind == "video":
        video_unet = UNet3DConditionModel(
            sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=16, cross_attention_dim=text_dim, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))
        return {"unet": video_unet, "vae": vae, "text_encoder": CLIPTextModel(text_config), "tokenizer": tokenizer,
                "scheduler": scheduler}
    xl_unet = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=6 * 8 + text_dim) if kind == "sdxl" else {}
    unet = UNet2DConditionModel(
        sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=16,
        cross_attention_dim=text_dim * (2 if kind == "sdxl" else 1), attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), **xl_unet,
    )
    parts = {"unet": unet, "vae": vae, "text_encoder": CLIPTextModel(text_config), "tokenizer": tokenizer,
             "scheduler": scheduler}
    if kind == "sdxl":
        parts.update(text_encoder_2=CLIPTextModelWithProjection(text_config), tokenizer_2=tokenizer)
    return parts


def tiny_pipeline(kind: str = "sd", **kwargs):
    """A tiny StableDiffusion(XL/3)Pipeline or TextToVideoSDPipeline made of `tiny_components`."""
    import diffusers

    parts = tiny_components(kind=kind, **kwargs)
    if kind == "sd":
        return diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    classes = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "video": "TextToVideoSDPipeline"}
    return getattr(diffusers, classes[kind])(**parts)
