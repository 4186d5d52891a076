"""rDPO / Re-Align (taco-group/Re-Align): rejected responses that hallucinate what a similar image shows, plus that
image v' for the visual term (`mmalign vision dpo --visual-term retrieved`).

For each row (prompt, chosen, one image v): v' = the most similar other image of the pool by cosine similarity of
image embeddings (the VLM's own vision tower, mean-pooled projected features, or any `embed(images) -> [N, D]`,
e.g. an open_clip image encoder); the object/attribute words of the chosen response (those in `vocabulary`) are
masked and the model fills each one in, left to right, given v' instead of v. The pair is kept when the text
similarity of rejected to chosen is under `threshold` (0.95). Rows keep v' in `retrieved_images`.

The paper finds object/attribute words with a tagger; none ships here offline, so the caller names them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mmalign.config import option
from mmalign.data import DataError, Field, Schema, text

from .. import models
from ..data import MATCHED_IMAGES, ONE_IMAGE, image_entries, image_inputs
from ..scoring import image_features
from .base import BuilderConfig
from .bdhs import bow_cosine

SOURCE_ROW = Schema("rDPO source row (plain-text prompt and chosen, one image)", (
    Field("prompt", text), Field("chosen", text), Field("images", image_entries)), (MATCHED_IMAGES, ONE_IMAGE))


class RetrievalIndex:
    """Unit-normalised embeddings of a pool of images; `nearest` gives each query's top-k by cosine similarity."""

    def __init__(self, embeddings: torch.Tensor):
        self.embeddings = torch.nn.functional.normalize(embeddings.float(), dim=-1)

    def nearest(self, queries: torch.Tensor, k: int = 1, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """[Q, k] pool indices of the most similar images, most similar first; `exclude[q]` (a pool index, e.g. the
        query itself) is never returned."""
        sims = torch.nn.functional.normalize(queries.float(), dim=-1) @ self.embeddings.T
        if exclude is not None:
            sims[torch.arange(len(sims)), exclude] = float("-inf")
        return sims.topk(k, dim=-1).indices


@torch.no_grad()
def vision_tower_embeddings(model, processor, images: list, batch_size: int = 64) -> torch.Tensor:
    """[N, D] image embeddings from the VLM itself: its projected image features averaged over tokens."""
    out, device = [], next(model.parameters()).device
    for start in range(0, len(images), batch_size):
        processed = processor.image_processor(images[start:start + batch_size], return_tensors="pt")
        inputs = image_inputs(processor, processed)
        features = image_features(model, {"images": {name: x.to(device) for name, x in inputs.items()}})
        assert features is not None  # a batch with images
        out.append(torch.stack([f.mean(0) for f in features]).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def fill_masked(model, processor, prompt: str, image, chosen: str, vocabulary: set[str]) -> str:
    """The chosen response with each vocabulary word replaced, left to right, by the model's most likely word given
    `image` (v'), the prompt and the response so far."""
    words, tok = chosen.split(" "), processor.tokenizer
    for i, word in enumerate(words):
        if word not in vocabulary:
            continue
        context = prompt + " ".join(words[:i])
        inputs = processor(images=[image], text=context.rstrip(), add_special_tokens=False, return_tensors="pt")
        logits = model(**inputs, logits_to_keep=1).logits[0, -1]
        words[i] = tok.decode([int(logits.argmax())]).strip() or word
    return " ".join(words)


def build_rows(model, processor, rows: list[dict], vocabulary: set[str],
               embed: Callable[[list], torch.Tensor] | None = None, threshold: float = 0.95) -> tuple[list[dict], dict]:
    """(TRL rows with rejected responses and `retrieved_images`, report) from rows {prompt, chosen, images: [v]}."""
    images = [row["images"][0] for row in rows]
    embeddings = embed(images) if embed is not None else vision_tower_embeddings(model, processor, images)
    nearest = RetrievalIndex(embeddings).nearest(embeddings, k=1, exclude=torch.arange(len(rows)))[:, 0].tolist()
    built = []
    examples: list[dict[str, Any]] = []
    for row, j in zip(rows, nearest):
        rejected = fill_masked(model, processor, row["prompt"], images[j], row["chosen"], vocabulary)
        if bow_cosine(rejected, row["chosen"]) >= threshold:
            continue
        built.append({**row, "rejected": rejected, "retrieved_images": [images[j]]})
        if len(examples) < 5:
            examples.append({"chosen": row["chosen"], "rejected": rejected, "retrieved": j})
    report = {"method": "rDPO", "rows": len(rows), "pairs": len(built),
              "acceptance_rate": len(built) / max(1, len(rows)), "threshold": threshold, "examples": examples}
    return built, report


@dataclass
class Config(BuilderConfig):
    """rDPO data-building settings (train.parquet keeps v' as retrieved_images)."""

    data: str = option(None, "rows with prompt, chosen (the reference response) and images (one image each)")
    vocabulary: list[str] = option([], "the object/attribute words to mask (default: the embedded world's)")
    threshold: float = option(0.95, "keep a pair when the rejected response's similarity to the chosen is under this")


def run(config: Config) -> dict:
    """`mmalign vision rdpo`: retrieve v', refill the masked words, keep dissimilar rejects; write rows and a report."""
    from ..world import COLOURS, COUNTS, SHAPES

    rows = config.opened(config.rows(SOURCE_ROW))
    model, processor = models.load(config.model)
    vocabulary = set(config.vocabulary) or {*COLOURS, *SHAPES, *COUNTS}
    built, report = build_rows(model.eval(), processor, rows, vocabulary, threshold=config.threshold)
    if not built:
        raise DataError(f"{config.data}: no rejected response differed enough from its chosen one; nothing was written "
                        "(check --vocabulary names words of the chosen responses, or raise --threshold)")
    return config.write(built, report)
