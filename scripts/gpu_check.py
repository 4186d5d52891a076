"""Training steps of each method at real architecture sizes with random weights, in bf16 with a LoRA (or every weight
with --full): seconds per step, pairs (or prompts) per second and peak GPU memory.

    python scripts/gpu_check.py                      # on one GPU: every architecture below
    python scripts/gpu_check.py --arch sd15 --steps 3 10
    python scripts/gpu_check.py --smoke              # the same harness on tiny models on the CPU (fp32)
    # sharded full fine-tunes on N GPUs: the methods that train sharded, peak memory of every process
    accelerate launch --config_file mmalign/accelerate_configs/fsdp.yaml --num_processes 8 scripts/gpu_check.py \
        --full --arch sdxl llava-7b --workdir /shared/gpu-check     # or zero2.yaml / zero3.yaml

Architectures (random weights, built in-process and saved, then loaded by each method's own `run`):
    sd15        SD 1.5: UNet 320/640/1280/1280, CLIP ViT-L/14 text encoder, 512 px: Diffusion-DPO, InPO, SePPO
    sdxl        SDXL: UNet 320/640/1280 with 1/2/10 transformer layers (2.57B), CLIP-L + CLIP-G, 1024 px, gradient
                checkpointing: Diffusion-DPO
    sd3-medium  SD3-medium: 24 joint blocks of 24 heads x 64, CLIP-L + CLIP-G (no T5), 1024 px: Flow-DPO, AC-Flow
    sd35-medium SD3.5-medium: 24 QK-normed joint blocks, a second self-attention in blocks 0-12, CLIP-L + CLIP-G +
                T5-XXL, 1024 px, gradient checkpointing: Flow-DPO, AC-Flow, Flow-GRPO (guidance 4.5, 10 steps)
    sd35-large  SD3.5-large: 38 QK-normed joint blocks of 38 heads x 64, CLIP-L + CLIP-G + T5-XXL, 1024 px,
                gradient checkpointing: Flow-DPO, AC-Flow
    flux-dev    FLUX.1-dev: 19 double + 38 single blocks of 24 heads x 128, guidance embedding, CLIP-L + T5-XXL,
                1024 px, gradient checkpointing: Flow-DPO, AC-Flow
    wan-1.3b    Wan 2.1 T2V-1.3B: 30 blocks of 12 heads x 128 (1.42B), the causal 3D VAE, UMT5-XXL, 480 x 480 px,
                gradient checkpointing: video DPO (81 frames), Flow-GRPO (33 frames, guidance 4.5, 10 steps, the
                first half trained)
    llava-7b    LLaVA-1.5-7B: CLIP ViT-L/14-336 (576 image tokens) + Llama 7B, rank-8 LoRA: vision DPO
    qwen2.5-vl-7b  Qwen2.5-VL-7B: the 32-block window-attention ViT (14 px patches, 2x2 merge; images at 448 px, 256
                tokens) + the 28-layer Qwen2.5 7B decoder with M-RoPE (8.29B), rank-8 LoRA: vision DPO
Seconds per step is (t(last step) - t(first timed step)) / steps between per-step timestamps taken (after a
CUDA synchronise) as each step starts, so loading, warm-up and saving cancel. Peak memory is
torch.cuda.max_memory_allocated over the run (the largest of the processes', each listed, when launched on several).
On several processes the main one builds the models and data into --workdir (a folder every process sees) and only
the methods that train sharded run (InPO, SePPO and AC-Flow train with DDP only).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import torch

from mmalign.trainer import Trainer

STAMPS: list[float] = []
SHARDING: list[str | None] = []


def step_times_recorded() -> AbstractContextManager:
    """While the context lasts, Trainer.fit records a timestamp as each micro-step starts (into STAMPS) and the launch's
    sharding (into SHARDING)."""
    original = Trainer.fit

    def fit(self, model, dataset, collate, step_fn, *args, **kwargs):
        SHARDING.append(self.sharding)

        def timed(*a, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            STAMPS.append(time.perf_counter())
            return step_fn(*a, **kw)

        return original(self, model, dataset, collate, timed, *args, **kwargs)

    return mock.patch.object(Trainer, "fit", fit)


def sd15() -> Any:
    """An SD 1.5-architecture StableDiffusionPipeline: UNet 0.86B, CLIP ViT-L/14 text encoder, VAE at 512 px."""
    import diffusers

    from mmalign.diffusion.tiny import clip_tokenizer, sd_scheduler

    tokenizer = clip_tokenizer(77)
    unet = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                          block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    return diffusers.StableDiffusionPipeline(unet=unet, vae=vae(4, 512), text_encoder=clip(tokenizer, 768, 12, 12),
                                             tokenizer=tokenizer, scheduler=sd_scheduler(), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)


def sdxl() -> Any:
    """An SDXL-base-architecture StableDiffusionXLPipeline: UNet 320/640/1280 with 1/2/10 transformer layers per block
    (2.57B) conditioned on pooled text and size ids, CLIP-L + CLIP-G (with projection), the VAE at 1024 px."""
    import diffusers

    from mmalign.diffusion.tiny import clip_tokenizer, sd_scheduler

    tokenizer = clip_tokenizer(77)
    unet = diffusers.UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    return diffusers.StableDiffusionXLPipeline(
        unet=unet, vae=vae(4, 1024, scale=0.13025), text_encoder=clip(tokenizer, 768, 12, 12),
        text_encoder_2=clip(tokenizer, 1280, 32, 20, projection=True), tokenizer=tokenizer, tokenizer_2=tokenizer,
        scheduler=sd_scheduler())


def sd3_medium() -> Any:
    """An SD3-medium-architecture StableDiffusion3Pipeline: 24 joint blocks (2.03B), CLIP-L + CLIP-G, no T5."""
    import diffusers

    transformer = diffusers.SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192)
    return sd3_pipeline(transformer, t5=False)


def sd35_large() -> Any:
    """An SD3.5-large-architecture StableDiffusion3Pipeline: 38 QK-normed joint blocks (8.06B), CLIP-L, CLIP-G and
    T5-XXL."""
    import diffusers

    transformer = diffusers.SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
        num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
        pos_embed_max_size=192, qk_norm="rms_norm")
    return sd3_pipeline(transformer, t5=True)


def sd35_medium() -> Any:
    """An SD3.5-medium-architecture StableDiffusion3Pipeline: 24 QK-normed joint blocks (MMDiT-X: a second self-
    attention in blocks 0-12; 2.47B with its position table), CLIP-L, CLIP-G and T5-XXL."""
    import diffusers

    transformer = diffusers.SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
    return sd3_pipeline(transformer, t5=True)


def flux_dev() -> Any:
    """A FLUX.1-dev-architecture FluxPipeline: 19 double- and 38 single-stream blocks (11.9B) with the guidance
    embedding, CLIP-L (pooled) and T5-XXL (states), a 16-channel VAE."""
    import diffusers

    from mmalign.diffusion.tiny import clip_tokenizer, t5_tokenizer

    tokenizer = clip_tokenizer(77)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                          max_shift=1.15, base_image_seq_len=256,
                                                          max_image_seq_len=4096)
    return diffusers.FluxPipeline(transformer=transformer, vae=vae(16, 1024, scale=0.3611, shift=0.1159),
                                  scheduler=scheduler, text_encoder=clip(tokenizer, 768, 12, 12), tokenizer=tokenizer,
                                  text_encoder_2=t5_xxl(), tokenizer_2=t5_tokenizer(512))


def wan_1_3b() -> Any:
    """A Wan 2.1 T2V-1.3B-architecture WanPipeline: 30 blocks of 12 heads x 128 (1.42B in the released checkpoint),
    the causal 3D VAE, the UMT5-XXL encoder (5.68B) and UniPC on flow sigmas at shift 3 (480p)."""
    import diffusers
    from transformers import UMT5Config, UMT5EncoderModel

    from mmalign.diffusion.tiny import t5_tokenizer

    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6)
    umt5 = UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                       num_heads=64, feed_forward_proj="gated-gelu"))
    with torch.device("cpu"):  # the scheduler builds its tables through numpy, whatever device the models are built on
        scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=3.0, num_train_timesteps=1000)
    return diffusers.WanPipeline(transformer=transformer, vae=diffusers.AutoencoderKLWan(), scheduler=scheduler,
                                 text_encoder=umt5, tokenizer=t5_tokenizer(512))


def clip(tokenizer, width: int, layers: int, heads: int, projection: bool = False):
    """A CLIP text encoder of the given width, depth and heads (with the pooled projection for SD3)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            projection_dim=width, hidden_act="gelu" if projection else "quick_gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def t5_xxl():
    """The T5-XXL encoder (4.76B) that SD3(.5) and FLUX read their per-token text states from."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                   feed_forward_proj="gated-gelu"))


def vae(channels: int, size: int, scale: float = 0.18215, shift: float | None = None):
    """The SD-family KL autoencoder (128/256/512/512) with `channels` latent channels."""
    import diffusers

    return diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                   latent_channels=channels, down_block_types=("DownEncoderBlock2D",) * 4,
                                   up_block_types=("UpDecoderBlock2D",) * 4, sample_size=size, scaling_factor=scale,
                                   shift_factor=shift, use_quant_conv=channels == 4,
                                   use_post_quant_conv=channels == 4)


def sd3_pipeline(transformer, t5: bool) -> Any:
    """An SD3-family pipeline around `transformer`: CLIP-L and CLIP-G (with projections), T5-XXL if `t5`."""
    import diffusers

    from mmalign.diffusion.tiny import clip_tokenizer, t5_tokenizer

    tokenizer = clip_tokenizer(77)
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, vae=vae(16, 1024, scale=1.5305, shift=0.0609),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), tokenizer=tokenizer, tokenizer_2=tokenizer,
        text_encoder=clip(tokenizer, 768, 12, 12, projection=True),
        text_encoder_2=clip(tokenizer, 1280, 32, 20, projection=True),
        text_encoder_3=t5_xxl() if t5 else None, tokenizer_3=t5_tokenizer(256) if t5 else None)


PIPELINES: dict[str, Callable[[], Any]] = {"sd15": sd15, "sdxl": sdxl, "sd3-medium": sd3_medium,
                                           "sd35-medium": sd35_medium, "sd35-large": sd35_large,
                                           "flux-dev": flux_dev, "wan-1.3b": wan_1_3b}
TINY_KINDS = {"sd15": "sd", "sdxl": "sdxl", "sd3-medium": "sd3", "sd35-medium": "sd35", "sd35-large": "sd35",
              "flux-dev": "flux", "wan-1.3b": "wan"}
VIDEO_FRAMES = {False: 81, True: 5}  # frames per training video at real size (Wan 2.1's 81) and in the smoke run
ROLLOUT_FRAMES = {False: 33, True: 5}  # frames per Flow-GRPO video: a rollout holds K of them per prompt


def build_pipeline(arch: str, folder: Path, smoke: bool) -> Path:
    """The architecture's pipeline with random weights, built in bf16 on the GPU (tiny with `smoke`), saved."""
    from mmalign.diffusion.tiny import tiny_pipeline

    if smoke:
        pipe = tiny_pipeline(TINY_KINDS[arch])
    else:
        with torch.device("cuda"), default_dtype(torch.bfloat16):
            pipe = PIPELINES[arch]()
    pipe.save_pretrained(folder)
    return folder


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """New tensors in `dtype` while the block runs (real-size models are built in bf16, half the memory)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def llava_7b(folder: Path, smoke: bool) -> Path:
    """A LLaVA-1.5-7B-architecture LlavaForConditionalGeneration with random weights in bf16 (tiny with `smoke`),
    with the embedded world's word-level processor at 336 px / 14 px patches."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from mmalign.vision.tiny import tiny_llava, tiny_processor

    if smoke:
        model, processor = tiny_llava()
    else:
        processor = tiny_processor(image_size=336, patch_size=14)
        tok = processor.tokenizer
        vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                  num_hidden_layers=24, num_attention_heads=16, projection_dim=768,
                                  hidden_act="quick_gelu")
        text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        config = LlavaConfig(vision_config=vision, text_config=text,
                             image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                             vision_feature_select_strategy="default", projector_hidden_act="gelu")
        with torch.device("cuda"):
            # transformers declares `to` with functools.wraps(nn.Module.to), which types it as the unbound method
            model = LlavaForConditionalGeneration(config).to(torch.bfloat16)  # type: ignore[arg-type]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def qwen25_vl_7b_config(tok):
    """The Qwen2.5-VL-7B configuration (8.29B) over the tokenizer's special tokens: a 32-block ViT of width 1280 with
    window attention (full attention in blocks 7, 15, 23, 31) and the 28-layer decoder of width 3584 with M-RoPE."""
    from transformers import Qwen2_5_VLConfig

    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=tok.convert_tokens_to_ids("<image>"),
                            video_token_id=tok.convert_tokens_to_ids("<video>"), vision_start_token_id=tok.bos_token_id)


def qwen25_vl_7b(folder: Path, smoke: bool) -> Path:
    """A Qwen2.5-VL-7B-architecture model with random weights in bf16 (tiny with `smoke`) and a Qwen2_5_VLProcessor
    over the embedded world's words that resizes every image to 448 x 448 px (256 image tokens)."""
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    from mmalign.vision.tiny import CHAT_TEMPLATE, tiny_qwen2_5_vl, word_tokenizer

    if smoke:
        model, processor = tiny_qwen2_5_vl()
    else:
        tok = word_tokenizer(video_token="<video>")
        pixels = 448 * 448
        processor = Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2,
                                                  size={"shortest_edge": pixels, "longest_edge": pixels}),
            video_processor=Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2), tokenizer=tok,
            chat_template=CHAT_TEMPLATE)
        with torch.device("cuda"):
            model = Qwen2_5_VLForConditionalGeneration(qwen25_vl_7b_config(tok)).to(torch.bfloat16)  # type: ignore[arg-type]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def runs(arch: str, model: Path, data: Path, smoke: bool, batch_size: int) -> list[tuple[str, ModuleType, dict]]:
    """(name, method module, settings) of every method checked on `arch` (with a LoRA)."""
    from mmalign.diffusion import acflow, dpo, flow_dpo, grpo, inpo, seppo, video
    from mmalign.vision import dpo as vision_dpo

    pairs = dict(model=str(model), data=str(data / "pairs.parquet"), batch_size=batch_size)
    if arch == "sd15":
        return [("Diffusion-DPO", dpo, pairs), ("InPO", inpo, pairs),
                ("SePPO", seppo, {**pairs, "reference_steps": 20})]
    if arch == "sdxl":
        return [("Diffusion-DPO", dpo, {**pairs, "resolution": 32 if smoke else 1024,
                                        "gradient_checkpointing": not smoke})]
    if arch in ("sd3-medium", "sd35-medium", "sd35-large", "flux-dev"):
        size = {"resolution": 32 if smoke else 1024}
        memory = {"gradient_checkpointing": not smoke} if arch != "sd3-medium" else {}
        online = dict(model=str(model), prompts=str(data / "prompts.txt"), **size, **memory,
                      batch_size=max(1, batch_size // 4), samples_per_prompt=4)
        checks = [("Flow-DPO", flow_dpo, {**pairs, **size, **memory}), ("AC-Flow", acflow, online)]
        if arch == "sd35-medium":  # one rollout per update, so prompts/s = batch / s per step
            checks.append(("Flow-GRPO", grpo, {**online, "updates_per_rollout": 1}))
        return checks
    if arch == "wan-1.3b":
        size = dict(resolution=32 if smoke else 480, gradient_checkpointing=not smoke)
        return [("video DPO", video, dict(model=str(model), data=str(data / "videos" / "pairs.jsonl"),
                                          batch_size=max(1, batch_size // 4), num_frames=VIDEO_FRAMES[smoke], **size)),
                ("Flow-GRPO", grpo, dict(model=str(model), prompts=str(data / "prompts.txt"),
                                         batch_size=max(1, batch_size // 4), samples_per_prompt=4,
                                         num_frames=ROLLOUT_FRAMES[smoke], train_steps_fraction=0.5,
                                         updates_per_rollout=1, **size))]
    return [("vision DPO", vision_dpo, dict(model=str(model), data=str(data / "rows.parquet"), batch_size=batch_size,
                                            learning_rate=1e-5, beta=0.1, gradient_checkpointing=not smoke))]


def write_data(folder: Path, smoke: bool) -> Path:
    """Pick-a-Pic pairs, prompts, video pairs (frame folders of a world scene whose object drifts) and TRL vision rows
    from the embedded worlds."""
    from mmalign.diffusion import world
    from mmalign.diffusion.data import write_pickapic
    from mmalign.vision.data import write_rows
    from mmalign.vision.world import preference_rows

    write_pickapic(world.preference_pairs(256, seed=0, tie_margin=0.0), folder / "pairs.parquet")
    (folder / "prompts.txt").write_text("\n".join(world.CAPTIONS) + "\n")
    write_rows(preference_rows(256, seed=0), folder / "rows.parquet")
    rows = []
    for i, caption in enumerate(world.CAPTIONS[:8]):
        for side, x in (("left", 10), ("right", 22)):
            frames = folder / "videos" / f"{i}-{side}"
            frames.mkdir(parents=True)
            for f in range(VIDEO_FRAMES[smoke]):
                world.render(caption, x + 0.1 * f, 16, 6).save(frames / f"{f:03d}.png")
        rows.append({"caption": caption, "video_0": f"{i}-left", "video_1": f"{i}-right", "label_0": 1})
    (folder / "videos" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


VLMS = ("llava-7b", "qwen2.5-vl-7b")
BUILDERS: dict[str, Callable[[Path, bool], Path]] = {
    **{arch: functools.partial(build_pipeline, arch) for arch in PIPELINES}, "llava-7b": llava_7b,
    "qwen2.5-vl-7b": qwen25_vl_7b}


SHARDED = ("Diffusion-DPO", "Flow-DPO", "vision DPO")  # the methods of `runs` that train under FSDP and ZeRO


def join_processes(workdir: Path | None, parser: argparse.ArgumentParser) -> int:
    """The number of processes launched; on several, their process group joined (the trainers take it over) and
    --workdir required."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if workdir is None:
            parser.error("--workdir: on several processes the models and data are built once, into a folder every "
                         "process sees")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group("cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo")
    return world


def gathered(value: Any, world: int) -> list[Any]:
    """`value` of every process (rank order)."""
    if world == 1:
        return [value]
    values: list[Any] = [None] * world
    torch.distributed.all_gather_object(values, value)
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="*", choices=sorted(BUILDERS), default=list(BUILDERS))
    parser.add_argument("--steps", nargs=2, type=int, default=(3, 10), metavar=("WARMUP", "TOTAL"),
                        help="time from the start of step WARMUP to the start of step TOTAL")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step (AC-Flow: a quarter as prompts)")
    parser.add_argument("--full", action="store_true", help="train every weight of the denoiser or VLM, not a LoRA "
                                                            "(the methods with --full)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU in fp32 (checks the harness)")
    parser.add_argument("--workdir", type=Path, help="where the models, data and runs go (default: a temporary "
                                                     "folder); required on several processes")
    parser.add_argument("--output", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no GPU: pass --smoke to check the harness on the CPU with tiny models")
    world = join_processes(args.workdir, parser)
    main_process = int(os.environ.get("RANK", "0")) == 0
    warmup, total = args.steps
    results = []
    with step_times_recorded(), contextlib.ExitStack() as stack:
        folder = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if main_process:
            if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
                parser.error(f"--workdir {args.workdir}: not empty; give a new folder")
            data = write_data(Path(folder), args.smoke)
            models = {arch: BUILDERS[arch](Path(folder) / arch, args.smoke) for arch in args.arch}
        models, data = gathered((models, data) if main_process else None, world)[0]
        for arch in args.arch:
            for name, method, settings in runs(arch, models[arch], data, args.smoke, args.batch_size):
                if world > 1 and name not in SHARDED:
                    continue
                STAMPS.clear()
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                config = method.Config(**settings, output=Path(folder) / "runs" / arch / name, max_steps=total + 1,
                                       report_to="none", checkpoint_every=0, cpu=args.smoke,
                                       mixed_precision="no" if args.smoke else "bf16",
                                       **({"full": True} if args.full and hasattr(method.Config, "full") else {}),
                                       **({} if arch in VLMS else {"num_samples": 0}))
                method.run(config)
                seconds = (STAMPS[total] - STAMPS[warmup]) / (total - warmup)
                peaks = gathered(torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
                                 world)
                results.append({"arch": arch, "method": name, "full": getattr(config, "full", False),
                                "processes": world, "sharding": SHARDING[-1], "batch_size": config.batch_size,
                                "s_per_step": seconds, "items_per_s": config.batch_size * world / seconds,
                                "peak_gib": None if peaks[0] is None else max(peaks), "peak_gib_per_process": peaks,
                                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"})
                if main_process:
                    print(json.dumps(results[-1]), flush=True)
    if not main_process:
        return
    lines = ["| architecture | method | weights | processes | batch/process | s/step | pairs/s | peak GiB |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['arch']} | {r['method']} | {'all' if r['full'] else 'LoRA'} | {r['processes']} "
              f"{'' if r['sharding'] is None else r['sharding']} | {r['batch_size']} | {r['s_per_step']:.3f} | "
              f"{r['items_per_s']:.1f} | {'-' if r['peak_gib'] is None else format(r['peak_gib'], '.1f')} |"
              for r in results]
    print("\n".join(lines))
    if args.output:
        args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
