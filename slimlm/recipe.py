"""Dataclass configs from YAML recipes and command-line flags, 1:1.

A recipe's keys are the dataclass's field names; nested dataclasses are nested mappings. On the command line the
same fields are flags with dots for nesting (`--train.lr 1e-4`, `--lora.r 8`, `--eval-data val.jsonl`); flags
override the recipe. Unknown keys are errors that name the key and list the valid ones.
This module knows nothing of what the configs mean; each config validates itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any


class RecipeError(ValueError):
    """A recipe or flag that does not fit the config; the message names it."""


def from_dict(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a (nested) dict, refusing unknown keys."""
    if not isinstance(values, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise RecipeError(f"{where or 'recipe'}: unknown key(s) {unknown}; valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        ftype = hints[name]
        if dataclasses.is_dataclass(ftype):
            kwargs[name] = from_dict(ftype, value or {}, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, ftype, f"{where}{name}")
    return cls(**kwargs)


def load_recipe(cls: type, path: str | Path) -> Any:
    """Read a YAML recipe into `cls`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    return from_dict(cls, values, f"{path}: ")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (what a recipe would contain)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def add_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "", short: tuple[str, ...] = ()) -> None:
    """Add one flag per (nested) field, default None so only given flags override. `short` fields drop the
    prefix and use dashes (`eval_data` -> --eval-data)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        ftype = hints[f.name]
        if dataclasses.is_dataclass(ftype):
            add_flags(parser, ftype, f"{prefix}{f.name}.")
            continue
        flag = f"--{f.name.replace('_', '-')}" if f.name in short else f"--{prefix}{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        extra = {"nargs": "?", "const": "true"} if _strip_optional(ftype) is bool else {}  # bare --flag = true
        parser.add_argument(flag, dest=f"{prefix}{f.name}", default=None, metavar=_metavar(ftype),
                            help=f"(default: {default})", **extra)


def apply_flags(cfg: Any, args: argparse.Namespace) -> Any:
    """Return cfg with every flag that was given (not None) applied, nested fields included."""
    values = to_dict(cfg)
    for key, raw in vars(args).items():
        if raw is None or "." not in key and key not in values:
            continue
        node, parts = values, key.split(".")
        if any(p not in node for p in parts[:-1]) or not isinstance(node, dict):
            continue
        for p in parts[:-1]:
            node = node[p]
        if parts[-1] in node:
            node[parts[-1]] = raw
    return from_dict(type(cfg), values)


def _metavar(ftype: Any) -> str:
    base = _strip_optional(ftype)
    return {bool: "true|false", int: "N", float: "X"}.get(base, "VALUE")


def _strip_optional(ftype: Any) -> Any:
    args = typing.get_args(ftype)
    if typing.get_origin(ftype) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else ftype
    return ftype


def _coerce(value: Any, ftype: Any, where: str) -> Any:
    """Turn a YAML value or a flag string into the field's type (bool, int, float, str, tuple, list, unions)."""
    if value is None:
        return None
    base = _strip_optional(ftype)
    origin = typing.get_origin(base)
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if base in (int, float):
            if isinstance(value, bool) or base is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return base(value)
        if base is str:
            return str(value)
        if origin is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(_coerce(v, a, where) for v, a in zip(items, typing.get_args(base)))
        if origin is list:
            return [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value)
        if origin in (typing.Union, types.UnionType):  # e.g. str | list[str]: keep lists, strings as given
            return list(value) if isinstance(value, (list, tuple)) else value
    except (TypeError, ValueError):
        raise RecipeError(f"{where}: {value!r} is not a valid {getattr(base, '__name__', base)}") from None
    return value
