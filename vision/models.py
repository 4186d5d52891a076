"""Loading an image-text-to-text model with its processor, attaching a LoRA to its language model, saving the result.

A `--model` is checked from its config and processor (`load_processor`, cheap) before its data and weights are
read: a missing folder, a file, a folder that holds no such model, a family whose positions or features the scoring
does not reproduce (REFUSED, and M-RoPE families other than MROPE_SCORED), or a processor without an image token is a
ConfigError naming the model and why.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmalign.errors import ConfigError

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
VISION_PARTS = ("vision_tower", "multi_modal_projector", "visual")
"""Names of the vision tower and projector modules: LLaVA's, and Qwen2-VL's `visual` (tower and merger)."""
MROPE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v")
MROPE_SCORED = ("qwen2_vl", "qwen2_5_vl")
"""The M-RoPE families whose positions `scoring.rope_positions` reproduces (checked against the model's own forward)."""
ROW_FEATURES = "its vision encoder returns one feature block per row (all of a row's images and their sub-image " \
    "tiles together), not one per image, which sharing each image's features between rows needs"
REFUSED = {
    "idefics3": ROW_FEATURES, "smolvlm": ROW_FEATURES,
    "paligemma": "its prompt attends both ways as a prefix (token_type_ids 0 for the prompt, 1 for the answer), which "
                 "the scoring, giving token_type_ids 1 at image tokens (Gemma 3's meaning), does not reproduce"}
"""Image-text-to-text families refused before training, and why."""
LOAD_ERRORS = (OSError, ValueError)
"""What transformers raises for a folder or hub id it cannot read (missing files, bad JSON, unknown model type)."""


def _from_pretrained(loader, model: str | Path, what: str, **kwargs):
    """`loader.from_pretrained(model)`; a ConfigError naming the model when it cannot be read."""
    path = Path(model).expanduser()
    if path.is_file():
        raise ConfigError(f"--model {model} is a file; it takes a transformers model folder or hub id")
    if not path.exists() and str(model).startswith(("/", ".", "~")):
        raise ConfigError(f"--model {model}: no such folder")
    try:
        return loader.from_pretrained(str(path) if path.exists() else str(model), **kwargs)
    except LOAD_ERRORS as err:
        raise ConfigError(f"--model {model}: its {what} cannot be loaded; a transformers image-text-to-text folder or "
                          f"reachable hub id is needed ({str(err).strip().splitlines()[0]})") from None


def load_processor(model: str | Path):
    """The model's processor, after checking from its config alone that it is an image-text-to-text model this
    package can score (multi-axis rotary positions only for MROPE_SCORED) and that its processor has an image token."""
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    config = _from_pretrained(AutoConfig, model, "config")
    if type(config) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        raise ConfigError(f"--model {model}: a {config.model_type!r} model is not an image-text-to-text model; a "
                          "LLaVA-style model (vision tower + language model) is needed")
    if config.model_type in REFUSED:
        raise ConfigError(f"--model {model}: {config.model_type} cannot be trained here: {REFUSED[config.model_type]}")
    text = config.get_text_config()
    ropes = [getattr(text, name, None) or {} for name in ("rope_scaling", "rope_parameters")]
    mrope = config.model_type in MROPE_FAMILIES or any("mrope_section" in rope for rope in ropes)
    if mrope and config.model_type not in MROPE_SCORED:
        raise ConfigError(f"--model {model}: {config.model_type} places tokens with multi-axis rotary positions "
                          f"(M-RoPE) in a layout the shared-prompt scoring has not been checked against (it has for "
                          f"{' and '.join(MROPE_SCORED)})")
    processor = _from_pretrained(AutoProcessor, model, "processor")
    if getattr(processor, "image_token", None) is None or getattr(processor, "image_token_ids", [None])[0] is None:
        raise ConfigError(f"--model {model}: its processor ({type(processor).__name__}) has no image token; a "
                          "LLaVA-style processor is needed")
    return processor


def load_model(model: str | Path, dtype: torch.dtype = torch.float32):
    """The model's weights (AutoModelForImageTextToText); checked with `load_processor` first."""
    from transformers import AutoModelForImageTextToText

    loaded = _from_pretrained(AutoModelForImageTextToText, model, "weights", dtype=dtype)
    if not hasattr(loaded, "get_image_features"):
        raise ConfigError(f"--model {model}: {type(loaded).__name__} has no get_image_features; a LLaVA-style model "
                          "(vision tower + language model) is needed")
    return loaded


def load(model: str | Path, dtype: torch.dtype = torch.float32):
    """(model, processor) from a folder or hub id, checked (`load_processor`) before the weights are read."""
    processor = load_processor(model)
    return load_model(model, dtype), processor


def add_lora(model, rank: int, alpha: int | None, targets: tuple[str, ...]):
    """The model wrapped as a peft model with a LoRA on the language model's `targets` projections only (the vision
    tower and projector stay frozen, so their features are the reference's too)."""
    from peft import LoraConfig, get_peft_model

    pattern = rf".*language_model.*\.({'|'.join(targets)})"
    try:
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=pattern,
                                                lora_dropout=0.0))
    except ValueError as err:  # peft: no module of the language model matches the targets
        raise ConfigError(f"--lora-targets {' '.join(targets)}: {err}") from None


def vision_is_frozen(model) -> bool:
    """True when no parameter of the vision tower or projector trains: image features are then the same under the
    policy and its reference."""
    return not any(p.requires_grad for n, p in model.named_parameters() if any(part in n for part in VISION_PARTS))


def save(model, processor, output: Path) -> None:
    """Write the LoRA adapter (peft format) or the whole model, plus the processor, into `output`."""
    model.save_pretrained(str(output))
    processor.save_pretrained(str(output))
