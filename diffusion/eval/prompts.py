"""The prompt set of an evaluation: a text file (one prompt a line), a CSV file or a JSONL file (one column)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from mmalign.data import read_utf8
from mmalign.errors import DataError

from ..data import read_prompts


def read_prompt_set(path: str | Path, column: str = "prompt") -> list[str]:
    """Prompts of a .txt file (non-empty lines), or the `column` of every row of a .csv or .jsonl file; a missing
    column or an empty or non-text value raises DataError naming the file, the row and the field."""
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".jsonl"):
        return read_prompts(path)
    if not path.is_file():
        raise DataError(f"prompts file {path} does not exist")
    text = read_utf8(path)
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if column not in (reader.fieldnames or []):
            raise DataError(f"prompts file {path}: no column {column!r} (its columns: "
                            f"{', '.join(reader.fieldnames or []) or 'none'}); choose one with --prompt-column")
        rows = [(reader.line_num, row) for row in reader]
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"prompts file {path}: line {number} is not JSON ({err.msg})") from None
            if not isinstance(row, dict) or column not in row:
                raise DataError(f"prompts file {path}: line {number} has no field {column!r}; choose the field "
                                "with --prompt-column")
            rows.append((number, row))
    prompts = []
    for number, row in rows:
        value = row[column]
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"prompts file {path}: line {number}, field {column!r}: {value!r} is not a non-empty "
                            "text")
        prompts.append(value.strip())
    if not prompts:
        raise DataError(f"prompts file {path} has no prompts")
    return prompts
