"""Dataclass configs from YAML recipes and command-line flags, 1:1.

A recipe's keys are the dataclass's field names; nested dataclasses are nested mappings. On the command line the
same fields are flags with dots for nesting (`--train.lr 1e-4`, `--lora.r 8`, `--eval-data val.jsonl`); flags
override the recipe. Unknown keys are errors that name the key and list the valid ones.
A field's documentation is the comment after it in the class (`lr: float = 2e-4  # peak learning rate`), or the
comment lines right above it; `field_docs` reads them, so the flags' --help text lives next to the field.
This module knows nothing of what the configs mean; each config validates itself.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
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


def read_yaml(path: str | Path, missing: str) -> Any:
    """A recipe file's YAML values ({} when empty); RecipeError `missing` when there is no such file, and one line
    naming the file for YAML or UTF-8 errors."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RecipeError(missing)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None


def load_recipe(cls: type, path: str | Path) -> Any:
    """Read a YAML recipe into `cls`."""
    return from_dict(cls, read_yaml(path, f"recipe {path} does not exist"), f"{path}: ")


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
        doc = field_docs(cls).get(f.name, "")
        help_text = f"{doc} (default: {default})" if doc else f"(default: {default})"
        parser.add_argument(flag, dest=f"{prefix}{f.name}", default=None, metavar=_metavar(ftype),
                            help=help_text.replace("%", "%%"), **extra)  # argparse formats help with %


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its comment} for a dataclass: the comment on the field's own line(s), else the comment lines
    directly above it. Fields without either are left out; so is everything when the source is unavailable."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # built in a REPL or from a zip without sources
        return {}
    comments: dict[int, str] = {}  # line number -> comment text
    code_lines: set[int] = set()  # lines holding code (a comment there is a trailing one)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    body = ast.parse(source).body[0].body
    docs = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        lines = range(node.lineno, node.end_lineno + 1)
        doc = " ".join(comments[n] for n in lines if n in comments)
        if not doc:  # a block of comment-only lines right above the field
            above, n = [], node.lineno - 1
            while n in comments and n not in code_lines:
                above.insert(0, comments[n])
                n -= 1
            doc = " ".join(above)
        if doc:
            docs[node.target.id] = doc
    return docs


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
    if base is not ftype and base is not str and isinstance(value, str) and value.lower() in ("none", "null"):
        return None  # a flag un-sets an optional field a recipe set (e.g. --train.max_steps none --train.num_epochs 2)
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
            items = [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value)
            item_type = (typing.get_args(base) or (None,))[0]
            return [_coerce(v, item_type, where) for v in items] if item_type in (int, float) else items
        if origin is dict and isinstance(value, str):  # a flag: "q_proj=2,v_proj=4"
            key_type, value_type = typing.get_args(base) or (str, str)
            pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError(value)
            return {k.strip(): _coerce(v.strip(), value_type, where) for k, v in pairs}
        if origin in (typing.Union, types.UnionType):  # e.g. str | list[str]: keep lists, strings as given
            return list(value) if isinstance(value, (list, tuple)) else value
    except (TypeError, ValueError):
        raise RecipeError(f"{where}: {value!r} is not a valid {getattr(base, '__name__', base)}") from None
    return value
