"""Loading an image-text-to-text model with its processor, attaching a LoRA to its language model, saving the result."""

from __future__ import annotations

from pathlib import Path

import torch

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
VISION_PARTS = ("vision_tower", "multi_modal_projector")
MROPE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v")


def load(model: str | Path, dtype: torch.dtype = torch.float32):
    """(model, processor) from a folder or hub id: AutoModelForImageTextToText and AutoProcessor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if not Path(model).exists() and str(model).startswith(("/", ".", "~")):
        raise FileNotFoundError(f"--model {model}: no such folder")
    try:
        processor = AutoProcessor.from_pretrained(str(model))
        loaded = AutoModelForImageTextToText.from_pretrained(str(model), dtype=dtype)
    except OSError as err:
        raise FileNotFoundError(f"--model {model}: not a transformers image-text-to-text folder or reachable hub id "
                                f"({err})") from err
    if not hasattr(loaded, "get_image_features") or getattr(processor, "image_token", None) is None:
        raise ValueError(f"--model {model}: {type(loaded).__name__} has no get_image_features/image token; a "
                         "LLaVA-style model (vision tower + language model) is needed")
    text = loaded.config.get_text_config()
    ropes = [getattr(text, name, None) or {} for name in ("rope_scaling", "rope_parameters")]
    if loaded.config.model_type in MROPE_FAMILIES or any("mrope_section" in rope for rope in ropes):
        raise ValueError(f"--model {model}: {type(loaded).__name__} places tokens with multi-axis rotary positions "
                         "(M-RoPE, Qwen2-VL style), which the shared-prompt scoring does not reproduce yet")
    return loaded, processor


def add_lora(model, rank: int, alpha: int | None, targets: tuple[str, ...]):
    """The model wrapped as a peft model with a LoRA on the language model's `targets` projections only (the vision
    tower and projector stay frozen, so their features are the reference's too)."""
    from peft import LoraConfig, get_peft_model

    pattern = rf".*language_model.*\.({'|'.join(targets)})"
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=pattern, lora_dropout=0.0))


def vision_is_frozen(model) -> bool:
    """True when no parameter of the vision tower or projector trains: image features are then the same under the
    policy and its reference."""
    return not any(p.requires_grad for n, p in model.named_parameters() if any(part in n for part in VISION_PARTS))


def save(model, processor, output: Path) -> None:
    """Write the LoRA adapter (peft format) or the whole model, plus the processor, into `output`."""
    model.save_pretrained(str(output))
    processor.save_pretrained(str(output))
