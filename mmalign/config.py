"""Typed run configs: dataclasses with help text, loaded from YAML plus command-line overrides, saved per run.

A config is a dataclass whose fields carry `help` metadata (see `option`). `parse_config(cls, argv)`
builds an argparse parser from the fields (`max_steps` -> `--max-steps`, booleans get `--x/--no-x`),
reads `--config FILE.yaml` first, then applies the flags given on the command line, and runs the
dataclass's `__post_init__` validation. Errors name the file and the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from mmalign.errors import ConfigError, DataError


def option(default: Any, help: str, reads: Literal["file", "folder"] | None = None, **kwargs: Any) -> Any:
    """A dataclass field with help text (shown by `--help`); `reads`: the field names an input file or folder, which
    `check_inputs` checks before the command runs."""
    metadata = {"help": help, "reads": reads}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def check_inputs(config: Any) -> None:
    """DataError naming the flag and the path of the first input (`option(reads=...)`) that is missing, of the other
    kind (a folder for a file) or not readable."""
    for item in dataclasses.fields(config):
        kind, value = item.metadata.get("reads"), getattr(config, item.name)
        if not kind or value in (None, ""):
            continue
        path, flag = Path(value), "--" + item.name.replace("_", "-")
        if not path.exists():
            raise DataError(f"{flag} {path}: no such {kind}")
        if path.is_dir() != (kind == "folder"):
            raise DataError(f"{flag} {path}: a {'folder' if path.is_dir() else 'file'}, not the {kind} it names")
        if not os.access(path, os.R_OK | (os.X_OK if kind == "folder" else 0)):
            raise DataError(f"{flag} {path}: the {kind} cannot be read (permission denied)")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(hint: Any) -> Any:
    """The non-None member of Optional[X], else the hint itself."""
    args = [a for a in get_args(hint) if a is not type(None)]
    if get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return hint


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming `where`."""
    optional = type(None) in get_args(hint)
    hint = _base_type(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required")
    try:
        if get_origin(hint) is Literal:
            choices = get_args(hint)
            if value not in choices:
                raise ValueError(f"must be one of {', '.join(map(str, choices))}")
            return value
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1"):
                return True
            if str(value).lower() in ("false", "no", "0"):
                return False
            raise ValueError("must be true or false")
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("must be an integer")
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError("must be a number")
            if not math.isfinite(float(value)):
                raise ValueError("must be a finite number")
            return float(value)
        if hint is Path:
            return Path(value)
        if hint is str:
            return str(value)
        if get_origin(hint) is list:
            (item,) = get_args(hint)
            values = value if isinstance(value, list) else [value]
            return [_coerce(v, item, where) for v in values]
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {value!r} {err}") from None
    return value


def coerce_values(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """Typed copies of `values` for `cls`'s fields; unknown keys and ill-typed values raise errors naming `source`."""
    hints = {f.name: _hints(cls)[f.name] for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(hints))}")
    return {k: _coerce(v, hints[k], f"{source}: key '{k}'") for k, v in values.items()}


def from_dict(cls: type, values: dict[str, Any], source: str = "config") -> Any:
    """Build `cls` from a flat dict; missing, unknown or ill-typed settings raise ConfigError naming `source`."""
    values = coerce_values(cls, values, source)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: missing required setting(s) "
                          + ", ".join(f"--{m.replace('_', '-')}" for m in missing))
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {err}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file (error naming the file when it is missing or not a mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def _plain(value: Any) -> Any:
    """Paths as strings, callables (given from Python) as `module:name`."""
    if isinstance(value, Path):
        return str(value)
    return f"{value.__module__}:{value.__qualname__}" if callable(value) else value


def to_dict(config: Any) -> dict[str, Any]:
    """A YAML-friendly dict of the config (paths as strings, callables as module:name)."""
    return {k: _plain(v) for k, v in dataclasses.asdict(config).items()}


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def build_parser(cls: type, prog: str, description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of `cls` and `--config FILE.yaml`; unset flags stay absent."""
    parser = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML file of settings; command-line flags override it")
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = _base_type(hints[f.name])
        default = f.default_factory() if callable(f.default_factory) else f.default
        text = f.metadata.get("help", "") + (f" (default: {default})" if default is not None else "")
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif get_origin(hint) is Literal:
            parser.add_argument(flag, choices=get_args(hint), help=text)
        elif get_origin(hint) is list:
            parser.add_argument(flag, nargs="*", help=text)
        else:
            parser.add_argument(flag, metavar=f.name.upper(), help=text)
    return parser


def parse_config(cls: type, argv: list[str] | None, prog: str, description: str = "") -> Any:
    """Resolve a config: field defaults, then `--config FILE.yaml`, then command-line flags."""
    args = vars(build_parser(cls, prog, description).parse_args(argv))
    values: dict[str, Any] = {}
    sources = "command line"
    if "config" in args:
        path = args.pop("config")
        values = coerce_values(cls, load_yaml(path), source=f"config file {path}")
        sources = f"config file {path} and command line"
    values.update(coerce_values(cls, args, source="command line"))
    return from_dict(cls, values, source=sources)
