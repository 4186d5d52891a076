"""`mmalign eval`: a base pipeline and aligned models sampled on the same prompts and seeds, scored by reward models.

Every model draws `per_prompt` samples of every prompt, sample i (of prompt i // per_prompt) with generator seed
`seed + i` (`evaluate.fixed_seed_samples`), so the base and each aligned model are compared sample by sample.
Each scorer of the reward spec (and their weighted sum, when there are several) gives per model its mean with a
95% CI, and per aligned model the paired win rate against the base, mean_i(1[s_model,i > s_base,i] + 0.5 *
1[s_model,i = s_base,i]) (ties count half), with a 95% percentile bootstrap CI over the samples (`stats.win_rate`),
and the mean gain with its 95% CI. The output folder holds eval.json (everything, with per-prompt means and the
settings that make the numbers reproducible: sampler class and settings, steps, guidance, resolution, seeds, and
the sha256 of every model and scorer weight file), eval.md (the tables), per_prompt.jsonl, the samples as PNG
files (samples/<model>/) and grids/<model>_best.png and _worst.png: the prompts where the model gained most and
least over the base (first scorer, or the weighted sum), base samples left and the model's right, seed by seed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mmalign import run_folder
from mmalign.config import option
from mmalign.errors import ConfigError
from mmalign.files import write_atomically
from mmalign.trainer import TRAINABLE_FILE

from ..evaluate import fixed_seed_samples
from ..models import sampling_pipeline
from ..rewards.combine import WeightedReward, load_reward_spec, parse_reward_spec, weights_of
from ..sample import save_images
from .models import (
    hashes,
    kind_of,
    load_model,
    local_weight_files,
    parse_model,
    sampler_record,
    sha256,
    weight_files,
)
from .prompts import read_prompt_set
from .report import comparison_grid, markdown, per_prompt_rows, ranked_prompts, summarise

WEIGHTED = "weighted"


@dataclass
class Config:
    """Settings of `mmalign eval`."""

    base: str = option(None, "the base pipeline: diffusers folder, hub id, or single-file checkpoint")
    models: list[str] = option([], "aligned models, each [NAME=]PATH: a LoRA folder or file, a pipeline folder, or a "
                                   "run checkpoint (checkpoints/checkpoint-N)")
    prompts: str = option(None, "prompt set: .txt (one prompt a line), .csv or .jsonl (the --prompt-column)")
    prompt_column: str = option("prompt", "column of a .csv or field of a .jsonl prompt set")
    scorer: str = option(None, "reward spec: NAME[=SOURCE][@BACKBONE][:WEIGHT],... (pickscore, clipscore, hpsv2, "
                               "hpsv21, imagereward, aesthetic, openclip)")
    output: Path = option(None, "folder for eval.json, eval.md, samples and grids: a new or empty one")
    per_prompt: int = option(4, "samples (seeds) per prompt and model")
    seed: int = option(1000, "sample i uses generator seed `seed + i`")
    steps: int = option(25, "sampler steps")
    guidance_scale: float = option(5.0, "classifier-free guidance scale")
    resolution: int | None = option(None, "image height and width (default: the pipeline's own)")
    batch_size: int = option(16, "images per pipeline call")
    score_batch_size: int = option(32, "images per scorer forward")
    grid_prompts: int = option(4, "prompts in each best/worst grid")
    bootstrap_resamples: int = option(10000, "bootstrap resamples of the win-rate CI")
    bootstrap_seed: int = option(0, "seed of the bootstrap resampling")
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", "weight dtype of the pipelines")
    cpu: bool = option(False, "run on the CPU even when a GPU is present")

    def __post_init__(self) -> None:
        for name in ("base", "prompts", "scorer", "output"):
            if not getattr(self, name):
                raise ValueError(f"--{name.replace('_', '-')} is required")
        if not self.models:
            raise ValueError("--models: give at least one aligned model to compare with the base")
        self.output = Path(self.output)
        if min(self.per_prompt, self.batch_size, self.score_batch_size, self.grid_prompts) < 1 or \
                self.bootstrap_resamples < 100 or (self.resolution is not None and self.resolution < 1):
            raise ValueError("per_prompt, batch sizes, grid_prompts and resolution must be at least 1, "
                             "bootstrap_resamples at least 100")
        names = [parse_model(m)[0] for m in self.models]
        if len(names) != len(set(names)) or "base" in names:
            raise ValueError(f"--models: each model needs a name of its own, not 'base' (the base model's): "
                             f"{', '.join(names)}; name them NAME=PATH")
        parse_reward_spec(self.scorer, "--scorer")  # a bad spec stops before any model loads


def file_stem(name: str) -> str:
    """A model's name as a file or folder name: runs of characters other than letters, digits and ._- become _."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def run(config: Config) -> dict:
    """Sample, score and compare; writes everything into config.output, a folder of its own (new or empty)."""
    prompts = read_prompt_set(config.prompts, config.prompt_column)
    models = dict(parse_model(m) for m in config.models)
    for path in models.values():
        kind_of(path)
    with run_folder.claim(config.output, resuming=False):
        return evaluate(config, prompts, models)


def evaluate(config: Config, prompts: list[str], models: dict[str, str]) -> dict:
    """The body of `run`, in the claimed output folder."""
    base = "base"
    pipe = sampling_pipeline(config.base, None, config.mixed_precision, config.cpu)
    reward = load_reward_spec(config.scorer, pipe.device, "--scorer")
    scores: dict[str, dict[str, torch.Tensor]] = {}
    files: dict[str, list[Path]] = {}
    samplers = {}
    for name, path in [(base, config.base), *models.items()]:
        if name != base:
            pipe = load_model(path, config.base, config.mixed_precision, config.cpu)
        samplers[name] = sampler_record(pipe)
        for scorer, values in sample_and_score(pipe, reward, prompts, config, name, files).items():
            scores.setdefault(scorer, {})[name] = values
    result = record(config, prompts, models, reward, samplers, files[base][0], scores)
    rows = per_prompt_rows(prompts, scores, config.per_prompt)
    write_outputs(config, result, rows, files, base)
    return result


def sample_and_score(pipe, reward: WeightedReward, prompts: list[str], config: Config, name: str,
                     files: dict[str, list[Path]]) -> dict[str, torch.Tensor]:
    """All samples of one model, `batch_size // per_prompt` prompts at a time: saved as PNG (file list in `files`),
    scored by every term (and the weighted sum): {scorer: [P * per_prompt]}."""
    chunk = max(1, config.batch_size // config.per_prompt)
    size = {"height": config.resolution, "width": config.resolution} if config.resolution else {}
    folder = config.output / "samples" / file_stem(name)
    parts: dict[str, list[torch.Tensor]] = {}
    files[name] = []
    for start in range(0, len(prompts), chunk):
        expanded, images = fixed_seed_samples(pipe, prompts[start:start + chunk], config.per_prompt,
                                              config.seed + start * config.per_prompt, config.steps,
                                              config.guidance_scale, batch_size=config.batch_size, **size)
        files[name] += save_images(images, folder, prefix=f"{start * config.per_prompt:06d}")
        terms = reward.term_scores(images, expanded, config.score_batch_size)
        if len(terms) > 1:
            terms[WEIGHTED] = reward.combine(terms)
        for scorer, values in terms.items():
            if not torch.isfinite(values).all():
                raise ConfigError(f"--scorer {scorer} returned NaN or infinite scores on samples of {name}")
            parts.setdefault(scorer, []).append(values.double())
    return {scorer: torch.cat(values) for scorer, values in parts.items()}


def record(config: Config, prompts: list[str], models: dict[str, str], reward: WeightedReward,
           samplers: dict[str, dict], sample: Path, scores: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """eval.json: the summary and everything that makes it reproducible."""
    from PIL import Image

    cache: dict[Path, str] = {}
    width, height = Image.open(sample).size
    entries = {"base": {"name": "base", "path": config.base, "kind": "base", "sampler": samplers["base"],
                        "files": hashes(local_weight_files(config.base), cache)}}
    for name, path in models.items():
        kind = kind_of(path)
        own = [Path(path) / TRAINABLE_FILE] if kind == "checkpoint" else weight_files(path)
        entries[name] = {"name": name, "path": path, "kind": kind, "sampler": samplers[name],
                         "files": hashes(own, cache)}
    return {
        "prompts": prompts, "prompts_file": {"path": config.prompts, "column": config.prompt_column,
                                             "sha256": sha256(Path(config.prompts), cache)},
        "models": entries,
        "reward": {"spec": config.scorer, "weights": weights_of(reward), "standardised": False,
                   "files": hashes(reward.files, cache)},
        "sampling": {"per_prompt": config.per_prompt, "seed": config.seed, "seeds": "sample i uses seed + i",
                     "steps": config.steps, "guidance_scale": config.guidance_scale, "height": height, "width": width,
                     "batch_size": config.batch_size},
        "statistics": {"mean_ci": "mean +- 1.96 * std / sqrt(n)",
                       "win_rate": "mean(1[model > base] + 0.5 * 1[model = base]), paired by sample; 95% percentile "
                                   "bootstrap CI over the samples (scipy.stats.bootstrap)",
                       "bootstrap_resamples": config.bootstrap_resamples, "bootstrap_seed": config.bootstrap_seed},
        "summary": summarise(scores, "base", config.per_prompt, config.bootstrap_resamples, config.bootstrap_seed),
    }


def write_outputs(config: Config, result: dict, rows: list[dict], files: dict[str, list[Path]], base: str) -> None:
    """eval.json, eval.md, per_prompt.jsonl and the best/worst grids; prints the tables."""
    result["per_prompt"] = rows
    primary = WEIGHTED if WEIGHTED in result["summary"] else next(iter(result["summary"]))
    grids = config.output / "grids"
    grids.mkdir(exist_ok=True)
    count = min(config.grid_prompts, len(rows))
    for model in result["models"]:
        if model == base:
            continue
        order = ranked_prompts(rows, primary, model, base)
        stem = file_stem(model)
        for which, chosen in (("best", order[:count]), ("worst", order[::-1][:count])):
            grid = comparison_grid(files, chosen, base, model, config.per_prompt, max(1, 128 // result["sampling"]
                                                                                      ["width"]))
            grid.save(grids / f"{stem}_{which}.png")
    result["grids"] = {"scorer": primary, "prompts": count, "folder": str(grids)}
    text = markdown(result)
    write_atomically(config.output / "eval.json", lambda p: p.write_text(json.dumps(result, indent=2)))
    write_atomically(config.output / "eval.md", lambda p: p.write_text(text))
    write_atomically(config.output / "per_prompt.jsonl",
                     lambda p: p.write_text("".join(json.dumps(row) + "\n" for row in rows)))
    print(text)
