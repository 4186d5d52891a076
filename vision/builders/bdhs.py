"""BDHS (Amirloo et al. 2024, arXiv 2407.02477): rejected responses from the model itself with its sight of the image
mostly removed, so they carry the hallucinations its language prior makes.

For each row (prompt, chosen = the reference response, images): every image token stays visible with probability
`keep_prob` (0.01: about 1% visible, the attention mask zeroes the rest); each sentence of the chosen response is cut
at a random word and the model completes it (guided generation, sampled, up to the sentence's end), given the
prompt and the chosen sentences before it. A rejected response that is empty or whose similarity to the chosen one
is >= `threshold` (0.97) is resampled, up to `max_resamples` (5) times; a row that never differs enough is dropped
and counted.

Similarity: the paper uses a sentence-embedding model; none ships here offline, so the default is the cosine of
bag-of-words counts (`bow_cosine`), and any `similarity(a, b) -> float` can be passed to `build_rows`.

    mmalign vision bdhs --model assets/tiny-llava --data rows.parquet --output pairs/
writes pairs/train.parquet (TRL rows) and pairs/report.json (counts, acceptance, examples).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mmalign.config import option
from mmalign.data import DataError, Field, Schema
from mmalign.errors import ConfigError

from .. import models
from ..data import (
    MATCHED_IMAGES,
    completion_field,
    image_entries,
    image_token_id,
    message_text,
    prompt_field,
    render_prompt,
)
from ..scoring import rope_index
from .base import BuilderConfig

SOURCE_ROW = Schema("BDHS source row (prompt, chosen, images)", (
    Field("prompt", prompt_field), Field("chosen", completion_field), Field("images", image_entries)),
    (MATCHED_IMAGES,))


@dataclass
class Config(BuilderConfig):
    """BDHS data-building settings."""

    data: str = option(None, "rows with prompt, chosen (the reference response) and images")
    keep_prob: float = option(0.01, "probability that an image token stays visible")
    threshold: float = option(0.97, "resample while the similarity to the chosen response is at least this")
    max_resamples: int = option(5, "resamples before a row is dropped")
    temperature: float = option(1.0, "sampling temperature of the guided completions")
    max_new_tokens: int = option(32, "longest completion of one sentence")
    seed: int = option(0, "seed of the masks, cut points and samples")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.keep_prob <= 1:
            raise ValueError(f"keep_prob must be in [0, 1], got {self.keep_prob}")
        if self.max_resamples < 0 or not self.temperature > 0 or self.max_new_tokens < 1:
            raise ValueError("max_resamples must not be negative, temperature must be positive and max_new_tokens at "
                             "least 1")


def image_attention_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int, keep_prob: float,
                         generator: torch.Generator) -> torch.Tensor:
    """The attention mask with each image token kept with probability keep_prob and masked (0) otherwise."""
    keep = torch.rand(input_ids.shape, generator=generator, device=input_ids.device) < keep_prob
    return attention_mask * ((input_ids != image_token_id) | keep).long()


def sentences(text: str) -> list[str]:
    """The text split after each '.', '!' or '?' (a final piece without one counts as a sentence)."""
    return [s for s in re.findall(r"[^.!?]*[.!?]|[^.!?]+$", text) if s.strip()]


def bow_cosine(a: str, b: str) -> float:
    """cos(bag-of-words(a), bag-of-words(b)) over lower-cased words."""
    ca, cb = Counter(re.findall(r"\w+", a.lower())), Counter(re.findall(r"\w+", b.lower()))
    dot = sum(ca[w] * cb[w] for w in ca)
    norm = math.sqrt(sum(v * v for v in ca.values()) * sum(v * v for v in cb.values()))
    return dot / norm if norm else float(a.strip() == b.strip())


@torch.no_grad()
def complete(model, processor, context: str, images: list, config: Config, generator: torch.Generator) -> str:
    """The model's sampled continuation of `context` up to a sentence end or EOS, with the image tokens masked."""
    tok = processor.tokenizer
    inputs = processor(images=images or None, text=context, add_special_tokens=False, return_tensors="pt")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["attention_mask"] = image_attention_mask(inputs["input_ids"], inputs["attention_mask"],
                                                    image_token_id(processor), config.keep_prob, generator)
    stops = [tok.eos_token_id] + [i for t, i in tok.get_vocab().items() if t.strip() in (".", "!", "?")]
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator, device=generator.device)))
    out = model.generate(**inputs, do_sample=True, temperature=config.temperature, top_k=0,
                         max_new_tokens=config.max_new_tokens, eos_token_id=stops, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def guided_rejected(model, processor, prompt: str, chosen: str, images: list, config: Config,
                    generator: torch.Generator) -> str:
    """Each chosen sentence cut at a random word and completed by the image-masked model, given what came before."""
    eos = processor.tokenizer.eos_token
    body = chosen[:-len(eos)].rstrip() if chosen.rstrip().endswith(eos) else chosen
    done, out = "", []
    for sentence in sentences(body):
        words = sentence.split()
        cut = int(torch.randint(len(words), (1,), generator=generator, device=generator.device))
        head = (" " if sentence.startswith(" ") else "") + " ".join(words[:cut])
        text = complete(model, processor, prompt + done + head, images, config, generator)
        out.append(head + (" " if head.strip() and text and not text.startswith(" ") else "") + text)
        done += sentence
    rejected = "".join(out)
    if not rejected.startswith(" ") and chosen.startswith(" "):
        rejected = " " + rejected
    return rejected + (f" {eos}" if body is not chosen else "")


def build_rows(model, processor, rows: list[dict], config: Config, similarity: Callable[[str, str], float] = bow_cosine
               ) -> tuple[list[dict], dict]:
    """(TRL rows with BDHS rejected responses, report) for source rows {prompt, chosen, images}; image paths are read
    inside config.root (see `BuilderConfig.image`)."""
    generator = torch.Generator().manual_seed(config.seed)
    built, dropped, draws = [], 0, 0
    examples: list[dict[str, Any]] = []
    for index, row in enumerate(rows):
        images = [config.image(image, f"record {index}, image {i + 1}")
                  for i, image in enumerate(row.get("images") or [])]
        prompt, chosen = render_prompt(row, processor), row["chosen"]
        chosen_text = chosen if isinstance(chosen, str) else message_text(chosen[-1])
        for _ in range(config.max_resamples + 1):
            draws += 1
            rejected = guided_rejected(model, processor, prompt, chosen_text, images, config, generator)
            if rejected.replace(processor.tokenizer.eos_token, "").strip() and \
                    similarity(rejected, chosen_text) < config.threshold:
                break
        else:
            dropped += 1
            continue
        out = {**row, "images": images,
               "rejected": rejected if isinstance(chosen, str) else [{"role": "assistant", "content": rejected}]}
        built.append(out)
        if len(examples) < 5:
            examples.append({"row": index, "chosen": chosen_text, "rejected": rejected})
    report = {"method": "BDHS", "rows": len(rows), "pairs": len(built), "dropped_too_similar": dropped,
              "acceptance_rate": len(built) / max(1, draws), "samples_drawn": draws, "keep_prob": config.keep_prob,
              "threshold": config.threshold, "examples": examples}
    return built, report


def run(config: Config) -> dict:
    """`mmalign vision bdhs`: build pairs from `data` with `model`; write train.parquet and report.json."""
    rows = config.opened(config.rows(SOURCE_ROW))
    model, processor = models.load(config.model)
    if rope_index(model) is not None:
        raise ConfigError(f"--model {config.model}: it places tokens by multi-axis rotary positions (M-RoPE) read "
                          "from the attention mask, which BDHS uses to hide image tokens; build BDHS pairs with "
                          "another model")
    built, report = build_rows(model.eval(), processor, rows, config)
    if not built:
        raise DataError(f"{config.data}: every row's rejected response stayed too similar to the chosen one; nothing "
                        "was written (raise --threshold or --max-resamples)")
    return config.write(built, report)
