"""Loading Stable Diffusion / SDXL pipelines, attaching a LoRA to the UNet, and saving what was trained."""

from __future__ import annotations

from pathlib import Path

import torch

SUPPORTED = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


def pipeline_class(model: str | Path):
    """The diffusers pipeline class named by a model folder/hub id's model_index.json (SD or SDXL only)."""
    import diffusers

    if Path(model).is_file():
        return _single_file_class(Path(model))
    try:
        name = diffusers.DiffusionPipeline.load_config(str(model))["_class_name"]
    except Exception as err:  # noqa: BLE001 - hub/IO errors arrive in many types
        raise FileNotFoundError(f"--model {model}: not a diffusers pipeline folder or reachable hub id ({err})") from err
    if name not in SUPPORTED:
        raise ValueError(f"--model {model}: pipeline class {name} is not supported here; "
                         f"supported: {', '.join(SUPPORTED)}")
    return getattr(diffusers, name)


def _single_file_class(path: Path):
    """SD or SDXL for a single .safetensors/.ckpt checkpoint, from diffusers' own checkpoint inference."""
    import diffusers
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint

    kind = infer_diffusers_model_type(load_single_file_checkpoint(str(path)))
    if kind.startswith("xl_base"):
        return diffusers.StableDiffusionXLPipeline
    if kind.startswith("v1") or kind.startswith("v2"):
        return diffusers.StableDiffusionPipeline
    raise ValueError(f"--model {path}: checkpoint type {kind!r} is not supported here; supported: SD 1.x/2.x, SDXL base")


def load_pipeline(model: str | Path, dtype: torch.dtype | None = None):
    """An SD/SDXL pipeline from a local folder, a hub id, or a single-file checkpoint, without a safety checker."""
    cls = pipeline_class(model)
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    if cls.__name__ == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if Path(model).is_file():
        return cls.from_single_file(str(model), **kwargs)
    return cls.from_pretrained(str(model), **kwargs)


def sampling_pipeline(model: str | Path, lora: str | None = None, mixed_precision: str = "no", cpu: bool = False):
    """A pipeline ready to sample: on the GPU unless `cpu` (or none is present), weights in the dtype of
    `mixed_precision` (no/fp16/bf16), progress bars off, an optional LoRA loaded."""
    from mmalign.trainer import DTYPES

    device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    pipe = load_pipeline(model, dtype=DTYPES[mixed_precision]).to(device)
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(lora)
    return pipe


def add_lora(unet, rank: int, alpha: int | None = None, targets: tuple[str, ...] = LORA_TARGETS) -> None:
    """Attach a peft LoRA to the UNet's `targets` (default: attention projections); only it trains, in float32."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                target_modules=list(targets)))
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def save_lora(pipe_class, unet, output: Path) -> None:
    """Write pytorch_lora_weights.safetensors so that `pipe.load_lora_weights(output)` loads it."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    pipe_class.save_lora_weights(save_directory=str(output), unet_lora_layers=layers, safe_serialization=True)


def save_full(model: str | Path, unet, output: Path) -> None:
    """Write the whole pipeline with the trained UNet; the frozen parts are re-read from `model` in their own precision."""
    pipe = load_pipeline(model)
    pipe.unet = unet.to(pipe.vae.dtype)
    pipe.save_pretrained(str(output), safe_serialization=True)


def enable_xformers(unet) -> None:
    """xformers attention, with a clear message where it cannot run."""
    if not torch.cuda.is_available():
        raise ValueError("--xformers needs a CUDA GPU; on this machine attention uses PyTorch SDPA (the default)")
    try:
        import xformers  # noqa: F401
    except ImportError as err:
        raise ImportError("--xformers needs the xformers package: pip install 'mmalign[gpu]'") from err
    unet.enable_xformers_memory_efficient_attention()
