"""The models an evaluation compares: a base pipeline and aligned ones, each what a trainer writes; with the sha256 of
every weight file they are read from.

    FOLDER with model_index.json       a whole pipeline (a --full run, or any diffusers pipeline)
    FOLDER with trainer_state.json     a checkpoint of a run (checkpoints/checkpoint-N): the trainable weights on the
                                       base, LoRA or full as the run's config.yaml says
    other FOLDER or FILE               LoRA weights on the base (a LoRA run, or any diffusers LoRA)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from mmalign.config import load_yaml
from mmalign.data import one_line
from mmalign.errors import ConfigError
from mmalign.hub import is_repo_id
from mmalign.trainer import TRAINABLE_FILE, TRAINER_STATE

from ..models import LORA_TARGETS, add_lora, denoiser_of, sampling_pipeline
from ..rewards.named import WEIGHT_SUFFIXES


def parse_model(spec: str) -> tuple[str, str]:
    """`NAME=PATH` or `PATH` (named after its last path parts) as (name, path)."""
    name, sep, path = spec.partition("=")
    if not sep:
        parts = Path(spec).parts
        return "/".join(parts[-2:]) if len(parts) > 1 and parts[-2] == "checkpoints" else Path(spec).name, spec
    if not name or not path:
        raise ConfigError(f"--models {spec!r}: give NAME=PATH or PATH")
    return name, path


def kind_of(path: str | Path) -> str:
    """pipeline, checkpoint or lora (see the module docstring)."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return "pipeline"
    if (path / TRAINER_STATE).is_file():
        return "checkpoint"
    if not path.exists():
        raise ConfigError(f"--models {path}: no such file or folder")
    return "lora"


def load_model(path: str | Path, base: str, mixed_precision: str = "no", cpu: bool = False):
    """A sampling pipeline for an aligned model at `path` (on `base` unless it is a whole pipeline)."""
    kind = kind_of(path)
    if kind == "pipeline":
        return sampling_pipeline(path, None, mixed_precision, cpu)
    if kind == "lora":
        return sampling_pipeline(base, str(path), mixed_precision, cpu)
    pipe = sampling_pipeline(base, None, mixed_precision, cpu)
    load_checkpoint(pipe, Path(path))
    return pipe


def load_checkpoint(pipe, folder: Path) -> None:
    """Put a run checkpoint's trainable weights into the pipeline's denoiser: whole (a --full run) or as its LoRA."""
    from safetensors.torch import load_file

    config_file = folder.parent.parent / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"--models {folder}: a checkpoint is read with its run's config.yaml, and {config_file} "
                          "does not exist")
    run = load_yaml(config_file)
    model = denoiser_of(pipe)
    if not run.get("full", False):
        add_lora(model, int(run.get("lora_rank", 8)), run.get("lora_alpha"),
                 tuple(run.get("lora_targets") or LORA_TARGETS))
    weights = load_file(str(folder / TRAINABLE_FILE))
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    unknown, missing = sorted(set(weights) - trained), sorted(trained - set(weights))
    if unknown or missing:
        raise ConfigError(f"--models {folder}: {TRAINABLE_FILE} does not fit the denoiser of the base as its run's "
                          f"config.yaml sets it up (unexpected {', '.join(unknown[:3]) or 'none'}; missing "
                          f"{', '.join(missing[:3]) or 'none'}); was it written by another method or model?")
    try:
        model.load_state_dict(weights, strict=False)
    except RuntimeError as err:
        raise ConfigError(f"--models {folder}: {TRAINABLE_FILE} does not fit the denoiser ({one_line(err)})") from None
    model.to(pipe.device, next(model.parameters()).dtype)


def weight_files(path: str | Path) -> list[Path]:
    """The weight files of a model path: the file itself, or the weight files under a folder (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                  and "checkpoints" not in p.relative_to(path).parts)


def local_weight_files(model: str) -> list[Path]:
    """`weight_files` of a local path, or of a hub model's cached snapshot (what `from_pretrained` read)."""
    if Path(model).exists() or not is_repo_id(model):
        return weight_files(model)
    from huggingface_hub import snapshot_download

    try:
        return weight_files(snapshot_download(model, local_files_only=True))
    except (OSError, ValueError):  # not in the cache as a whole snapshot: nothing to hash here
        return []


def sha256(path: Path, cache: dict[Path, str]) -> str:
    """The sha256 of a file's bytes (read once per evaluation)."""
    if path not in cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        cache[path] = digest.hexdigest()
    return cache[path]


def hashes(paths: list[Path], cache: dict[Path, str]) -> dict[str, str]:
    """{path: sha256} of the files."""
    return {str(path): sha256(path, cache) for path in paths}


def sampler_record(pipe) -> dict:
    """The sampler: its class and settings (the scheduler's config), and the pipeline's class."""
    config = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
    return {"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
            "scheduler_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()},
            "dtype": str(next(denoiser_of(pipe).parameters()).dtype).removeprefix("torch."),
            "device": str(pipe.device), "torch": torch.__version__}
