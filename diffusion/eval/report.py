"""What an evaluation reports: per scorer, each model's mean with its 95% CI, each aligned model's paired win rate
and mean gain against the base, per-prompt means; as JSON, a Markdown table and best/worst prompt grids."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from mmalign.stats import mean_ci, win_rate

from ..sample import image_grid


def summarise(scores: dict[str, dict[str, torch.Tensor]], base: str, per_prompt: int, resamples: int,
              seed: int) -> dict:
    """scores[scorer][model] = [P * per_prompt] (sample i of prompt i // per_prompt, the same seed for every model):
    per scorer, {model: mean/CI} and {aligned model: win rate and gain against `base`, paired by sample}."""
    summary = {}
    for scorer, by_model in scores.items():
        reference = by_model[base]
        summary[scorer] = {
            "mean": {model: mean_ci(values) for model, values in by_model.items()},
            "against_base": {model: {"win_rate": win_rate(values, reference, resamples, seed),
                                     "gain": mean_ci(values - reference)}
                             for model, values in by_model.items() if model != base},
        }
    return summary


def per_prompt_rows(prompts: list[str], scores: dict[str, dict[str, torch.Tensor]], per_prompt: int) -> list[dict]:
    """One row per prompt: each scorer's mean over the prompt's samples, for each model."""
    means = {scorer: {model: values.view(len(prompts), per_prompt).mean(1) for model, values in by_model.items()}
             for scorer, by_model in scores.items()}
    return [{"index": k, "prompt": prompt, "mean": {scorer: {model: float(m[k]) for model, m in by_model.items()}
                                                    for scorer, by_model in means.items()}}
            for k, prompt in enumerate(prompts)]


def ranked_prompts(rows: list[dict], scorer: str, model: str, base: str) -> list[int]:
    """Prompt indices by the model's per-prompt gain over the base under `scorer`, largest first."""
    gains = [row["mean"][scorer][model] - row["mean"][scorer][base] for row in rows]
    return sorted(range(len(rows)), key=lambda k: -gains[k])


def comparison_grid(files: dict[str, list[Path]], prompts: list[int], base: str, model: str, per_prompt: int,
                    scale: int) -> Image.Image:
    """Rows: the prompts; columns: the base's samples of the prompt, then the model's, on the same seeds."""
    from torchvision.transforms.functional import pil_to_tensor

    tiles = [pil_to_tensor(Image.open(files[name][k * per_prompt + j]).convert("RGB")).float() / 255
             for k in prompts for name in (base, model) for j in range(per_prompt)]
    return image_grid(torch.stack(tiles), columns=2 * per_prompt, scale=scale)


def markdown(result: dict) -> str:
    """The tables a person reads: per scorer, each model's mean, win rate and gain against the base, with 95% CIs."""
    base = result["models"]["base"]["name"]
    lines = [f"# Evaluation: {len(result['prompts'])} prompts x {result['sampling']['per_prompt']} seeds", "",
             f"Base: `{base}`. Win rate: the share of (prompt, seed) samples on which the model scores above the base, "
             "ties counting half, with a 95% paired bootstrap CI over the samples "
             f"({result['statistics']['bootstrap_resamples']} resamples). Gain: mean score difference, 95% normal CI.",
             ""]
    for scorer, summary in result["summary"].items():
        lines += [f"## {scorer}", "", "| model | mean (95% CI) | win rate vs base (95% CI) | gain (95% CI) |",
                  "|---|---|---|---|"]
        for model, m in summary["mean"].items():
            row = f"| `{model}` | {m['mean']:.4f} ({m['ci_low']:.4f} .. {m['ci_high']:.4f}) |"
            if model == base:
                lines.append(row + " - | - |")
                continue
            w, g = summary["against_base"][model]["win_rate"], summary["against_base"][model]["gain"]
            lines.append(row + f" {w['win_rate']:.3f} ({w['ci_low']:.3f} .. {w['ci_high']:.3f}) |"
                         f" {g['mean']:+.4f} ({g['ci_low']:+.4f} .. {g['ci_high']:+.4f}) |")
        lines.append("")
    s = result["sampling"]
    lines += ["## Reproducibility", "",
              *[f"- `{name}`: {m['sampler']['pipeline']} with {m['sampler']['scheduler']}, {m['sampler']['dtype']}"
                for name, m in result["models"].items()],
              f"- {s['steps']} steps, guidance {s['guidance_scale']}, {s['height']}x{s['width']} px",
              f"- seeds: sample i (prompt i // {s['per_prompt']}) uses seed {s['seed']} + i, "
              f"{s['seed']} .. {s['seed'] + len(result['prompts']) * s['per_prompt'] - 1}",
              f"- reward: `{result['reward']['spec']}` (weights {result['reward']['weights']})",
              "- sha256 of every weight file: eval.json (`models`, `reward.files`)", ""]
    return "\n".join(lines)
