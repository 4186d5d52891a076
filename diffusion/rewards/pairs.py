"""`mmalign reward pairs`: generate, rank, pair (UnifiedReward's data pipeline) into a Pick-a-Pic dataset.

For each prompt, N images are sampled from the pipeline on fixed seeds (image i of the run uses seed
`seed + i`), scored by the reward model, and turned into (chosen, rejected) pairs:

    best-worst   the highest- against the lowest-scored sample, kept when s_best - s_worst >= margin
    margin       every (i, j) with s_i - s_j >= margin, largest gaps first, at most max_pairs_per_prompt

then filtered by point sifting (the chosen image's own score must reach --min-chosen-score). Equal scores
never make a pair. The chosen image is jpg_0 (label_0 = 1); score_0 and score_1 are kept as columns. The
output folder's pairs.parquet is what `mmalign diffusion dpo --data` reads; report.json holds the counts
and the throughput of each stage, ranked.png the first prompts' samples sorted by score.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mmalign import run_folder
from mmalign.config import option
from mmalign.errors import ConfigError

from ..data import read_prompts, write_pickapic
from ..models import sampling_pipeline
from ..sample import generate, image_grid, to_pil
from ..world import png_bytes
from .scorers import ScorerOptions

OUTPUT_FILE = "pairs.parquet"
GRID_PROMPTS = 16


def select_pairs(scores: torch.Tensor, strategy: str = "best-worst", margin: float = 0.0, max_pairs: int = 0,
                 min_chosen_score: float | None = None) -> list[tuple[int, int]]:
    """(chosen, rejected) indices among one prompt's N sample scores: best vs worst, or all pairs >= margin apart."""
    order = scores.argsort(descending=True).tolist()
    if strategy == "best-worst":
        candidates = [(order[0], order[-1])]
    elif strategy == "margin":
        candidates = sorted(((i, j) for i in order for j in order if i != j),
                            key=lambda pair: float(scores[pair[1]] - scores[pair[0]]))
    else:
        raise ValueError(f"unknown pairing strategy {strategy!r}; choose best-worst or margin")
    kept = [(chosen, rejected) for chosen, rejected in candidates
            if scores[chosen] > scores[rejected] and scores[chosen] - scores[rejected] >= margin
            and (min_chosen_score is None or scores[chosen] >= min_chosen_score)]
    return kept[:max_pairs] if max_pairs > 0 else kept


@dataclass
class Config(ScorerOptions):
    """Settings of `mmalign reward pairs`."""

    model: str = option(None, "diffusers SD/SDXL folder, hub id, or single-file checkpoint to sample from")
    lora: str | None = option(None, "folder or file of LoRA weights to load into the pipeline")
    prompts: str = option(None, "text file, one prompt per line")
    output: Path = option(None, f"folder for {OUTPUT_FILE}, report.json and ranked.png: a new or empty one")
    num_per_prompt: int = option(8, "images sampled per prompt")
    seed: int = option(0, "image i of the run uses generator seed `seed + i`")
    steps: int = option(25, "sampler steps")
    guidance_scale: float = option(5.0, "classifier-free guidance scale")
    batch_size: int = option(32, "images per pipeline call (rounded down to whole prompts)")
    score_batch_size: int = option(64, "images per scorer forward")
    strategy: Literal["best-worst", "margin"] = option("best-worst", "best-worst: one pair per prompt; margin: every "
                                                       "pair whose score gap reaches --margin")
    margin: float = option(0.0, "smallest score gap s_chosen - s_rejected a pair may have")
    max_pairs_per_prompt: int = option(0, "with --strategy margin: keep the largest gaps only (0: no limit)")
    min_chosen_score: float | None = option(None, "point sifting: drop pairs whose chosen image scores below this")
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", "weight dtype of the pipeline and the scorer")
    cpu: bool = option(False, "run on the CPU even when a GPU is present")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("model", "prompts", "output"):
            if not getattr(self, name):
                raise ValueError(f"--{name.replace('_', '-')} is required")
        self.output = Path(self.output)
        if self.num_per_prompt < 2:
            raise ValueError(f"num_per_prompt must be at least 2 to make a pair, got {self.num_per_prompt}")
        if min(self.batch_size, self.score_batch_size) < 1 or self.margin < 0 or self.max_pairs_per_prompt < 0:
            raise ValueError("batch sizes must be at least 1; margin and max_pairs_per_prompt must not be negative")


def run(config: Config) -> dict:
    """Sample, score and pair every prompt; write pairs.parquet, report.json and ranked.png into config.output, a
    folder of its own (new or empty, `mmalign.run_folder`); returns the report."""
    with run_folder.claim(config.output, resuming=False):
        return make_pairs(config)


def make_pairs(config: Config) -> dict:
    """The body of `run`, in the claimed output folder."""
    prompts = read_prompts(config.prompts)
    pipe = sampling_pipeline(config.model, config.lora, config.mixed_precision, config.cpu)
    scorer = config.load_scorer(config.mixed_precision, pipe.device)
    n = config.num_per_prompt
    chunk = max(1, config.batch_size // n)
    rows: list[dict[str, Any]] = []
    shown, all_scores = [], []
    seconds = {"generate": 0.0, "score": 0.0, "pair": 0.0}
    for start in range(0, len(prompts), chunk):
        part = prompts[start:start + chunk]
        expanded = [p for p in part for _ in range(n)]
        began = time.perf_counter()
        images = generate(pipe, expanded, seed=config.seed + start * n, steps=config.steps,
                          guidance_scale=config.guidance_scale, batch_size=len(expanded))
        seconds["generate"] += time.perf_counter() - began
        began = time.perf_counter()
        scores = scorer.score(images, expanded, config.score_batch_size).view(len(part), n)
        seconds["score"] += time.perf_counter() - began
        began = time.perf_counter()
        pictures = to_pil(images)
        for k, prompt in enumerate(part):
            for chosen, rejected in select_pairs(scores[k], config.strategy, config.margin,
                                                 config.max_pairs_per_prompt, config.min_chosen_score):
                rows.append({"caption": prompt, "jpg_0": png_bytes(pictures[k * n + chosen]),
                             "jpg_1": png_bytes(pictures[k * n + rejected]), "label_0": 1.0,
                             "score_0": float(scores[k, chosen]), "score_1": float(scores[k, rejected])})
            if start + k < GRID_PROMPTS:
                shown.append(images[k * n:(k + 1) * n][scores[k].argsort(descending=True)])
        seconds["pair"] += time.perf_counter() - began
        all_scores.append(scores)
    if not rows:
        raise ConfigError(f"no pair passed the filters (strategy {config.strategy}, margin {config.margin}, "
                          f"min_chosen_score {config.min_chosen_score}) among {len(prompts) * n} samples")
    write_pickapic(rows, config.output / OUTPUT_FILE)
    image_grid(torch.cat(shown), columns=n, scale=max(1, 128 // shown[0].shape[-1])).save(config.output / "ranked.png")
    gaps = torch.tensor([r["score_0"] - r["score_1"] for r in rows])
    total = sum(seconds.values())
    report: dict[str, Any] = {
        "prompts": len(prompts), "samples": len(prompts) * n, "pairs": len(rows),
        "prompts_with_pairs": len({r["caption"] for r in rows}),
        "score": {"mean": float(torch.cat(all_scores).mean()), "mean_pair_gap": float(gaps.mean())},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "images_per_second": {"generate": len(prompts) * n / seconds["generate"],
                              "score": len(prompts) * n / seconds["score"], "end_to_end": len(prompts) * n / total},
    }
    (config.output / "report.json").write_text(json.dumps(report, indent=2))
    print(f"{report['pairs']} pairs from {report['samples']} samples of {len(prompts)} prompts "
          f"(mean gap {report['score']['mean_pair_gap']:.3f}); {report['images_per_second']['end_to_end']:.1f} "
          f"images/s end to end; wrote {config.output / OUTPUT_FILE}")
    return report
