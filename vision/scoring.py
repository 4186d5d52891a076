"""Sequence scores of a LLaVA-style model: s(y | images, prompt) = sum of the completion tokens' log-probs.

All rows of a batch (chosen, rejected, and the same chosen under other images) go through ONE language-model
forward; the images are encoded by ONE vision-tower call and the features handed to the model through its
`mm_encoder_outputs` input, each image's features reused by every row that shows it (see `collate_pairs`).
Only the positions from the shortest prompt on reach the LM head (`logits_to_keep`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mmalign.reference import _unwrap


def image_features(model, batch: dict[str, Any]) -> list[torch.Tensor] | None:
    """Per-image features [tokens, hidden] of every image in the batch, from one `get_image_features` call (on the
    model inside a DDP wrapper, which does not forward methods)."""
    if "pixel_values" not in batch:
        return None
    kwargs = {"image_sizes": batch["image_sizes"]} if "image_sizes" in batch else {}
    out = _unwrap(model).get_image_features(pixel_values=batch["pixel_values"], **kwargs)
    return list(out.pooler_output if hasattr(out, "pooler_output") else out)


def token_log_probs(model, batch: dict[str, Any], features: list[torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(y_t | y_<t, images, prompt) [R, T], completion mask [R, T], log-distributions [R, T, V]) over the T
    positions from the shortest prompt on, for all R rows in one forward; `features` are reused when given."""
    if features is None:
        features = image_features(model, batch)
    encoded = None
    if features is not None:
        per_row = [features[i] for i in batch["image_order"].tolist()]
        encoded = {"image": BaseModelOutputWithPooling(pooler_output=per_row)}
    input_ids, mask = batch["input_ids"], batch["completion_mask"]
    first = int(mask.float().argmax(1).min())  # first completion position of any row (>= 1: prompts are non-empty)
    keep = input_ids.shape[1] - first + 1
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"], mm_encoder_outputs=encoded,
                   logits_to_keep=keep, use_cache=False).logits
    targets, target_mask = input_ids[:, -keep + 1:], mask[:, -keep + 1:]
    log_dist = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return log_dist.gather(-1, targets.unsqueeze(-1)).squeeze(-1), target_mask, log_dist


def sequence_scores(model, batch: dict[str, Any], features: list[torch.Tensor] | None = None) -> torch.Tensor:
    """[B, k] summed completion log-probs sum_t log p(y_t | y_<t, images, prompt), columns = row kinds (chosen, rejected,
    chosen under the other images); `features` from `image_features` are reused when given."""
    logps, mask, _ = token_log_probs(model, batch, features)
    return (logps * mask).sum(1).view(-1, batch["index"].shape[0]).T
