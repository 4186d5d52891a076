"""TRL-compatible vision preference rows in and out, tokenised so that image tokens are never truncated.

A row is TRL's: `prompt`, `chosen`, `rejected` (plain text, or conversations of {'role', 'content'}
messages) and `images` (a list of images: PIL images, {'bytes'/'path'} dicts as `datasets` stores
them, or file paths relative to the data file). A plain prompt holds one `<image>` placeholder per
image; a conversational prompt gets the image parts put in front of its first user message's text
when its content is a plain string (as TRL does). An optional `retrieved_images` list (rDPO's v',
one per image) is carried along for the visual term.

Tokenisation follows TRL's vision collator: prompt through the processor (image placeholders expanded)
and completions through the tokenizer, all without added special tokens (the chat template adds
them). A row longer than `max_length` loses completion tokens from the end; a row whose image tokens
or whole completion would be cut is an error naming the row.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute as pc
import torch
from PIL import Image

from mmalign.data import MAX_REPORTED, TRL_ROW, DataError, Field, Schema, load_preferences
from mmalign.files import write_atomically

IMAGE_FIELDS = ("images", "retrieved_images")


def _image_entries(value: Any, record: dict) -> str | None:
    """None, or a list of PIL images, {'bytes'/'path'} dicts or path strings."""
    if value is None:
        return None
    if not isinstance(value, list):
        return f"expected a list of images, got {type(value).__name__}"
    for image in value:
        if not (isinstance(image, (Image.Image, str)) or (isinstance(image, dict) and (image.get("bytes") or image.get("path")))):
            return f"holds a {type(image).__name__}, not an image, a {{'bytes'/'path'}} dict or a file path"
    return None


def _placeholders_match(record: dict) -> list[tuple[str, str]]:
    """A plain prompt names each image once with <image>; rDPO's retrieved images pair one to one with images."""
    images = record.get("images") or []
    problems = []
    if isinstance(record.get("prompt"), str) and record["prompt"].count("<image>") != len(images):
        problems.append(("prompt", f"has {record['prompt'].count('<image>')} <image> placeholder(s) for "
                                   f"{len(images)} image(s)"))
    retrieved = record.get("retrieved_images")
    if retrieved is not None and len(retrieved) != len(images):
        problems.append(("retrieved_images", f"has {len(retrieved)} image(s) for {len(images)} image(s)"))
    return problems


VISION_ROW = Schema("TRL vision preference row", (
    *[f for f in TRL_ROW.fields if f.name != "images"], Field("images", _image_entries),
    Field("retrieved_images", _image_entries, required=False)), (_placeholders_match,))


def open_image(value: Any, root: Path | None = None) -> Image.Image:
    """An RGB PIL image from a PIL image, a {'bytes'/'path'} dict or a path (relative to `root`)."""
    if isinstance(value, dict):
        value = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else value["path"]
    if isinstance(value, str):
        path = Path(value)
        value = Image.open(path if path.is_absolute() or root is None else root / path)
    return value.convert("RGB")


def is_conversational(record: dict) -> bool:
    """TRL's rule: the prompt is a list of messages."""
    return isinstance(record["prompt"], list)


def with_image_parts(messages: list[dict], images: int) -> list[dict]:
    """The messages with `images` {'type': 'image'} parts before the text of the first user message, when its
    content is a plain string (messages already holding image parts are returned as they are)."""
    out = [dict(m) for m in messages]
    for message in out:
        if message["role"] == "user":
            if isinstance(message["content"], str):
                message["content"] = [{"type": "image"}] * images + [{"type": "text", "text": message["content"]}]
            break
    return out


def _as_parts(messages: list[dict]) -> list[dict]:
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else m
            for m in messages]


def render_prompt(record: dict, processor) -> str:
    """The prompt as text: a plain prompt as it is, a conversation through the chat template with the generation
    prompt (image parts added as TRL does)."""
    if not is_conversational(record):
        return record["prompt"]
    prompt = _as_parts(with_image_parts(record["prompt"], len(record.get("images") or [])))
    return processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def render(record: dict, processor, keys: tuple[str, ...] = ("chosen", "rejected")) -> tuple[str, ...]:
    """(prompt, *completions) as text: plain rows as they are, conversations through the chat template, each
    completion being the templated prompt+completion minus the templated prompt."""
    if not is_conversational(record):
        return record["prompt"], *(record[key] for key in keys)
    prompt = _as_parts(with_image_parts(record["prompt"], len(record.get("images") or [])))
    prompt_text = render_prompt(record, processor)
    completions = []
    for key in keys:
        full = processor.apply_chat_template(prompt + _as_parts(record[key]), tokenize=False)
        if not full.startswith(prompt_text):
            raise DataError(f"the chat template renders the prompt differently with the '{key}' reply appended")
        completions.append(full[len(prompt_text):])
    return prompt_text, *completions


class VisionPairs(torch.utils.data.Dataset):
    """Validated TRL rows, each item tokenised: prompt ids (image tokens expanded), chosen/rejected ids, pixels."""

    def __init__(self, records: datasets.Dataset, processor, max_length: int | None = None, source: str = "data",
                 root: Path | None = None, retrieved: bool = False):
        self.records, self.processor, self.max_length = records, processor, max_length
        self.source, self.root, self.retrieved = source, root, retrieved
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        if retrieved and "retrieved_images" not in records.column_names:
            raise DataError(f"{source}: the retrieved-image visual term needs a 'retrieved_images' field (rDPO's v')")

    @classmethod
    def load(cls, path: str | Path, processor, max_length: int | None = None, split: str = "train",
             retrieved: bool = False) -> "VisionPairs":
        """Load and validate every row of `path` up front (fields, see `mmalign.data.load_preferences`, then lengths,
        see `check_lengths`)."""
        records = load_preferences(path, VISION_ROW, split)
        root = Path(path).parent if Path(path).is_file() else Path(path)
        pairs = cls(records, processor, max_length, str(path), root, retrieved)
        pairs.check_lengths()
        return pairs

    def __len__(self) -> int:
        return len(self.records)

    def _encode(self, text: str, images: list | None, index: int, field: str) -> tuple[list[int], torch.Tensor | None]:
        """(prompt ids with image tokens expanded, pixel values [n_images,3,H,W] or None) from one processor call."""
        try:
            opened = [open_image(image, self.root) for image in images] if images else None
            out = self.processor(images=opened, text=text, add_special_tokens=False, return_tensors="pt")
        except (OSError, KeyError, ValueError) as err:
            raise DataError(f"{self.source}: record {index}, field '{field}': {err}") from None
        return out["input_ids"][0].tolist(), out.get("pixel_values")

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        prompt, chosen, rejected = render(record, self.processor)
        prompt_ids, pixels = self._encode(prompt, record.get("images"), index, "images")
        tok = self.processor.tokenizer
        item = {"index": index, "prompt_ids": prompt_ids, "pixel_values": pixels}
        for key, text in (("chosen", chosen), ("rejected", rejected)):
            item[f"{key}_ids"] = self._truncate(prompt_ids, tok(text, add_special_tokens=False)["input_ids"], index, key)
        if self.retrieved:
            item["retrieved_pixel_values"] = self._encode(prompt, record["retrieved_images"], index, "retrieved_images")[1]
        return item

    def _truncate(self, prompt_ids: list[int], completion: list[int], index: int, key: str) -> list[int]:
        """The completion cut to fit max_length after the prompt; an error naming the row if image tokens or the whole
        completion would be cut."""
        if not completion:
            raise DataError(f"{self.source}: record {index}, field '{key}': tokenises to no tokens")
        image_positions = [i for i, t in enumerate(prompt_ids) if t == self.image_token_id]
        problem = length_problem(len(prompt_ids), image_positions[-1] if image_positions else None, len(completion),
                                 self.max_length, key)
        if problem:
            raise DataError(f"{self.source}: record {index}: {problem}")
        return completion if self.max_length is None else completion[:self.max_length - len(prompt_ids)]

    def check_lengths(self) -> None:
        """Check every row against max_length before training, from its text alone: each image placeholder counts as
        the number of image tokens the first image expanded to (exact for fixed-resolution models like LLaVA 1.5).
        Raises a DataError listing every row that would lose image tokens or a whole completion."""
        if self.max_length is None or len(self) == 0:
            return
        tok = self.processor.tokenizer
        text = self.records.remove_columns([c for c in IMAGE_FIELDS if c in self.records.column_names]).to_list()
        counts = (pc.list_value_length(self.records.data.column("images")).fill_null(0).to_pylist()
                  if "images" in self.records.column_names else [0] * len(self))
        per_image = 1
        with_image = next((i for i, n in enumerate(counts) if n), None)
        if with_image is not None:
            first = self.records[with_image]
            ids = self._encode(render(first, self.processor)[0], first["images"], with_image, "images")[0]
            per_image = ids.count(self.image_token_id) // counts[with_image]
        problems = []
        for index, (record, n) in enumerate(zip(text, counts)):
            prompt, *completions = render({**record, "images": [None] * n}, self.processor)
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            images = [i for i, t in enumerate(ids) if t == self.image_token_id]
            length = len(ids) + len(images) * (per_image - 1)
            last = images[-1] + len(images) * (per_image - 1) if images else None
            for key, completion in zip(("chosen", "rejected"), completions):
                problem = length_problem(length, last, len(tok(completion, add_special_tokens=False)["input_ids"]),
                                         self.max_length, key)
                if problem:
                    problems.append(f"  record {index}: {problem}")
                    break
        if problems:
            more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
            raise DataError(f"{self.source}: {len(problems)} row(s) do not fit max_length {self.max_length}; nothing "
                            "was trained\n" + "\n".join(problems[:MAX_REPORTED]) + more)


def length_problem(prompt_length: int, last_image_position: int | None, completion_length: int,
                   max_length: int | None, key: str) -> str | None:
    """Why a row cannot be cut to max_length (image tokens or the whole completion would go), or None."""
    if max_length is None or prompt_length + completion_length <= max_length:
        return None
    if last_image_position is not None and last_image_position >= max_length:
        return (f"max_length {max_length} would cut image tokens (the prompt has {prompt_length} tokens, its last "
                f"image token at position {last_image_position}); raise --max-length or shorten the prompt")
    if prompt_length >= max_length:
        return (f"the prompt has {prompt_length} tokens, leaving no room for the '{key}' completion within max_length "
                f"{max_length}")
    return None


def collate_pairs(items: list[dict], pad_token_id: int, visual: bool = False) -> dict[str, torch.Tensor]:
    """Batch of B pairs as R = 2B rows [prompt+chosen; prompt+rejected], plus with `visual` B rows of prompt+chosen
    shown the other images v', right-padded.

    The pairs' images are stacked once in `pixel_values`; `image_order` lists, row by row, which image each row's
    image tokens take (v' rows take index N + i, i.e. images appended after the N real ones: the retrieved images,
    kept in `retrieved_pixel_values`, or corrupted ones made in the step), so chosen and rejected share one encoding.
    `completion_mask` marks completion tokens; `completion_lengths` is [B, k] per pair and row kind; `image_counts`
    [B] the images of each pair."""
    sequences = [(item["prompt_ids"], item[f"{kind}_ids"]) for kind in ("chosen", "rejected") for item in items]
    counts = [0 if item["pixel_values"] is None else item["pixel_values"].shape[0] for item in items]
    starts = torch.tensor([0, *counts]).cumsum(0).tolist()
    own = [list(range(starts[i], starts[i + 1])) for i in range(len(items))]
    order = own + own
    if visual:
        sequences += [(item["prompt_ids"], item["chosen_ids"]) for item in items]
        order += [[i + starts[-1] for i in ids] for ids in own]
    length = max(len(p) + len(c) for p, c in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for row, (prompt, completion) in enumerate(sequences):
        n = len(prompt) + len(completion)
        input_ids[row, :n] = torch.tensor(prompt + completion)
        attention_mask[row, :n] = 1
        completion_mask[row, len(prompt):n] = 1
    batch = {"index": torch.tensor([item["index"] for item in items]), "input_ids": input_ids,
             "attention_mask": attention_mask, "completion_mask": completion_mask,
             "completion_lengths": completion_mask.sum(1).view(-1, len(items)).T.contiguous(),
             "image_order": torch.tensor([i for ids in order for i in ids], dtype=torch.long),
             "image_counts": torch.tensor(counts)}
    pixels = [item["pixel_values"] for item in items if item["pixel_values"] is not None]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    if "retrieved_pixel_values" in items[0]:
        batch["retrieved_pixel_values"] = torch.cat([item["retrieved_pixel_values"] for item in items])
    return batch


def write_rows(rows: list[dict], path: str | Path) -> Path:
    """Write TRL rows (PIL images in 'images'/'retrieved_images') as Parquet with `datasets` Image features, atomically."""
    records = datasets.Dataset.from_list(rows)
    features = records.features.copy()
    for name in IMAGE_FIELDS:
        if name in features:
            features[name] = datasets.Sequence(datasets.Image())
    records = records.cast(features)
    return write_atomically(path, lambda tmp: records.to_parquet(str(tmp)))
