"""Sequence scores of a LLaVA-style model: s(y | images, prompt) = sum of the completion tokens' log-probs.

The images of a batch are encoded by ONE vision-tower call (`get_image_features`, given every image input the
processor made: `pixel_values` and e.g. LLaVA-NeXT's `image_sizes`) and the features handed to the model through its
`mm_encoder_outputs` input, each image's features reused by every row that shows it (see `collate_pairs`).
`sequence_scores` runs each distinct prompt once and the completions of chosen and rejected on its key/value
cache; `token_log_probs` (for token-level objectives) runs all rows whole in one forward, with only the positions
from the shortest prompt on reaching the LM head (`logits_to_keep`). Both give the model the positions it would give
itself (`rope_positions`: multi-axis for M-RoPE models such as Qwen2-VL).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mmalign.reference import unwrap

from .data import SHARED_PROMPT_KINDS

Features = list[torch.Tensor] | tuple[torch.Tensor, ...] | torch.Tensor
"""Per-image features as a model's get_image_features gives them: a list or tuple of [tokens, hidden], or one
[images, tokens, hidden] tensor."""


def image_features(model, batch: dict[str, Any]) -> Features | None:
    """Per-image features [tokens, hidden] of every image in the batch, from one `get_image_features` call given every
    image input of the batch it takes by name (`pixel_values`, `image_sizes`, `image_grid_thw`, ...), on the model
    inside a DDP wrapper, which does not forward methods; kept as the model gives them (a list, or one tensor)."""
    if "images" not in batch:
        return None
    vlm: Any = unwrap(model)  # a transformers VLM (or peft's wrapper of one): its methods are not nn.Module's
    takes = inspect.signature(inspect.unwrap(vlm.get_image_features)).parameters  # FSDP wraps it (`Trainer.fit`)
    out = vlm.get_image_features(**{name: x for name, x in batch["images"].items() if name in takes})
    return out.pooler_output if hasattr(out, "pooler_output") else out


def row_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch: dict[str, Any],
               images: torch.Tensor, features: Features | None) -> tuple[dict[str, Any], torch.Tensor]:
    """(forward inputs, next text position [R]) of padded rows whose image tokens show the batch's images `images` in
    order: their positions (`rope_positions`), those images' features as `mm_encoder_outputs` (a list, or stacked
    where the model's get_image_features gives one tensor), and where the forward takes `token_type_ids` (Gemma 3,
    whose image tokens attend to their whole image) 1 at image tokens, 0 elsewhere, as the processor makes them."""
    positions, next_position = rope_positions(model, input_ids, attention_mask, batch, images)
    inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": positions}
    if features is not None:
        picked = [features[i] for i in images.tolist()]
        # transformers' VLMs keep per-image features as a list in pooler_output, which it annotates as a tensor
        pooled: Any = torch.stack(picked) if isinstance(features, torch.Tensor) else picked
        inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=pooled)}
    vlm: Any = unwrap(model)
    base = vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm  # peft's wrapper forwards **kwargs
    if "token_type_ids" in inspect.signature(base.forward).parameters:
        inputs["token_type_ids"] = (input_ids == vlm.config.image_token_id).long()
    return inputs, next_position


def token_log_probs(model, batch: dict[str, Any], features: Features | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(y_t | y_<t, images, prompt) [R, T], completion mask [R, T], log-distributions [R, T, V]) over the T
    positions from the shortest prompt on, for all R rows in one forward; `features` are reused when given."""
    if features is None:
        features = image_features(model, batch)
    input_ids, mask = batch["input_ids"], batch["completion_mask"]
    first = int(mask.float().argmax(1).min())  # first completion position of any row (>= 1: prompts are non-empty)
    keep = input_ids.shape[1] - first + 1
    inputs, _ = row_inputs(model, input_ids, batch["attention_mask"], batch, batch["image_order"], features)
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    targets, target_mask = input_ids[:, -keep + 1:], mask[:, -keep + 1:]
    log_dist = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return log_dist.gather(-1, targets.unsqueeze(-1)).squeeze(-1), target_mask, log_dist


def sequence_scores(model, batch: dict[str, Any], features: Features | None = None) -> torch.Tensor:
    """[B, k] summed completion log-probs sum_t log p(y_t | y_<t, images, prompt), columns = row kinds (chosen,
    rejected, chosen under the other images); `features` from `image_features` are reused when given.

    Rows that share a prompt and images (chosen and rejected) share its forward: each distinct prompt runs once,
    left-padded, keeping its key/value cache, and every row's completion runs on a copy of its prompt's cache
    (positions continue from the prompt's own, `rope_positions`), so the prompt's tokens, images included, are
    computed once per pair instead of twice, gradients flowing through the shared cache. Under gradient
    checkpointing (which recomputes each layer without a cache) the prompt is still shared: each prompt and its
    rows' completions run as one packed sequence (`packed_scores`); with an attention kernel that takes no custom
    mask (flash attention) the rows run whole, as in `token_log_probs`."""
    if features is None:
        features = image_features(model, batch)
    if model.training and getattr(unwrap(model), "is_gradient_checkpointing", False):
        vlm: Any = unwrap(model)  # a transformers VLM (or peft's wrapper of one)
        if vlm.config._attn_implementation in CUSTOM_MASK_ATTENTION:
            return packed_scores(model, batch, features)
        logps, mask, _ = token_log_probs(model, batch, features)
        return (logps * mask).sum(1).view(-1, batch["index"].shape[0]).T
    layout = prompt_groups(model, batch, features)
    inputs, pairs = layout.prompt_inputs, batch["index"].shape[0]
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    cache.batch_select_indices(layout.group)
    span = layout.completion.shape[1]
    positions = layout.next_position[layout.group, None] + torch.arange(span, device=layout.group.device)
    logits = model(input_ids=layout.completion, attention_mask=torch.cat([inputs["attention_mask"][layout.group],
                                                                          layout.completion_mask], 1),
                   position_ids=positions, cache=cache, use_cache=False).logits  # text continues the prompt
    first = torch.log_softmax(out.logits[layout.group, -1].float(), -1).gather(-1, layout.completion[:, :1])
    rest = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, layout.completion[:, 1:, None]).squeeze(-1)
    scores = first.squeeze(-1) + (rest * layout.completion_mask[:, 1:]).sum(1)  # [R]
    return scores.view(-1, pairs).T  # [B, k], one column per row kind


CUSTOM_MASK_ATTENTION = ("sdpa",)
"""Attention kernels that take a custom boolean 4D mask (what `packed_scores` needs)."""


@dataclass
class PromptGroups:
    """A batch's rows as distinct prompts and completions: `prompt_inputs` the forward inputs of the G prompts
    (left-padded to one width, with their images), `next_position` [G] where each prompt's text continues, `group`
    [R] each row's prompt, `completion` / `completion_mask` [R, span] each row's completion, right-padded."""

    prompt_inputs: dict[str, Any]
    next_position: torch.Tensor
    group: torch.Tensor
    completion: torch.Tensor
    completion_mask: torch.Tensor


def prompt_groups(model, batch: dict[str, Any], features: Features | None) -> PromptGroups:
    """Split the batch's rows into their distinct prompts (chosen and rejected of a pair share one) and completions."""
    input_ids, mask = batch["input_ids"], batch["completion_mask"]  # [R, L], R = k * B rows (kinds in blocks of B)
    rows, pairs = input_ids.shape[0], batch["index"].shape[0]
    starts = mask.float().argmax(1)  # [R] each row's prompt length
    lengths = mask.sum(1)  # [R] completion lengths
    row = torch.arange(rows, device=input_ids.device)
    shared = SHARED_PROMPT_KINDS * pairs  # rows of the kinds that share pair i's prompt
    group = torch.where(row < shared, row % pairs, row - shared + pairs)  # [R] prompt group of each row
    leaders = torch.cat([row[:pairs], row[shared:]])  # [G] the first row of each prompt group
    width, span = int(starts.max()), int(lengths.max())
    prompt_ids = input_ids.new_zeros((len(leaders), width))
    prompt_mask = torch.zeros_like(prompt_ids)
    for g, r in enumerate(leaders.tolist()):
        n = int(starts[r])
        prompt_ids[g, width - n:], prompt_mask[g, width - n:] = input_ids[r, :n], 1
    per_row = batch["image_order"].split(_images_per_row(batch, rows))
    leader_images = torch.cat([per_row[r] for r in leaders.tolist()])
    inputs, next_position = row_inputs(model, prompt_ids, prompt_mask, batch, leader_images, features)
    completion = input_ids.new_zeros((rows, span))
    completion_mask = torch.zeros_like(completion)
    for r in range(rows):
        n, s0 = int(lengths[r]), int(starts[r])
        completion[r, :n], completion_mask[r, :n] = input_ids[r, s0:s0 + n], 1
    return PromptGroups(inputs, next_position, group, completion, completion_mask)


def packed_scores(model, batch: dict[str, Any], features: Features | None = None) -> torch.Tensor:
    """`sequence_scores` in one forward without a cache: each prompt group is packed as [prompt | completion of row
    1 | completion of row 2 ...], every completion attending to its prompt and causally to itself only (a custom
    4D mask, `packed_mask`), its positions continuing the prompt's; a completion's first token is scored from the
    prompt's last logit."""
    if features is None:
        features = image_features(model, batch)
    layout = prompt_groups(model, batch, features)
    inputs, group, completion = layout.prompt_inputs, layout.group, layout.completion
    filled = layout.completion_mask.bool()
    prompts, width = inputs["input_ids"].shape
    span, device = completion.shape[1], completion.device
    lengths = layout.completion_mask.sum(1)
    offset = torch.zeros_like(lengths)  # [R] where each row's completion starts after its group's prompt
    for g in range(prompts):
        members = (group == g).nonzero().flatten()
        offset[members] = torch.cumsum(lengths[members], 0) - lengths[members]
    slot = width + offset[:, None] + torch.arange(span, device=device)  # [R, span] each token's packed index
    where = (group[:, None].expand_as(slot)[filled], slot[filled])
    total = width + int((offset + lengths).max())
    ids, segment, text = (completion.new_zeros((prompts, total)) for _ in range(3))
    ids[:, :width] = inputs["input_ids"]
    ids[where] = completion[filled]
    segment[where] = (torch.arange(len(group), device=device)[:, None] + 1).expand_as(slot)[filled]
    text[where] = (layout.next_position[group, None] + torch.arange(span, device=device))[filled]
    positions = inputs["position_ids"]
    if positions.dim() == 3:  # multi-axis rotary positions [3, G, width]: the text continues on every axis
        positions = torch.cat([positions, text[None, :, width:].expand(3, -1, -1)], 2)
    else:
        positions = torch.cat([positions, text[:, width:]], 1)
    packed = {**inputs, "input_ids": ids, "position_ids": positions,
              "attention_mask": packed_mask(inputs["attention_mask"].bool(), segment, inputs.get("token_type_ids"))}
    if "token_type_ids" in inputs:
        packed["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.zeros_like(ids[:, width:])], 1)
    logits = model(**packed, use_cache=False, logits_to_keep=total - width + 1).logits  # indices width-1 onwards
    before = torch.cat([torch.full_like(slot[:, :1], width - 1), slot[:, :-1]], 1).clamp(max=total - 1) - (width - 1)
    log_dist = torch.log_softmax(logits[group[:, None].expand_as(before), before].float(), -1)
    logps = log_dist.gather(-1, completion[..., None]).squeeze(-1)
    return (logps * layout.completion_mask).sum(1).view(-1, batch["index"].shape[0]).T


def packed_mask(prompt_mask: torch.Tensor, segment: torch.Tensor, token_types: torch.Tensor | None) -> torch.Tensor:
    """[G, 1, T, T] boolean attention (True: attend) of packed groups: query i sees key j <= i when j is in the prompt
    (`segment` 0, present in `prompt_mask`) or in i's own completion (`segment` r + 1); image tokens (token type 1,
    Gemma 3) also see every token of their own image; padding sees itself only."""
    width = prompt_mask.shape[1]
    present = torch.cat([prompt_mask, segment[:, width:] > 0], 1)
    index = torch.arange(segment.shape[1], device=segment.device)
    causal = index[None, :] <= index[:, None]
    allowed = ((segment[:, :, None] == segment[:, None, :]) | (segment[:, None, :] == 0)) & causal
    allowed &= present[:, :, None] & present[:, None, :]
    if token_types is not None:
        image = torch.cat([token_types.bool(), torch.zeros_like(segment[:, width:], dtype=torch.bool)], 1)
        run = torch.cumsum((image != torch.roll(image, 1, 1)).long(), 1)  # one id per run of image or text tokens
        allowed |= image[:, :, None] & image[:, None, :] & (run[:, :, None] == run[:, None, :])
    return (allowed | torch.eye(len(index), dtype=torch.bool, device=segment.device))[:, None]


def rope_index(model) -> Any:
    """The model's own multi-axis rotary position function (`get_rope_index`, M-RoPE models), or None."""
    return next((m.get_rope_index for m in unwrap(model).modules() if hasattr(m, "get_rope_index")), None)


def rope_positions(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch: dict[str, Any],
                   images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(position ids, next text position [R]) of padded rows whose image tokens show the batch's images `images` in
    order: 0, 1, ... over each row's tokens for rotary positions on one axis; for multi-axis rotary positions (M-RoPE,
    Qwen2-VL style) the model's own `get_rope_index` given those images' grids (`image_grid_thw`) [3, R, L], text after
    an image continuing from its largest position, so the next text position is the prompt's length + rope delta."""
    index = rope_index(model)
    if index is None or "images" not in batch:
        return (attention_mask.cumsum(1) - 1).clamp(min=0), attention_mask.sum(1)
    vlm: Any = unwrap(model)  # a transformers VLM (or peft's wrapper of one)
    image_token = vlm.config.image_token_id
    positions, deltas = index(input_ids=input_ids, mm_token_type_ids=(input_ids == image_token).int(),
                                   image_grid_thw=batch["images"]["image_grid_thw"][images],
                                   attention_mask=attention_mask)
    return positions, attention_mask.sum(1) + deltas.view(-1).to(attention_mask.device)


def _images_per_row(batch: dict[str, Any], rows: int) -> list[int]:
    """How many entries of `image_order` each row takes (its images), from `image_counts` per pair."""
    counts = batch["image_counts"].tolist()
    return counts * (rows // len(counts))
