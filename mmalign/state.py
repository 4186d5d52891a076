"""Training state on disk as safetensors + JSON: `save_state(state, folder, name)` and `load_state(folder, name)`.

A state is what `state_dict()` returns (optimizer, LR schedule, gradient scaler, SePPO's snapshot pool):
nested dicts, lists and tuples of tensors, numbers, strings, booleans and None. The tensors go to
`name.safetensors`, everything else to `name.json` with each tensor replaced by its key. Nothing is
pickled, so loading a checkpoint someone shared cannot run code; anything else in a state is refused
when it is saved, not when it is loaded.

JSON encoding: a tensor is {"__tensor__": key}, a tuple {"__tuple__": [...]}, a dict whose keys are not all
strings (an optimizer's parameter indices) or that could be mistaken for one of these {"__dict__": [[k, v], ...]}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TAGS = ("__tensor__", "__tuple__", "__dict__")
SCALARS = (bool, int, float, str, type(None))


class StateFormatError(ValueError):
    """A state file that is not one `save_state` wrote (or a state that cannot be written)."""


def encode(value: Any, tensors: dict[str, torch.Tensor], where: str = "state") -> Any:
    """The JSON form of `value`; its tensors are added to `tensors` (CPU, contiguous) under fresh keys."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, SCALARS):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        plain = all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value)) in TAGS)
        if plain:
            return {k: encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        for k in value:
            if not isinstance(k, (str, int, float, bool)):
                raise StateFormatError(f"{where}: key {k!r} of type {type(k).__name__} cannot be saved")
        return {"__dict__": [[k, encode(v, tensors, f"{where}[{k!r}]")] for k, v in value.items()]}
    raise StateFormatError(f"{where}: a {type(value).__name__} cannot be saved as safetensors/JSON state")


def decode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """The inverse of `encode`; unknown tensor keys raise StateFormatError naming `where`."""
    if isinstance(value, list):
        return [decode(v, tensors, where) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, inner), = value.items()
        if tag == "__tensor__":
            if inner not in tensors:
                raise StateFormatError(f"{where}: tensor {inner!r} is missing from the .safetensors file")
            return tensors[inner]
        if tag == "__tuple__":
            return tuple(decode(v, tensors, where) for v in inner)
        if tag == "__dict__":
            return {k: decode(v, tensors, where) for k, v in inner}
    return {k: decode(v, tensors, where) for k, v in value.items()}


def save_state(state: Any, folder: str | Path, name: str) -> None:
    """Write `state` as folder/name.json and folder/name.safetensors."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    encoded = encode(state, tensors, where=name)
    folder = Path(folder)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(encoded))


def load_state(folder: str | Path, name: str) -> Any:
    """Read a state written by `save_state`; a missing or malformed file raises StateFormatError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    skeleton, weights = folder / f"{name}.json", folder / f"{name}.safetensors"
    for path in (skeleton, weights):
        if not path.is_file():
            raise StateFormatError(f"{path} is missing")
    try:
        encoded = json.loads(skeleton.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StateFormatError(f"{skeleton} is not valid JSON ({err})") from None
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise StateFormatError(f"{weights} is not a readable safetensors file ({err})") from None
    return decode(encoded, tensors, where=str(skeleton))
