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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimlm.errors import InputError


class RecipeError(InputError):
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


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    prefix: str = "",
    short: tuple[str, ...] = (),
    *,
    typed: bool = False,
    skip: tuple[str, ...] = (),
    required: tuple[str, ...] = (),
) -> None:
    """Add one flag per (nested) field, default None so only given flags override. `short` fields drop the
    prefix and use dashes (`eval_data` -> --eval-data).

    `typed` (commands without a recipe, see `add_command_flags`): each flag carries its field's default, parsed to
    the field's type, so `args.<field>` is the value itself. `skip` leaves top-level fields out; `required` makes
    their flags required. A field's `metadata` may give its `flag` (another spelling, e.g. "--drain-timeout" for
    drain_timeout_s; args then holds it as drain_timeout), more spellings (`flags`), `choices`, `metavar`,
    `nargs` / `action` ("append") for list fields, and `negatable` (a bool with a --no-name flag)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        ftype = hints[f.name]
        if f.name in skip:
            continue
        if dataclasses.is_dataclass(ftype):
            add_flags(parser, ftype, f"{prefix}{f.name}.", typed=typed)
            continue
        flag = f"--{f.name.replace('_', '-')}" if f.name in short else f"--{prefix}{f.name}"
        flag = f.metadata.get("flag", flag)
        default = field_default(f)
        doc = docs.get(f.name, "")
        help_text = f"{doc} (default: {default})" if doc else f"(default: {default})"
        kwargs = _flag_kwargs(f, ftype, flag, default if typed else None, typed)
        if f.name in required:
            kwargs["required"] = True
            help_text = doc
        parser.add_argument(
            flag, *f.metadata.get("flags", ()), dest=_dest(f, prefix), help=help_text.replace("%", "%%"), **kwargs
        )  # argparse formats help with %


def add_command_flags(
    parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (), required: tuple[str, ...] = ()
) -> None:
    """A command's flags from its config dataclass: every top-level field a `--name-with-dashes` flag holding its
    default (nested sections `--section.field`); `config_from_flags` turns the parsed flags back into `cls`."""
    short = tuple(f.name for f in dataclasses.fields(cls))
    add_flags(parser, cls, short=short, typed=True, skip=skip, required=required)


def config_from_flags(cls: type, args: argparse.Namespace, prefix: str = "", **overrides: Any) -> Any:
    """Build `cls` from flags added by `add_command_flags` (fields without a flag keep their defaults);
    `overrides` replace fields (values the command computes, e.g. from several flags)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in overrides:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = config_from_flags(hints[f.name], args, f"{prefix}{f.name}.")
        elif hasattr(args, _dest(f, prefix)):
            value = getattr(args, _dest(f, prefix))
            kwargs[f.name] = list(value) if isinstance(value, list) else value  # never share argparse's list
    return cls(**kwargs, **overrides)


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default value (calling its default_factory)."""
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _dest(f: dataclasses.Field, prefix: str) -> str:
    """Where argparse keeps a field's flag: the field's (dotted) name, or its `flag` spelling's name."""
    if "flag" in f.metadata:
        return f.metadata["flag"].lstrip("-").replace("-", "_")
    return f"{prefix}{f.name}"


def _flag_kwargs(f: dataclasses.Field, ftype: Any, flag: str, default: Any, typed: bool) -> dict[str, Any]:
    """argparse keywords of one field's flag: metavar, choices, how many values, and (typed) the parser."""
    meta = f.metadata
    kwargs: dict[str, Any] = {"default": default}
    if meta.get("negatable"):  # --name / --no-name
        return {**kwargs, "action": argparse.BooleanOptionalAction}
    if "choices" in meta:
        kwargs["choices"] = list(meta["choices"])
    kwargs["metavar"] = meta.get("metavar", None if "choices" in meta else _metavar(ftype))
    if "action" in meta:  # "append": a repeatable flag, one value each time
        kwargs["action"] = meta["action"]
    if "nargs" in meta:
        kwargs["nargs"] = meta["nargs"]
    elif _strip_optional(ftype) is bool and "action" not in meta:
        kwargs.update(nargs="?", const="true")  # bare --flag = true
    if typed:
        kwargs["type"] = _flag_parser(ftype, flag, item=meta.get("action") == "append" or "nargs" in meta)
    return kwargs


def _flag_parser(ftype: Any, flag: str, item: bool) -> Callable[[str], Any]:
    """A flag string -> the field's type (for list flags that take one value per item, the item's type)."""
    if item:
        ftype = (typing.get_args(_strip_optional(ftype)) or (str,))[0]

    def parse(text: str) -> Any:
        return _coerce(text, ftype, flag)

    parse.__name__ = getattr(_strip_optional(ftype), "__name__", "value")  # argparse: "invalid int value: 'x'"
    return parse


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its comment} for a dataclass: the comment on the field's own line(s), else the comment lines
    directly above it. Fields without either are left out; so is everything when the source is unavailable.
    A subclass that re-declares a field (a command's own default) keeps its base's comment unless it has one."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base) and "__dataclass_fields__" in vars(base):
            docs.update(_own_field_docs(base))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    """field_docs of the fields written in `cls`'s own class body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # built in a REPL or from a zip without sources
        return {}
    comments: dict[int, str] = {}  # line number -> comment text
    code_lines: set[int] = set()  # lines holding code (a comment there is a trailing one)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
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
