"""Online BDHS: each step, every pair's rejected response is replaced by a sample of the current policy with its
sight of the image mostly removed (image tokens kept with probability keep_prob), continuing the chosen response
from a random cut point; a sample too similar to the chosen response (bag-of-words cosine >= threshold) is drawn
again, up to `max_resamples` times.

Generation uses the step's generator (its seed goes to the global RNG that `generate` samples from), so a resumed
run draws the same rejected responses as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch

from mmalign.reference import unwrap

from .builders.bdhs import bow_cosine, image_attention_mask
from .data import VISUAL, collate_pairs, image_token_id, pair_images


def split_rows(batch: dict[str, Any], pairs: int) -> list[dict[str, Any]]:
    """Each pair's prompt ids and chosen ids, read back from the chosen rows of a collated batch (and from its v' rows,
    when it has them, their own prompt and chosen ids)."""
    out = []
    for i in range(pairs):
        item = {}
        for row, prefix in ((i, ""), (VISUAL * pairs + i, "visual_")):
            if row < batch["input_ids"].shape[0]:
                ids, mask = batch["input_ids"][row], batch["completion_mask"][row].bool()
                start, end = int(mask.float().argmax()), int(mask.sum()) + int(mask.float().argmax())
                item[f"{prefix}prompt_ids"], item[f"{prefix}chosen_ids"] = ids[:start].tolist(), ids[start:end].tolist()
        out.append(item)
    return out


@torch.no_grad()
def sample_rejected(model, prompt_ids: list[int], chosen_ids: list[int], images: dict[str, torch.Tensor] | None,
                    generator: torch.Generator, image_token_id: int, eos_token_id: int, keep_prob: float,
                    max_new_tokens: int) -> list[int]:
    """chosen[:cut] + the image-masked policy's sampled continuation (cut uniform in [0, len(chosen)))."""
    device = generator.device
    cut = int(torch.randint(len(chosen_ids), (1,), generator=generator, device=device))
    context = torch.tensor([prompt_ids + chosen_ids[:cut]], device=device)
    attention = image_attention_mask(context, torch.ones_like(context), image_token_id, keep_prob, generator)
    torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator, device=device)))
    policy: Any = unwrap(model)  # a transformers VLM (or peft's wrapper of one): `generate` is not nn.Module's
    out = policy.generate(input_ids=context, attention_mask=attention, **(images or {}), do_sample=True, top_k=0,
                          max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
    new = out[0, context.shape[1]:].tolist()
    if eos_token_id in new:
        new = new[:new.index(eos_token_id) + 1]
    return chosen_ids[:cut] + new


def online_rejected(model, batch: dict[str, Any], generator: torch.Generator, processor, keep_prob: float,
                    max_new_tokens: int, max_length: int | None = None, threshold: float = 0.97,
                    max_resamples: int = 5) -> dict[str, Any]:
    """The batch with every rejected row replaced by an online BDHS sample (see the module docstring), cut to fit
    `max_length`."""
    tok, pairs = processor.tokenizer, batch["index"].shape[0]
    image_token = image_token_id(processor)
    items = split_rows(batch, pairs)
    model_was_training = model.training
    model.eval()
    for i, item in enumerate(items):
        chosen_text = tok.decode(item["chosen_ids"], skip_special_tokens=True)
        for _ in range(max_resamples + 1):
            rejected = sample_rejected(model, item["prompt_ids"], item["chosen_ids"], pair_images(batch, i), generator,
                                       image_token, tok.eos_token_id, keep_prob, max_new_tokens)
            if bow_cosine(tok.decode(rejected, skip_special_tokens=True), chosen_text) < threshold:
                break
        if max_length is not None:
            rejected = rejected[:max(1, max_length - len(item["prompt_ids"]))]
        item.update(index=int(batch["index"][i]), rejected_ids=rejected, images=None, image_count=0)
    model.train(model_was_training)
    visual = batch["input_ids"].shape[0] == (VISUAL + 1) * pairs
    rebuilt = collate_pairs(items, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, visual)
    keep: dict[str, Any] = {k: batch[k] for k in ("images", "image_extents", "retrieved_images", "image_order",
                                                  "image_counts") if k in batch}
    return {**rebuilt, **keep}

