"""Benchmark: `mmalign eval` end to end (images/s generated and scored), and each named scorer's `score` against a
plain loop in the scorer's own published style on the same PIL images (the ratio of times; < 1 is faster).

The plain loops are what a user of each scorer's own code writes: open_clip's preprocess, encode_image,
encode_text and the cosine (HPSv2's img_score, on the tiny open_clip model); the PickScore README with
transformers' processor and CLIPModel; ImageReward.py's `score`, one image at a time; the LAION predictor's
simple_inference, one image at a time. Both paths run under no_grad in alternating order; the ratio is the
median of per-repetition ratios. Tiny random models only (`mmalign.diffusion.tiny`):

    python scripts/benchmark_eval.py --images 32 --repeats 5 --prompts 8 --per-prompt 4 --steps 10

The end-to-end figure includes loading both pipelines and the four scorers, hashing and writing the outputs;
`sampling_only_images_per_s` is the sampler alone on the same prompts and seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from mmalign.diffusion import eval as evaluation
from mmalign.diffusion import world
from mmalign.diffusion.evaluate import fixed_seed_samples
from mmalign.diffusion.models import sampling_pipeline
from mmalign.diffusion.rewards.named import IMAGEREWARD_MEAN, IMAGEREWARD_STD, clip_pixels, load_named
from mmalign.diffusion.tiny import save_tiny_scorers, tiny_pipeline

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a red square"]


@torch.no_grad()
def open_clip_loop(folder: Path, images, prompts):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")

    def run():
        image = F.normalize(model.encode_image(torch.stack([preprocess(im) for im in images])), dim=-1)
        return (image * F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)).sum(-1)
    return run


@torch.no_grad()
def pickscore_readme(folder: Path, images, prompts):
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)

    def run():
        image = model.get_image_features(**processor(images=images, return_tensors="pt")).pooler_output
        text = model.get_text_features(**processor(text=prompts, padding=True, truncation=True, max_length=77,
                                                   return_tensors="pt")).pooler_output
        return model.logit_scale.exp() * F.cosine_similarity(image, text, dim=-1)
    return run


@torch.no_grad()
def imagereward_per_image(folder: Path, images, prompts):
    reward = load_named("imagereward", str(folder)).eval()

    def run():
        scores = []
        for image, prompt in zip(images, prompts):
            tokens = reward.tokenizer(prompt, padding="max_length", truncation=True, max_length=35,
                                      return_tensors="pt")
            states = reward.vision_model(pixel_values=clip_pixels([image], reward.image_size)).last_hidden_state
            cls = reward.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                      encoder_hidden_states=states).last_hidden_state[:, 0]
            scores.append((reward.mlp(cls) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD)
        return torch.cat(scores).squeeze(-1)
    return run


@torch.no_grad()
def laion_per_image(head: Path, backbone: Path, images, prompts):
    scorer = load_named("aesthetic", str(head), str(backbone)).eval()

    def run():
        return torch.cat([scorer.head(F.normalize(scorer.clip.encode_image(scorer.preprocess(im)[None]), dim=-1))
                          for im in images]).squeeze(-1)
    return run


def config_prompts(root: Path) -> list[str]:
    return (root / "prompts.txt").read_text().splitlines()


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def compare(name: str, ours, peer, count: int, repeats: int) -> dict:
    torch.testing.assert_close(ours(), peer(), rtol=1e-3, atol=1e-3)
    t_ours, t_peer, ratios = [], [], []
    for r in range(repeats):
        pair = (ours, peer) if r % 2 == 0 else (peer, ours)
        first, second = timed(pair[0]), timed(pair[1])
        a, b = (first, second) if r % 2 == 0 else (second, first)
        t_ours.append(a)
        t_peer.append(b)
        ratios.append(a / b)
    return {"scorer": name, "images": count, "ours_images_per_s": count / statistics.median(t_ours),
            "own_code_images_per_s": count / statistics.median(t_peer), "time_ratio": statistics.median(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--per-prompt", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = save_tiny_scorers(root / "scorers")
        rng = np.random.default_rng(0)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.images)]
        images = [world.random_scene(rng, p)[1] for p in prompts]
        rows = []
        for name, source, backbone, peer in [
            ("hpsv21", folders["open_clip"] / "open_clip_model.safetensors", "assets/tiny-clip.json",
             open_clip_loop(folders["open_clip"], images, prompts)),
            ("pickscore", folders["clip"], None, pickscore_readme(folders["clip"], images, prompts)),
            ("imagereward", folders["imagereward"], None, imagereward_per_image(folders["imagereward"], images,
                                                                                 prompts)),
            ("aesthetic", folders["aesthetic"], folders["open_clip"],
             laion_per_image(folders["aesthetic"], folders["open_clip"], images, prompts)),
        ]:
            scorer = load_named(name, str(source), None if backbone is None else str(backbone))
            rows.append(compare(name, lambda s=scorer: s.score(images, prompts), peer, len(images), args.repeats))
            print(json.dumps(rows[-1]))

        tiny_pipeline(kind="sd").save_pretrained(root / "sd")
        (root / "prompts.txt").write_text("\n".join(PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)))
        spec = (f"hpsv21={folders['open_clip'] / 'open_clip_model.safetensors'}@assets/tiny-clip.json,"
                f"pickscore={folders['clip']},imagereward={folders['imagereward']},"
                f"aesthetic={folders['aesthetic']}@{folders['open_clip']}:0.5")
        config = evaluation.Config(base=str(root / "sd"), models=[f"again={root / 'sd'}"],
                                   prompts=str(root / "prompts.txt"), scorer=spec, output=root / "eval",
                                   per_prompt=args.per_prompt, steps=args.steps, cpu=True)
        began = time.perf_counter()
        evaluation.run(config)
        seconds = time.perf_counter() - began
        count = 2 * args.prompts * args.per_prompt
        pipe = sampling_pipeline(root / "sd", cpu=True)
        sampling = timed(lambda: fixed_seed_samples(pipe, config_prompts(root), args.per_prompt, steps=args.steps,
                                                    batch_size=config.batch_size))
        print(json.dumps({"eval_end_to_end": {"images": count, "scorers": 4, "steps": args.steps,
                                              "seconds": round(seconds, 2), "images_per_s": count / seconds,
                                              "sampling_only_images_per_s": count / 2 / sampling}}))


if __name__ == "__main__":
    main()
