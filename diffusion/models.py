"""Loading SD / SDXL / SD3 pipelines, finding their denoiser, attaching a LoRA, and saving what was trained."""

from __future__ import annotations

from pathlib import Path

import torch

from mmalign.errors import ConfigError, MissingDependencyError

SUPPORTED = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "TextToVideoSDPipeline")
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


def pipeline_class(model: str | Path):
    """The diffusers pipeline class named by a model folder/hub id's model_index.json (SD, SDXL, SD3, text-to-video)."""
    import diffusers

    if Path(model).is_file():
        return _single_file_class(Path(model))
    try:
        name = diffusers.DiffusionPipeline.load_config(str(model))["_class_name"]
    except Exception as err:  # noqa: BLE001 - hub/IO errors arrive in many types
        raise FileNotFoundError(f"--model {model}: not a diffusers pipeline folder or reachable hub id ({err})") from err
    if name not in SUPPORTED:
        raise ConfigError(f"--model {model}: pipeline class {name} is not supported here; "
                         f"supported: {', '.join(SUPPORTED)}")
    return getattr(diffusers, name)


def _single_file_class(path: Path):
    """SD, SDXL or SD3 for a single .safetensors/.ckpt checkpoint, from diffusers' own checkpoint inference."""
    import diffusers
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint

    kind = infer_diffusers_model_type(load_single_file_checkpoint(str(path)))
    if kind.startswith("xl_base"):
        return diffusers.StableDiffusionXLPipeline
    if kind.startswith("v1") or kind.startswith("v2"):
        return diffusers.StableDiffusionPipeline
    if kind.startswith("sd3"):
        return diffusers.StableDiffusion3Pipeline
    raise ConfigError(f"--model {path}: checkpoint type {kind!r} is not supported here; "
                     "supported: SD 1.x/2.x, SDXL base, SD3")


def load_pipeline(model: str | Path, dtype: torch.dtype | None = None):
    """A supported pipeline from a local folder, a hub id, or a single-file checkpoint, without a safety checker."""
    cls = pipeline_class(model)
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    if cls.__name__ == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if Path(model).is_file():
        return cls.from_single_file(str(model), **kwargs)
    if cls.__name__ == "StableDiffusion3Pipeline":  # SD3 may be saved without its optional T5 encoder
        index = cls.load_config(str(model))
        kwargs.update({name: None for name in ("text_encoder_3", "tokenizer_3") if index.get(name, [None])[0] is None})
    return cls.from_pretrained(str(model), **kwargs)


def denoiser_name(pipe) -> str:
    """The attribute holding the pipeline's noise/velocity predictor: "unet" (SD, SDXL) or "transformer" (SD3)."""
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            return name
    raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")


def sampling_pipeline(model: str | Path, lora: str | None = None, mixed_precision: str = "no", cpu: bool = False):
    """A pipeline ready to sample: on the GPU unless `cpu` (or none is present), weights in the dtype of
    `mixed_precision` (no/fp16/bf16), progress bars off, an optional LoRA loaded."""
    from mmalign.trainer import DTYPES

    device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    pipe = load_pipeline(model, dtype=DTYPES[mixed_precision]).to(device)
    pipe.set_progress_bar_config(disable=True)
    if lora:
        load_lora(pipe, lora)
    return pipe


def denoiser_of(pipe):
    """The pipeline's noise/velocity predictor."""
    return getattr(pipe, denoiser_name(pipe))


def add_lora(model, rank: int, alpha: int | None = None, targets: tuple[str, ...] = LORA_TARGETS) -> None:
    """Attach a peft LoRA to the denoiser's `targets` (default: attention projections); only it trains, in float32.

    Denoisers with diffusers' adapter support get `add_adapter`; others (UNet3DConditionModel) peft's injection."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=list(targets))
    try:
        if hasattr(model, "add_adapter"):
            model.add_adapter(config)
        else:
            inject_adapter_in_model(config, model)
    except ValueError as err:  # peft: no module has these names, or one that has is not a layer it can adapt
        raise ConfigError(f"--lora-targets {' '.join(targets)}: no LoRA fits {type(model).__name__} there "
                          f"({' '.join(str(err).split())[:240]})") from err
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def save_lora(pipe, model, output: Path) -> None:
    """Write the LoRA with its config (rank, alpha, targets): diffusers' LoRA file, else peft's adapter files."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    # peft's key names throughout: diffusers' loader judges a file's format by its first key, so conv and linear
    # LoRAs must share one; the config travels as diffusers' adapter metadata, which `load_lora_weights` reads
    config, layers, name = model.peft_config["default"], get_peft_model_state_dict(model), denoiser_name(pipe)
    if hasattr(model, "load_lora_adapter"):
        type(pipe).save_lora_weights(save_directory=str(output), safe_serialization=True,
                                     **{f"{name}_lora_layers": layers,
                                        f"{name}_lora_adapter_metadata": config.to_dict()})
        return
    config.save_pretrained(str(output))  # what `PeftModel.save_pretrained` writes, key names included
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in layers.items()},
              str(Path(output) / "adapter_model.safetensors"))


def load_lora(pipe, path: str | Path) -> None:
    """Load a LoRA written by `save_lora` (or any diffusers LoRA) into the pipeline's denoiser."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        pipe.load_lora_weights(str(path))
        return
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    model = denoiser_of(pipe)
    inject_adapter_in_model(LoraConfig.from_pretrained(str(path)), model)
    loaded = set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
    if loaded.unexpected_keys:
        raise ConfigError(f"{path}: LoRA weights do not match {type(model).__name__} "
                         f"(unexpected {loaded.unexpected_keys[:3]})")


def save_full(model_path: str | Path, model, output: Path) -> None:
    """Write the whole pipeline with the trained denoiser; the frozen parts are re-read in their own precision."""
    pipe = load_pipeline(model_path)
    setattr(pipe, denoiser_name(pipe), model.to(pipe.vae.dtype))
    pipe.save_pretrained(str(output), safe_serialization=True)


def enable_xformers(unet) -> None:
    """xformers attention, with a clear message where it cannot run."""
    if not torch.cuda.is_available():
        raise ConfigError("--xformers needs a CUDA GPU; on this machine attention uses PyTorch SDPA (the default)")
    try:
        import xformers  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError("--xformers needs the xformers package: pip install 'mmalign[gpu]'") from err
    unet.enable_xformers_memory_efficient_attention()
