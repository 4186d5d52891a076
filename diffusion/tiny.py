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

KINDS = ("sd", "sdxl", "sd3", "sd35", "flux", "video", "wan")


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


def t5_tokenizer(model_max_length: int = 16):
    """A small T5 (Unigram) tokenizer built offline: the special tokens, single characters and common words."""
    from transformers import T5Tokenizer

    words = ("a", "an", "the", "of", "on", "in", "and", "with", "red", "green", "blue", "yellow", "circle", "square",
             "triangle", "small", "large", "left", "right", "top", "bottom", "photo", "picture")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in words] + [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def sd_scheduler(prediction_type: str = "epsilon"):
    """Stable Diffusion's DDIM scheduler: 1000 steps of the scaled-linear betas 0.00085..0.012."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def tiny_components(image_size: int = 32, seed: int = 0, prediction_type: str = "epsilon", text_dim: int = 32,
                    kind: str = "sd", sd3_layers: int = 2, sd3_heads: int = 4) -> dict:
    """Randomly initialised parts of a tiny pipeline of `kind` sd, sdxl, sd3, sd35, flux or video; latents at half
    resolution.

    sd: UNet, VAE, CLIP text encoder, DDIM scheduler. sdxl: a second text encoder with projection, the UNet
    conditioned on both encoders' states plus pooled text and size ids. sd3: an SD3 transformer (joint
    attention, pooled projections; `sd3_layers` blocks of `sd3_heads` heads of width 8) on two CLIP encoders
    without T5, a flow-matching Euler scheduler. sd35: sd3 with SD3.5's QK RMS-norm and (medium's) dual attention
    in the first block. flux: a FLUX.1-dev-style transformer (double and single stream blocks, 2x2-packed latents,
    rotary position ids, guidance embedding) on CLIP (pooled) and T5 (states), the dynamically shifted scheduler.
    video: a UNet3DConditionModel (text-to-video) with the image VAE applied per frame. wan: Wan 2.1 text-to-video
    (`wan_parts`).
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        UNet2DConditionModel,
        UNet3DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
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
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        shift_factor=0.1 if kind in ("sd3", "sd35", "flux") else None,
    )
    if kind in ("sd3", "sd35"):
        transformer = SD3Transformer2DModel(
            sample_size=image_size // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=sd3_layers,
            attention_head_dim=8, num_attention_heads=sd3_heads, joint_attention_dim=2 * text_dim,
            caption_projection_dim=8 * sd3_heads, pooled_projection_dim=2 * text_dim,
            **({"qk_norm": "rms_norm", "dual_attention_layers": (0,)} if kind == "sd35" else {}))
        return {"transformer": transformer, "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
                "text_encoder": CLIPTextModelWithProjection(text_config), "tokenizer": tokenizer,
                "text_encoder_2": CLIPTextModelWithProjection(text_config), "tokenizer_2": tokenizer,
                "text_encoder_3": None, "tokenizer_3": None}
    if kind == "flux":
        return flux_parts(text_config, tokenizer, vae)
    if kind == "wan":
        return wan_parts()
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


def flux_parts(text_config, tokenizer, vae) -> dict:
    """A tiny FluxPipeline's parts around `vae`: CLIP (pooled) + T5 (states) text encoders and a FLUX transformer with
    one double- and one single-stream block of 2 heads of width 16, guidance-embedded like FLUX.1-dev."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    t5_tok = t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * vae.config.latent_channels, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=text_config.hidden_size, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return {"transformer": transformer, "vae": vae, "scheduler": scheduler, "text_encoder": CLIPTextModel(text_config),
            "tokenizer": tokenizer, "text_encoder_2": t5, "tokenizer_2": t5_tok}


def wan_parts() -> dict:
    """A tiny WanPipeline's parts: a causal 3D VAE (4x in time and space, 4 latent channels with per-channel mean and
    std), a Wan transformer of one block of 2 heads of width 12 on (1,2,2) patches, a UMT5 text encoder, and the
    scheduler Wan 2.1 ships (UniPC on flow sigmas, shift 3)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    t5_tok = t5_tokenizer()
    umt5 = UMT5EncoderModel(UMT5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                       pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id))
    z_dim = 4
    vae = AutoencoderKLWan(base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2], num_res_blocks=1,
                           temperal_downsample=[True, True], latents_mean=[0.1 * (i - 1) for i in range(z_dim)],
                           latents_std=[1.0 + 0.5 * i for i in range(z_dim)], scale_factor_temporal=4,
                           scale_factor_spatial=4)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=z_dim, out_channels=z_dim, text_dim=32, freq_dim=16, ffn_dim=32,
                                        num_layers=1, rope_max_seq_len=64)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    return {"transformer": transformer, "vae": vae, "scheduler": scheduler, "text_encoder": umt5,
            "tokenizer": t5_tok}


def tiny_pipeline(kind: str = "sd", **kwargs):
    """A tiny StableDiffusion(XL/3)Pipeline, FluxPipeline, TextToVideoSDPipeline or WanPipeline made of
    `tiny_components`."""
    import diffusers

    parts = tiny_components(kind=kind, **kwargs)
    if kind == "sd":
        return diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    classes = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
               "sd35": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "video": "TextToVideoSDPipeline",
               "wan": "WanPipeline"}
    return getattr(diffusers, classes[kind])(**parts)


def save_tiny_scorers(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Tiny random reward models saved the way each is published (`rewards.named`): a transformers CLIP folder with its
    processor (clip: pickscore, clipscore), an open_clip scorer folder (open_clip; its weights file is an HPS-style
    checkpoint of assets/tiny-clip.json), a LAION aesthetic MLP file for it (.pth of plain tensors, aesthetic) and an
    ImageReward folder (imagereward)."""
    from transformers import BertTokenizer, BlipConfig, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from .rewards import load_scorer, save_scorer
    from .rewards.named import ImageReward, LinearMLP, build_imagereward, save_imagereward

    torch.manual_seed(seed)
    root = Path(root)
    tokenizer = clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8, initializer_range=0.02)  # BLIP's default range is 1e-10: every image would look alike
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root / "clip")
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(root / "clip")

    open_clip_folder = save_scorer(load_scorer(Path(__file__).resolve().parents[1] / "assets" / "tiny-clip.json"),
                                   root / "open_clip")
    torch.save(LinearMLP(32).state_dict(), root / "aesthetic.pth")

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "green", "circle", "square", "triangle"]
    bert = BertTokenizer(vocab={word: i for i, word in enumerate(words)})
    blip_text = dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=40, pad_token_id=0)
    blip = BlipConfig(vision_config=vision, text_config=blip_text)
    save_imagereward(ImageReward(*build_imagereward(blip), bert, []), root / "imagereward")
    return {"clip": root / "clip", "open_clip": open_clip_folder, "aesthetic": root / "aesthetic.pth",
            "imagereward": root / "imagereward"}
