"""TRL-compatible vision preference rows in and out, tokenised so that image tokens are never truncated.

A row is TRL's: `prompt`, `chosen`, `rejected` (plain text, or conversations of {'role', 'content'}
messages) and `images` (a list of images: PIL images, {'bytes'/'path'} dicts as `datasets` stores
them, or file paths relative to the data file). A plain prompt holds one `<image>` placeholder per
image; a conversational prompt gets the image parts put in front of its first user message's text
when its content is a plain string (as TRL does). An optional `retrieved_images` list (rDPO's v',
one per image) is carried along for the visual term.

Every row is checked before anything trains (`load_rows`, vectorised where the column types allow): its fields, that
its prompt names as many images as it has, and that its image paths name files inside the data's folder (absolute
paths and paths leading out of it only with --allow-outside-paths). Images are kept as their bytes or paths and read
once, when their row is loaded for training; one that cannot be read raises `BadRow` naming its row (`--bad-rows`;
`mmalign data check --kind trl` reads every image up front).

Tokenisation follows TRL's vision collator: prompt through the processor (image placeholders expanded)
and completions through the tokenizer, all without added special tokens (the chat template adds
them). A row longer than `max_length` loses completion tokens from the end; a row whose image tokens
or whole completion would be cut is an error naming the row.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from datasets.fingerprint import Hasher
from PIL import Image, UnidentifiedImageError

from mmalign.data import (
    MAX_REPORTED,
    DataError,
    Field,
    Mask,
    RowCheck,
    Schema,
    any_of,
    bad_messages,
    check_once,
    is_text_type,
    leaving_root,
    list_lengths,
    load_records,
    resolve_path,
    rows_holding,
    text_or_messages,
    validate,
)
from mmalign.errors import BadRow
from mmalign.files import write_atomically
from mmalign.stream import Stream

IMAGE_FIELDS = ("images", "retrieved_images")
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
"""What PIL raises for a file that is not a readable image (truncated, damaged, not an image, too large)."""
HIGH_BIT_DEPTH = ("I", "I;16", "I;16L", "I;16B", "I;16N")
"""PIL's modes of 16-bit (and 32-bit integer) grey images, e.g. a 16-bit PNG."""


def image_entries(value: Any, record: dict) -> str | None:
    """None, or a list of PIL images, {'bytes'/'path'} dicts or path strings."""
    if value is None:
        return None
    if not isinstance(value, list):
        return f"expected a list of images, got {type(value).__name__}"
    for image in value:
        if not (isinstance(image, (Image.Image, str))
                or (isinstance(image, dict) and (image.get("bytes") or image.get("path")))):
            return f"holds a {type(image).__name__}, not an image, a {{'bytes'/'path'}} dict or a file path"
    return None


def _retrieved_entries(value: Any, record: dict) -> str | None:
    """rDPO's v' when the visual term needs it: a list of images (see `image_entries`)."""
    return "is missing (the retrieved visual term needs v' for every row)" if value is None else \
        image_entries(value, record)


def message_text(message: dict) -> str:
    """A message's text: its content string, or its text parts joined."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content if part.get("type") == "text")


def _content_problem(content: Any) -> str | None:
    """None for message content that is text or a list of {'type': 'text'/'image'} parts."""
    if isinstance(content, str):
        return None
    if isinstance(content, list) and all(isinstance(p, dict) and (p.get("type") == "image" or (
            p.get("type") == "text" and isinstance(p.get("text"), str))) for p in content):
        return None
    return "content must be text or a list of {'type': 'text', 'text': ...} and {'type': 'image'} parts"


def prompt_field(value: Any, record: dict) -> str | None:
    """Plain text, or a conversation whose messages hold text or lists of text and image parts."""
    problem = text_or_messages(value, record)
    if problem or isinstance(value, str):
        return problem
    return next((f"message {i + 1}: {p}" for i, m in enumerate(value) if (p := _content_problem(m["content"]))), None)


def completion_field(value: Any, record: dict) -> str | None:
    """A prompt-like value (see `prompt_field`) whose every message has text: an empty reply is a mistake."""
    problem = prompt_field(value, record)
    if problem or isinstance(value, str):
        return problem
    return next((f"message {i + 1} has no text" for i, m in enumerate(value) if not message_text(m).strip()), None)


def image_slots(prompt: Any, images: int) -> int:
    """How many images a prompt takes: its <image> placeholders, plus in a conversation its image parts (including
    those TRL puts into a first user message given as plain text, one per image)."""
    if isinstance(prompt, str):
        return prompt.count("<image>")
    messages = with_image_parts(prompt, images)
    parts = sum(p["type"] == "image" for m in messages if isinstance(m["content"], list) for p in m["content"])
    return parts + sum(message_text(m).count("<image>") for m in messages)


def images_match(record: dict) -> list[tuple[str, str]]:
    """The prompt names each image once; rDPO's retrieved images pair one to one with images."""
    images = record.get("images") or []
    if not isinstance(images, list):
        return []
    problems = []
    prompt, count = record.get("prompt"), len(images)
    if prompt_field(prompt, record) is None and image_slots(prompt, count) != count:
        kind = "<image> placeholder(s)" if isinstance(prompt, str) else "image part(s) and <image> placeholder(s)"
        problems.append(("prompt", f"has {image_slots(prompt, count)} {kind} for {count} image(s)"))
    retrieved = record.get("retrieved_images")
    if isinstance(retrieved, list) and len(retrieved) != count:
        problems.append(("retrieved_images", f"has {len(retrieved)} image(s) for {count} image(s)"))
    return problems


def unmatched_images(table: pa.Table) -> Mask | None:
    """`images_match`'s suspects where the prompts are text: rows whose <image> count differs from their image count,
    or whose retrieved images are not as many as their images; None for conversational prompts."""
    if "prompt" not in table.column_names or not is_text_type(table.column("prompt").type):
        return None
    counts = [list_lengths(table.column(name)) if name in table.column_names else None for name in IMAGE_FIELDS]
    if counts[0] is None:
        return None
    mask = pc.not_equal(pc.count_substring(table.column("prompt"), "<image>"), counts[0])
    return mask if counts[1] is None else pc.or_kleene(mask, pc.not_equal(counts[1], counts[0]))


def one_image(record: dict) -> list[tuple[str, str]]:
    """Rows of the single-image builders hold exactly one image."""
    images = record.get("images")
    if isinstance(images, list) and len(images) != 1:
        return [("images", f"holds {len(images)} images; this builder takes exactly one per row")]
    return []


def not_one_image(table: pa.Table) -> Mask | None:
    """`one_image`'s suspects: rows of an image-list column without exactly one image."""
    lengths = list_lengths(table.column("images")) if "images" in table.column_names else None
    return None if lengths is None else pc.not_equal(lengths, 1)


def bad_entries(column: pa.ChunkedArray) -> Mask | None:
    """`image_entries`' suspects: rows of a list column of paths or {'bytes', 'path'} structs holding an entry with
    neither; None for columns of other types."""
    if list_lengths(column) is None:
        return None
    entries, kind = pc.list_flatten(column), column.type.value_type
    if is_text_type(kind):
        return rows_holding(column, pc.or_kleene(pc.is_null(entries), pc.equal(entries, "")))
    if not pa.types.is_struct(kind) or {"bytes", "path"} - {f.name for f in kind}:
        return None
    no_bytes = pc.or_kleene(pc.is_null(pc.struct_field(entries, "bytes")),
                            pc.equal(pc.binary_length(pc.struct_field(entries, "bytes")), 0))
    no_path = pc.or_kleene(pc.is_null(pc.struct_field(entries, "path")), pc.equal(pc.struct_field(entries, "path"), ""))
    return rows_holding(column, pc.or_kleene(pc.is_null(entries), pc.and_kleene(no_bytes, no_path)))


def missing_entries(column: pa.ChunkedArray) -> Mask | None:
    """`_retrieved_entries`' suspects: null rows, and those of `bad_entries`."""
    bad = bad_entries(column)
    return None if bad is None else pc.or_kleene(pc.is_null(column), bad)


def completions(column: pa.ChunkedArray) -> Mask | None:
    """`completion_field`'s suspects: blank text, or conversations with a blank or null message (text content only)."""
    return bad_messages(column, content_must_be_text=True)


MATCHED_IMAGES = RowCheck(images_match, unmatched_images)
ONE_IMAGE = RowCheck(one_image, not_one_image)
VISION_ROW = Schema("TRL vision preference row", (
    Field("prompt", prompt_field, suspects=bad_messages), Field("chosen", completion_field, suspects=completions),
    Field("rejected", completion_field, suspects=completions), Field("images", image_entries, suspects=bad_entries),
    Field("retrieved_images", image_entries, required=False, suspects=bad_entries)), (MATCHED_IMAGES,))
RETRIEVED_ROW = dataclasses.replace(VISION_ROW, name="TRL vision preference row with retrieved images", fields=(
    *VISION_ROW.fields[:-1], Field("retrieved_images", _retrieved_entries, suspects=missing_entries)))
"""A row for the retrieved visual term (rDPO): every row has its v'."""


def data_root(path: str | Path) -> Path:
    """The folder that image paths in the data at `path` are relative to: the file's folder, or the folder itself."""
    path = Path(path)
    return path.parent if path.is_file() else path


def image_source(value: Any, root: Path, allow_outside: bool = False, where: str = "image") -> Any:
    """What PIL opens for one image entry: the PIL image itself, its bytes, or the file its path names inside `root`
    (see `mmalign.data.resolve_path`); a DataError naming `where` if that file is missing or a folder."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return io.BytesIO(value["bytes"])
        value = value["path"]
    path = resolve_path(value, root, allow_outside, where)
    if not path.is_file():
        raise DataError(f"{where}: {value!r} ({path}) " + ("is a folder, not an image file" if path.is_dir() else
                                                           "does not exist"))
    return path


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as RGB; 16-bit grey ('I;16', or 'I' as PIL opens 16-bit PNG/TIFF) scaled from 0-65535 to 0-255 first,
    where PIL's own convert would clip every value over 255 to white."""
    if image.mode in HIGH_BIT_DEPTH:
        image = image.point(lambda v: v / 257).convert("L")
    return image.convert("RGB")


def image_size(value: Any, root: Path = Path("."), allow_outside: bool = False) -> tuple[int, int]:
    """(height, width) of one image entry (see `image_source`), read from its file's header without decoding."""
    source = image_source(value, root, allow_outside)
    if isinstance(source, Image.Image):
        return source.height, source.width
    with Image.open(source) as image:
        return image.height, image.width


def unreadable(err: Exception) -> str:
    """Why PIL could not read an image, without the file object it names when it cannot identify the format."""
    return "PIL cannot identify its format" if isinstance(err, UnidentifiedImageError) else str(err)


def open_image(value: Any, root: Path = Path("."), allow_outside: bool = False, where: str = "image") -> Image.Image:
    """An RGB PIL image (see `to_rgb`) from a PIL image, a {'bytes'/'path'} dict or a path (see `image_source`); a
    DataError naming `where` if it cannot be decoded."""
    source = image_source(value, root, allow_outside, where)
    try:
        return to_rgb(source if isinstance(source, Image.Image) else Image.open(source))
    except IMAGE_ERRORS as err:
        named = source if isinstance(source, Path) else "embedded bytes"
        raise DataError(f"{where} ({named}): not a readable image: {unreadable(err)}") from None


def undecoded(records: datasets.Dataset) -> datasets.Dataset:
    """The records with `datasets` Image columns giving {'bytes', 'path'} dicts instead of decoded PIL images."""
    for name in IMAGE_FIELDS:
        feature = records.features.get(name)
        if isinstance(feature, (datasets.List, datasets.Sequence)) and isinstance(feature.feature, datasets.Image):
            records = records.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return records


def paths_inside(field: Field, root: Path) -> Field:
    """An image-list field whose entries' paths must also lie inside `root` (`mmalign.data.resolve_path`): absolute
    paths and '..' parts are found up front (`leaving_root`), a link leading out when its image is read."""
    def check(value: Any, record: dict) -> str | None:
        problem = field.check(value, record)
        if problem or not value:
            return problem
        for i, entry in enumerate(value):
            path = entry.get("path") if isinstance(entry, dict) and not entry.get("bytes") else entry
            if isinstance(path, str):
                try:
                    resolve_path(path, root, where=f"image {i + 1}")
                except DataError as err:
                    return str(err)
        return None

    def suspects(column: pa.ChunkedArray) -> Mask | None:
        return any_of(field.suspects(column) if field.suspects else None, leaving_root(column))
    return dataclasses.replace(field, check=check, suspects=suspects)


def load_rows(path: str | Path, schema: Schema, split: str = "train", allow_outside: bool = False
              ) -> datasets.Dataset:
    """Records of `path` checked up front against `schema` (`mmalign.data.validate`), image paths included (inside
    the data's folder unless `allow_outside`, see `paths_inside`), their images left undecoded (`undecoded`): whether
    an image can be read is checked when its row is loaded."""
    records = undecoded(load_records(path, split))
    validate(records, placed(schema, path, allow_outside), source=str(path))
    return records


def placed(schema: Schema, path: str | Path, allow_outside: bool = False) -> Schema:
    """`schema` with its image paths required to lie inside the folder of the data at `path` (`paths_inside`),
    unless `allow_outside`."""
    if allow_outside:
        return schema
    root = data_root(path)
    return dataclasses.replace(schema, settings=f"paths inside {root}", fields=tuple(
        paths_inside(f, root) if f.name in IMAGE_FIELDS else f for f in schema.fields))


def image_inputs(processor, out: Any) -> dict[str, torch.Tensor]:
    """The image inputs of a processor's output: every output the model's image processor names (`pixel_values`, and
    e.g. `image_sizes`, `image_grid_thw`), each with one entry per image along dim 0 (or per call, like
    `batch_num_images`)."""
    names = processor.image_processor.model_input_names
    return {name: torch.as_tensor(out[name]) for name in names if out.get(name) is not None}


def image_token_id(processor) -> int:
    """The id of the tokens that image features replace: the processor's image token (`image_token_ids`; Gemma 3's
    soft image token, not its <start_of_image> placeholder)."""
    return processor.image_token_ids[0]


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


class RowLoader:
    """Loads a TRL row for training: tokenised (prompt ids with image tokens expanded, chosen/rejected ids cut to
    max_length), its images processed; a row that cannot be loaded raises `BadRow` naming it."""

    def __init__(self, processor, max_length: int | None = None, source: str = "data", root: Path = Path("."),
                 retrieved: bool = False, allow_outside: bool = False):
        self.processor, self.max_length = processor, max_length
        self.source, self.root, self.retrieved, self.allow_outside = source, root, retrieved, allow_outside
        self.image_token_id = image_token_id(processor)
        self.placeholder_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)

    def _render(self, record: dict, index: int) -> tuple[str, ...]:
        """`render`, its errors naming the row."""
        try:
            return render(record, self.processor)
        except DataError as err:
            raise BadRow(self.source, index, "prompt", str(err)) from None

    def _encode(self, text: str, images: list | None, index: int, field: str
                ) -> tuple[list[int], dict[str, torch.Tensor] | None]:
        """(prompt ids with image tokens expanded, image inputs or None (`image_inputs`)) from one processor call."""
        try:
            opened = [open_image(image, self.root, self.allow_outside, f"image {i + 1}")
                      for i, image in enumerate(images)] if images else None
            out = self.processor(images=opened, text=text, add_special_tokens=False, return_tensors="pt")
        except (KeyError, *IMAGE_ERRORS) as err:
            raise BadRow(self.source, index, field, str(err)) from None
        return out["input_ids"][0].tolist(), image_inputs(self.processor, out) if opened else None

    def item(self, record: dict, index: int) -> dict[str, Any]:
        """Row `index` tokenised, its images processed."""
        prompt, chosen, rejected = self._render(record, index)
        prompt_ids, images = self._encode(prompt, record.get("images"), index, "images")
        tok = self.processor.tokenizer
        item = {"index": index, "prompt_ids": prompt_ids, "images": images, "image_count": len(record["images"] or [])}
        completions = {key: tok(text, add_special_tokens=False)["input_ids"] for key, text in (("chosen", chosen),
                                                                                           ("rejected", rejected))}
        for key, ids in completions.items():
            item[f"{key}_ids"] = self._truncate(prompt_ids, ids, index, key)
        if self.retrieved:  # v' may expand to another number of image tokens (any-resolution models)
            visual_ids, item["retrieved_images"] = self._encode(prompt, record["retrieved_images"], index,
                                                                "retrieved_images")
            item["visual_prompt_ids"] = visual_ids
            item["visual_chosen_ids"] = self._truncate(visual_ids, completions["chosen"], index, "retrieved_images")
        return item

    def _truncate(self, prompt_ids: list[int], completion: list[int], index: int, key: str) -> list[int]:
        """The completion cut to fit max_length after the prompt; an error naming the row if image tokens or the whole
        completion would be cut."""
        if not completion:
            raise BadRow(self.source, index, key, "tokenises to no tokens")
        image_positions = [i for i, t in enumerate(prompt_ids) if t == self.image_token_id]
        problem = length_problem(len(prompt_ids), image_positions[-1] if image_positions else None, len(completion),
                                 self.max_length, key)
        if problem:
            raise BadRow(self.source, index, key, problem)
        return completion if self.max_length is None else completion[:self.max_length - len(prompt_ids)]


class VisionPairs(RowLoader, torch.utils.data.Dataset):
    """Validated TRL rows, each item tokenised: prompt ids (image tokens expanded), chosen/rejected ids, pixels."""

    def __init__(self, records: datasets.Dataset, processor, max_length: int | None = None, source: str = "data",
                 root: Path = Path("."), retrieved: bool = False, allow_outside: bool = False):
        super().__init__(processor, max_length, source, root, retrieved, allow_outside)
        self.records = records
        if retrieved and "retrieved_images" not in records.column_names:
            raise DataError(f"{source}: the retrieved-image visual term needs a 'retrieved_images' field (rDPO's v')")

    @classmethod
    def load(cls, path: str | Path, processor, max_length: int | None = None, split: str = "train",
             retrieved: bool = False, allow_outside: bool = False) -> VisionPairs:
        """Load and check every row of `path` up front: its fields (see `load_rows`), then how it renders and fits
        max_length (see `check_rows`; once for these records, processor and settings, see `check_once`); its images are
        read when it is loaded."""
        records = load_rows(path, RETRIEVED_ROW if retrieved else VISION_ROW, split, allow_outside)
        pairs = cls(records, processor, max_length, str(path), data_root(path), retrieved, allow_outside)
        check_once(records, ["vision rows", Hasher.hash(processor), max_length, retrieved, allow_outside],
                   pairs.check_rows, str(path))
        return pairs

    @classmethod
    def stream(cls, path: str | Path, processor, max_length: int | None = None, split: str = "train",
               retrieved: bool = False, allow_outside: bool = False, shuffle_buffer: int = 1000) -> Stream:
        """The rows of `path` read as training goes (`mmalign.stream`), each checked (fields, rendering, lengths) and
        tokenised when read."""
        rows = RowLoader(processor, max_length, str(path), data_root(path), retrieved, allow_outside)
        schema = placed(RETRIEVED_ROW if retrieved else VISION_ROW, path, allow_outside)
        return Stream(path, schema, rows.item, split=split, shuffle_buffer=shuffle_buffer)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.item(self.records[index], index)

    def image_counts(self) -> list[int]:
        """How many images each row has, read from the column's list lengths (no image is read)."""
        if "images" not in self.records.column_names:
            return [0] * len(self)
        return pc.list_value_length(self.records.data.column("images")).fill_null(0).to_pylist()

    @functools.cached_property
    def _first_image_tokens(self) -> int:
        """The number of image tokens one image of the first row with an image expands to (1 if none has one)."""
        index = next((i for i, n in enumerate(self.image_counts()) if n), None)
        if index is None:
            return 1
        first = self.records[index]
        ids = self._encode(self._render(first, index)[0], first["images"], index, "images")[0]
        return ids.count(self.image_token_id) // len(first["images"])

    def image_tokens(self, index: int, images: int) -> list[int]:
        """How many image tokens each of row `index`'s images expands to: from each image's size (its file's header)
        through the processor's own count (transformers' `_get_num_multimodal_tokens`: exact for any-resolution and
        dynamic-resolution models too), else the first image's count for every image (exact at fixed resolution)."""
        count = getattr(self.processor, "_get_num_multimodal_tokens", None)
        if not images or count is None:
            return [self._first_image_tokens] * images
        sizes = [image_size(entry, self.root, self.allow_outside) for entry in self.records[index]["images"]]
        return list(count(image_sizes=sizes).num_image_tokens)

    def _fit_problem(self, prompt: str, completions: list[str], image_tokens: list[int]) -> str | None:
        """Why a rendered row cannot be cut to max_length (see `length_problem`), from its text and each image's token
        count: the i-th image placeholder stands for image_tokens[i] tokens (exact where a placeholder becomes image
        tokens only; tokens a processor adds around them, like Gemma 3's end-of-image, are counted when the row is
        loaded, which stops the run with an error naming the row)."""
        tok = self.processor.tokenizer
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        images = [i for i, t in enumerate(ids) if t == self.placeholder_id]
        added = sum(image_tokens[:len(images)]) - len(images)
        last = images[-1] + added if images else None
        for key, completion in zip(("chosen", "rejected"), completions):
            completion_length = len(tok(completion, add_special_tokens=False)["input_ids"])
            problem = length_problem(len(ids) + added, last, completion_length, self.max_length, key)
            if problem:
                return problem
        return None

    def check_rows(self) -> None:
        """Check every row before training, from its text and image sizes: it renders (a conversation through the chat
        template) and, with max_length, fits, each image placeholder counting as the tokens its image expands to
        (`image_tokens`). Raises a DataError listing every row that does not render, or would lose image tokens or a
        whole completion."""
        text = self.records.remove_columns([c for c in IMAGE_FIELDS if c in self.records.column_names]).to_list()
        problems = []
        for index, (record, n) in enumerate(zip(text, self.image_counts())):
            try:
                prompt, *completions = render({**record, "images": [None] * n}, self.processor)
            except DataError as err:
                problems.append(f"  record {index}: {err}")
                continue
            try:
                problem = None if self.max_length is None else \
                    self._fit_problem(prompt, completions, self.image_tokens(index, n))
            except (DataError, *IMAGE_ERRORS) as err:  # an any-resolution model reads each image's size
                problem = f"field 'images': {unreadable(err)}"
            if problem:
                problems.append(f"  record {index}: {problem}")
        if problems:
            more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
            raise DataError(f"{self.source}: {len(problems)} row(s) cannot be trained on; nothing was trained\n"
                            + "\n".join(problems[:MAX_REPORTED]) + more)


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


CHOSEN, REJECTED, VISUAL = 0, 1, 2
"""The row kinds of a batch of B pairs, in blocks of B rows each (row kind * B + i belongs to pair i): prompt+chosen,
prompt+rejected, and with a visual term prompt+chosen shown the other images v'. Scores come back as [B, k] with
one column per kind, in this order. CHOSEN and REJECTED rows show the same prompt and images."""
SHARED_PROMPT_KINDS = 2  # the kinds that share a prompt, images included: CHOSEN and REJECTED


def cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors concatenated along dim 0, each zero-padded at the end of every other dim to the largest size (e.g.
    any-resolution images of different tile counts; the model reads each image's own tiles from `image_sizes`)."""
    size = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
    padded = [F.pad(t, [p for d in reversed(range(1, t.dim())) for p in (0, size[d] - t.shape[d])]) if t.dim() > 1
              else t for t in tensors]
    return torch.cat(padded)


def stack_images(inputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The image inputs of several processor calls as one: each input concatenated along dim 0 (`cat_padded`)."""
    return {name: cat_padded([x[name] for x in inputs]) for name in inputs[0]}


def collate_pairs(items: list[dict], pad_token_id: int, visual: bool = False) -> dict[str, Any]:
    """Batch of B pairs as R = 2B rows [prompt+chosen; prompt+rejected], plus with `visual` B rows of prompt+chosen
    shown the other images v' (the row kinds CHOSEN, REJECTED, VISUAL), right-padded.

    The pairs' image inputs (whatever the processor gives: `pixel_values`, `image_sizes`, `image_grid_thw`, ...) are
    stacked once in `images` (`stack_images`), with `image_extents` [B] per input the dim-0 rows each pair holds;
    `image_order` lists, row by row, which image each row's image tokens take (v' rows take index N + i, i.e. images
    appended after the N real ones: the retrieved images, kept in `retrieved_images`, or corrupted ones made in the
    step), so chosen and rejected share one encoding. `completion_mask` marks completion tokens;
    `completion_lengths` is [B, k] per pair and row kind; `image_counts` [B] the images of each pair."""
    sequences = [(item["prompt_ids"], item[f"{kind}_ids"]) for kind in ("chosen", "rejected") for item in items]
    counts = [item["image_count"] for item in items]
    starts = torch.tensor([0, *counts]).cumsum(0).tolist()
    own = [list(range(starts[i], starts[i + 1])) for i in range(len(items))]
    order = own + own
    if visual:  # v' rows: the prompt as expanded for the retrieved images where they have their own
        sequences += [(item.get("visual_prompt_ids", item["prompt_ids"]),
                       item.get("visual_chosen_ids", item["chosen_ids"])) for item in items]
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
    batch: dict[str, Any] = {
        "index": torch.tensor([item["index"] for item in items]), "input_ids": input_ids,
        "attention_mask": attention_mask, "completion_mask": completion_mask,
        "completion_lengths": completion_mask.sum(1).view(-1, len(items)).T.contiguous(),
        "image_order": torch.tensor([i for ids in order for i in ids], dtype=torch.long),
        "image_counts": torch.tensor(counts)}
    images = [item["images"] for item in items if item["images"] is not None]
    if images:
        batch["images"] = stack_images(images)
        batch["image_extents"] = {name: torch.tensor([x[name].shape[0] if x is not None else 0 for x in
                                                      (item["images"] for item in items)]) for name in images[0]}
    if "retrieved_images" in items[0]:
        batch["retrieved_images"] = stack_images([item["retrieved_images"] for item in items])
    return batch


def pair_images(batch: dict[str, Any], pair: int) -> dict[str, torch.Tensor] | None:
    """Pair `pair`'s own image inputs, cut back out of the batch's stacked `images` (None if it has no image)."""
    if "images" not in batch or not int(batch["image_counts"][pair]):
        return None
    out = {}
    for name, extents in batch["image_extents"].items():
        start = int(extents[:pair].sum())
        out[name] = batch["images"][name][start:start + int(extents[pair])]
    return out


def write_rows(rows: list[dict], path: str | Path) -> Path:
    """Write TRL rows (PIL images in 'images'/'retrieved_images') atomically as Parquet with `datasets` Image types."""
    records = datasets.Dataset.from_list(rows)
    features = records.features.copy()
    for name in IMAGE_FIELDS:
        if name in features:
            features[name] = datasets.Sequence(datasets.Image())
    records = records.cast(features)
    return write_atomically(path, lambda tmp: records.to_parquet(str(tmp)))
