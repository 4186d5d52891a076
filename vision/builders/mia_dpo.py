"""MIA-DPO (Liu et al. 2024, Liuziyu77/MIA-DPO): multi-image preference pairs built from single-image QA rows.

Composers put the target image among unrelated ones and rewrite the question to name it:

    sequence     N = 2-5 images 'image1 : <image> ... imageN : <image>', the question asks about image k
    grid         one collage of n = 2, 3, 4, 6 or 9 cells, each labelled with its number; the question names cell k
    pic-in-pic   the target pasted at 70% size in the centre of another image; the question asks about the inset

Rejected = the model's own answer to the composed prompt when it differs from the ground truth and its attention
ratio (attention from the answer to the target image's tokens / attention to all image tokens, at the middle
layer, heads averaged) is under the paper's threshold for that layout: the model looked at the wrong image.
Chosen = the ground truth. (The reference code adds noise through uint8 and wraps negative values around; no
noise is added here.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw

from mmalign.config import option
from mmalign.data import DataError, Field, Schema, text
from mmalign.errors import ConfigError

from .. import models
from ..data import ONE_IMAGE, image_entries, image_token_id
from .base import BuilderConfig

THRESHOLDS = {
    "sequence": {2: 0.8, 3: 0.7, 4: 0.6, 5: 0.6},
    "grid": {2: 0.7, 3: 0.6, 4: 0.5, 6: 0.4, 9: 0.3},
    "pic_in_pic": {2: 0.8},
}
"""Attention-ratio thresholds of the paper, by layout and number of images (or cells)."""
SQUARE_GRID_FAMILIES = ("llava",)
"""The families whose image tokens are one square grid per image, row by row (`target_keys`)."""
GRID_SHAPES = {2: (1, 2), 3: (1, 3), 4: (2, 2), 6: (2, 3), 9: (3, 3)}


TEMPLATE = "{images} question : {question} answer :"
"""The prompt of a composed row (the embedded model's); `{images}` holds the <image> placeholders, `{question}` the
question naming the target. For LLaVA 1.5: 'USER: {images}\n{question} ASSISTANT:'."""


def compose_sequence(images: list[Image.Image], target: int, question: str, template: str = TEMPLATE) -> dict:
    """A row with every image in order, each after its label, and the question about image `target` (0-based)."""
    if not 2 <= len(images) <= 5:
        raise ValueError(f"the sequence layout takes 2-5 images, got {len(images)}")
    labels = " ".join(f"image{i + 1} : <image>" for i in range(len(images)))
    return {"prompt": template.format(images=labels, question=f"in image{target + 1} , {question}"),
            "images": list(images), "layout": "sequence", "target": target, "count": len(images)}


def compose_grid(images: list[Image.Image], target: int, question: str, cell: int | None = None,
                 template: str = TEMPLATE) -> dict:
    """A row with one collage of the images in a labelled grid (2, 3, 4, 6 or 9 cells) and the question about cell
    `target` (0-based). Each cell is `cell` px (default: the first image's width); its number is drawn in its corner."""
    if len(images) not in GRID_SHAPES:
        raise ValueError(f"the grid layout takes {', '.join(map(str, GRID_SHAPES))} images, got {len(images)}")
    rows, cols = GRID_SHAPES[len(images)]
    size = cell or images[0].width
    collage = Image.new("RGB", (cols * size, rows * size), (255, 255, 255))
    draw = ImageDraw.Draw(collage)
    for i, image in enumerate(images):
        x, y = (i % cols) * size, (i // cols) * size
        collage.paste(image.convert("RGB").resize((size, size)), (x, y))
        draw.text((x + 1, y), str(i + 1), fill=(0, 0, 0))
    return {"prompt": template.format(images="<image>", question=f"in picture {target + 1} , {question}"),
            "images": [collage], "layout": "grid", "target": target, "count": len(images)}


def compose_pic_in_pic(target_image: Image.Image, background: Image.Image, question: str, scale: float = 0.7,
                       template: str = TEMPLATE) -> dict:
    """A row with the target image pasted at `scale` of the background's size in its centre; the question asks about
    the inset."""
    canvas = background.convert("RGB").copy()
    w, h = round(canvas.width * scale), round(canvas.height * scale)
    canvas.paste(target_image.convert("RGB").resize((w, h)), ((canvas.width - w) // 2, (canvas.height - h) // 2))
    return {"prompt": template.format(images="<image>", question=f"in the inset picture , {question}"),
            "images": [canvas], "layout": "pic_in_pic", "target": 0, "count": 2}


def compose(rows: list[dict], layout: str, count: int, rng: np.random.Generator, template: str = TEMPLATE,
            eos: str = "</s>") -> dict:
    """Compose `count` single-image QA rows {'image', 'question', 'answer'} into one row asking about a random one;
    its 'chosen' is that row's answer followed by `eos`."""
    target = int(rng.integers(count))
    images = [r["image"] for r in rows[:count]]
    question = rows[target]["question"]
    if layout == "sequence":
        row = compose_sequence(images, target, question, template)
    elif layout == "grid":
        row = compose_grid(images, target, question, template=template)
    elif layout == "pic_in_pic":
        row = compose_pic_in_pic(images[0], images[1], rows[0]["question"], template=template)
        target = 0
    else:
        raise ValueError(f"unknown layout {layout!r}; choose sequence, grid or pic_in_pic")
    return {**row, "chosen": f" {rows[target]['answer']} {eos}"}


def attention_ratio(attentions: torch.Tensor, target_keys: torch.Tensor, image_keys: torch.Tensor) -> float:
    """sum attention(answer -> target image tokens) / sum attention(answer -> all image tokens), from one layer's
    attention weights [heads, answer queries, keys] averaged over heads; the key masks are boolean [keys]."""
    weights = attentions.float().mean(0).sum(0)
    return float(weights[target_keys].sum() / weights[image_keys].sum().clamp(min=1e-12))


def target_keys(input_ids: torch.Tensor, image_token_id: int, row: dict) -> torch.Tensor:
    """Boolean [tokens]: the image tokens of the target: the k-th image's block (sequence), the patches inside cell k
    of the collage (grid), or the patches inside the central inset (pic-in-pic)."""
    is_image = input_ids == image_token_id
    positions = is_image.nonzero().flatten()
    inside = torch.zeros(len(positions), dtype=torch.bool)
    if row["layout"] == "sequence":
        per = len(positions) // row["count"]
        inside[row["target"] * per:(row["target"] + 1) * per] = True
    else:
        side = int(round(len(positions) ** 0.5))
        r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        if row["layout"] == "grid":
            rows, cols = GRID_SHAPES[row["count"]]
            inside = ((r * rows // side) * cols + (c * cols // side) == row["target"]).flatten()
        else:
            lo, hi = side * 0.15, side * 0.85
            inside = ((r + 0.5 > lo) & (r + 0.5 < hi) & (c + 0.5 > lo) & (c + 0.5 < hi)).flatten()
    keys = torch.zeros_like(is_image)
    keys[positions[inside]] = True
    return keys


@torch.no_grad()
def answer_and_ratio(model, processor, row: dict) -> tuple[str, float, float]:
    """(greedy first answer word, its probability, attention ratio to the target image at the middle layer)."""
    inputs = processor(images=row["images"], text=row["prompt"], add_special_tokens=False, return_tensors="pt")
    out = model(**inputs, output_attentions=True, logits_to_keep=1)
    probs = out.logits[0, -1].softmax(-1)
    token = int(probs.argmax())
    middle = out.attentions[len(out.attentions) // 2][0][:, -1:]
    ids = inputs["input_ids"][0]
    image_token = image_token_id(processor)
    ratio = attention_ratio(middle, target_keys(ids, image_token, row), ids == image_token)
    return processor.tokenizer.convert_ids_to_tokens(token), float(probs[token]), ratio


def is_rejected(answer: str, truth: str, ratio: float, layout: str, count: int, confidence: float,
                max_confidence: float = 1.0) -> bool:
    """The paper's rule: a wrong answer whose attention ratio is under the layout's threshold (and, optionally, whose
    confidence is under `max_confidence`)."""
    return answer != truth and ratio < THRESHOLDS[layout][count] and confidence < max_confidence


def build_rows(model, processor, qa: list[dict], layout: str, count: int, seed: int = 0,
               max_confidence: float = 1.0, template: str = TEMPLATE) -> tuple[list[dict], dict]:
    """(TRL rows, report): compose groups of `count` QA rows, keep those the model answers wrong while looking away
    from the target (`is_rejected`), chosen = the truth, rejected = the model's answer."""
    rng = np.random.default_rng(seed)
    if getattr(model.config, "_attn_implementation", "eager") != "eager":
        model.set_attn_implementation("eager")  # attention weights are needed
    built, wrong = [], 0
    examples: list[dict[str, Any]] = []
    for start in range(0, len(qa) - count + 1, count):
        row = compose(qa[start:start + count], layout, count, rng, template, processor.tokenizer.eos_token)
        truth = row["chosen"].split()[0]
        answer, confidence, ratio = answer_and_ratio(model, processor, row)
        wrong += answer != truth
        if is_rejected(answer, truth, ratio, layout, count, confidence, max_confidence):
            built.append({"prompt": row["prompt"], "chosen": row["chosen"],
                          "rejected": f" {answer} {processor.tokenizer.eos_token}",
                          "images": row["images"]})
            if len(examples) < 5:
                examples.append({"prompt": row["prompt"], "chosen": truth, "rejected": answer, "ratio": ratio})
    groups = len(qa) // count
    report = {"method": "MIA-DPO", "layout": layout, "count": count, "composed": groups, "wrong": wrong,
              "pairs": len(built), "acceptance_rate": len(built) / max(1, groups),
              "threshold": THRESHOLDS[layout][count], "examples": examples}
    return built, report


@dataclass
class Config(BuilderConfig):
    """MIA-DPO data-building settings."""

    data: str = option(None, "single-image QA rows: question, answer, images (one image each)")
    layout: Literal["sequence", "grid", "pic_in_pic"] = option("sequence", "how the images are composed")
    count: int = option(2, "images per composed prompt (sequence 2-5; grid 2, 3, 4, 6, 9; pic-in-pic 2)")
    template: str = option(TEMPLATE, "prompt template with {images} and {question}")
    max_confidence: float = option(1.0, "keep only wrong answers with a probability under this")
    seed: int = option(0, "seed of the targets")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.count not in THRESHOLDS[self.layout]:
            raise ValueError(f"the {self.layout} layout takes {', '.join(map(str, THRESHOLDS[self.layout]))} images, "
                             f"not {self.count}")


QA_ROW = Schema("single-image QA row (question, answer, images)",
                (Field("question", text), Field("answer", text), Field("images", image_entries)), (ONE_IMAGE,))


def run(config: Config) -> dict:
    """`mmalign vision mia-dpo`: compose, answer, select; write train.parquet and report.json."""
    records = config.opened(config.rows(QA_ROW))
    model, processor = models.load(config.model)
    if model.config.model_type not in SQUARE_GRID_FAMILIES:
        raise ConfigError(f"--model {config.model}: MIA-DPO's attention ratio reads an image's tokens as one square "
                          f"grid, the layout of {', '.join(SQUARE_GRID_FAMILIES)}; {model.config.model_type} lays them "
                          "out otherwise (tiles, merged patches of any shape)")
    qa = [{"image": r["images"][0], "question": r["question"], "answer": r["answer"]} for r in records]
    rows, report = build_rows(model.eval(), processor, qa, config.layout, config.count, config.seed,
                              config.max_confidence, config.template)
    if not rows:
        raise DataError(f"{config.data}: no composed prompt of {config.count} rows was answered wrong with low "
                        "attention to its target; nothing was written")
    return config.write(rows, report)
