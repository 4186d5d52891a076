"""Benchmark: images/s of `Scorer.score` against open_clip's encoders called directly on the same batch, and the
throughput of generate-rank-pair (`mmalign reward pairs`) on the embedded model.

The direct path is what a user of open_clip writes: the model's own eval transform on the [0, 1] batch,
`encode_image`, `encode_text` of the tokenized prompts, both normalised, `logit_scale.exp() * cos`. Both run
under no_grad on the same inputs, in alternating order; the ratio is the median of per-repetition ratios.

    python scripts/benchmark_rewards.py --arch ViT-B-32 --batch 32 --repeats 7
    python scripts/benchmark_rewards.py --arch tiny --batch 64 --size 32 --repeats 21 --pairs-repeats 0
    python scripts/benchmark_rewards.py --pairs-only
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mmalign.diffusion import world
from mmalign.diffusion.rewards import load_scorer, save_scorer
from mmalign.diffusion.rewards import pairs as reward_pairs

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@torch.no_grad()
def direct(scorer, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    clip = scorer.clip
    image = clip.encode_image(scorer.preprocess(images), normalize=True)
    text = clip.encode_text(scorer.tokenizer(prompts), normalize=True)
    return clip.logit_scale.exp() * (image * text).sum(-1)


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def score_overhead(arch: str, batch: int, size: int, repeats: int, distinct: bool) -> dict:
    scorer = load_scorer(ASSETS / "tiny-clip.json" if arch == "tiny" else arch).eval()
    images = torch.rand(batch, 3, size, size)
    prompts = [f"a photo of object number {i}" if distinct else "a red circle" for i in range(batch)]
    torch.testing.assert_close(scorer.score(images, prompts, batch_size=batch), direct(scorer, images, prompts))
    ratios, ours, peer = [], [], []
    for r in range(repeats):
        pair = [lambda: scorer.score(images, prompts, batch_size=batch), lambda: direct(scorer, images, prompts)]
        times = [timed(f) for f in (pair if r % 2 == 0 else pair[::-1])]
        t_ours, t_peer = times if r % 2 == 0 else times[::-1]
        ours.append(t_ours)
        peer.append(t_peer)
        ratios.append(t_ours / t_peer)
    return {"arch": arch, "batch": batch, "input_px": size, "distinct_prompts": distinct,
            "ours_images_per_s": batch / statistics.median(ours),
            "direct_images_per_s": batch / statistics.median(peer),
            "time_ratio_median": statistics.median(ratios), "time_ratio_min_max": [min(ratios), max(ratios)]}


def pairs_throughput(prompts_per_caption: int, n: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        torch.manual_seed(0)
        save_scorer(load_scorer(ASSETS / "tiny-clip.json"), tmp / "scorer")
        (tmp / "prompts.txt").write_text("\n".join(list(world.CAPTIONS) * prompts_per_caption) + "\n")
        report = reward_pairs.run(reward_pairs.Config(
            scorer=str(tmp / "scorer"), model=str(ASSETS / "tiny-sd"), prompts=str(tmp / "prompts.txt"),
            output=tmp / "pairs", num_per_prompt=n, steps=20, batch_size=128, strategy="best-worst"))
    return {k: report[k] for k in ("samples", "pairs", "seconds", "images_per_second")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="ViT-B-32", help="open_clip architecture (random weights) or 'tiny'")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=256, help="side of the input images (resized by the transform)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--pairs-only", action="store_true")
    parser.add_argument("--pairs-repeats", type=int, default=4, help="copies of the 12 captions for the pairs run "
                                                                       "(0: no pairs run)")
    args = parser.parse_args()
    results: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    if not args.pairs_only:
        results["score"] = [score_overhead(args.arch, args.batch, args.size, args.repeats, distinct)
                            for distinct in (True, False)]
    if args.pairs_repeats > 0:
        results["pairs"] = pairs_throughput(args.pairs_repeats, 8)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
