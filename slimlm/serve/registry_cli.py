"""`slimlm registry push|list|show|alias|rollback`: the command line of slimlm.serve.registry. Thin: parse, call, print.

Errors are RegistryError (a ValueError), which slimlm.cli.main prints as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from slimlm.serve.registry import KINDS, Registry


def _registry(args: argparse.Namespace) -> Registry:
    return Registry(args.root)


def _metrics_brief(metrics: dict[str, Any], n: int = 3) -> str:
    """A few numeric metrics for a table cell (top level and the finetune summary's "eval" dict)."""
    evals = metrics.get("eval") if isinstance(metrics.get("eval"), dict) else {}
    flat = {**{f"eval.{k}": v for k, v in evals.items()}, **metrics}  # eval scores first: they say the most
    nums = [f"{k}={v:.4g}" for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return " ".join(nums[:n]) or "-"


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    """Left-aligned columns, two spaces apart; None prints as '-'."""
    cells = [headers] + [["-" if c is None or c == "" else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def cmd_push(args: argparse.Namespace) -> int:
    e = _registry(args).push(args.name, args.path, kind=args.kind, parent_base=args.parent_base, method=args.method)
    print(f"pushed {e.ref} ({e.kind}{', ' + e.method if e.method else ''}) sha256 {e.sha256[:12]} -> {e.path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    reg = _registry(args)
    heads = [reg.resolve(name) for name in reg.names()]
    counts = {name: len(reg.entries(name)) for name in reg.names()}
    if args.json:
        print(json.dumps([{**e.to_dict(), "versions": counts[e.name], "aliases": reg.aliases(e.name)}
                          for e in heads], indent=2))
        return 0
    if not heads:
        print(f"the registry at {reg.root} is empty: `slimlm registry push NAME PATH` adds an artifact")
        return 0
    rows = [[e.name, f"v{e.version}", counts[e.name], e.kind, e.method, e.parent_base,
             ",".join(f"{a}=v{v}" for a, v in reg.aliases(e.name).items()), e.sha256[:12], e.created_at]
            for e in heads]
    print(_table(["NAME", "HEAD", "VERSIONS", "KIND", "METHOD", "PARENT", "ALIASES", "SHA256", "CREATED"], rows))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    reg = _registry(args)
    head, aliases, entries = reg.head(args.name), reg.aliases(args.name), reg.entries(args.name)
    if args.json:
        print(json.dumps({"name": args.name, "head": head, "aliases": aliases,
                          "versions": [e.to_dict() for e in entries], "history": reg.history(args.name)}, indent=2))
        return 0
    rows = [[f"v{e.version}", "*" if e.version == head else "", ",".join(a for a, v in aliases.items() if v == e.version),
             e.kind, e.method, e.parent_base, e.sha256[:12], e.created_at, _metrics_brief(e.metrics), e.path]
            for e in entries]
    print(_table(["VERSION", "HEAD", "ALIASES", "KIND", "METHOD", "PARENT", "SHA256", "CREATED", "METRICS", "PATH"],
                 rows))
    return 0


def cmd_alias(args: argparse.Namespace) -> int:
    e = _registry(args).alias(args.ref, args.alias)
    print(f"{e.name}@{args.alias} -> {e.ref}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    e = _registry(args).rollback(args.name)
    print(f"{e.name} head -> {e.ref}")
    return 0


def add_registry_commands(sub) -> None:
    """Add `registry` and its sub-commands to the `slimlm` sub-parsers; each sets `func` to its handler."""
    root_help = "registry folder (default: $SLIMLM_REGISTRY or ~/.cache/slimlm/registry)"
    r = sub.add_parser("registry", help="versioned registry of models, quantized artifacts and adapters",
                       description="Versioned, immutable artifacts: refer to them as NAME (head), NAME@N or NAME@ALIAS.")
    r.add_argument("--root", default=None, help=root_help)
    rsub = r.add_subparsers(dest="registry_command", required=True)

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = rsub.add_parser(name, help=help)
        p.add_argument("--root", default=argparse.SUPPRESS, help=root_help)  # also accepted after the sub-command
        p.set_defaults(func=func)
        return p

    p = command("push", cmd_push, "copy a model/adapter folder or .gguf file in as the next version of NAME")
    p.add_argument("name")
    p.add_argument("path", help="model folder (config.json), adapter folder (adapter_config.json) or .gguf file")
    p.add_argument("--kind", choices=KINDS, default=None, help="override the detected kind")
    p.add_argument("--parent-base", default=None, help="base model of an adapter (default: its adapter_config.json)")
    p.add_argument("--method", default=None, help="fine-tuning or quantization method (default: detected)")
    p = command("list", cmd_list, "every name with its head version and aliases")
    p.add_argument("--json", action="store_true")
    p = command("show", cmd_show, "every version of NAME, with the head and aliases marked")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p = command("alias", cmd_alias, "point NAME@ALIAS (e.g. prod) at a version")
    p.add_argument("ref", help="NAME@N (or NAME, NAME@OTHER_ALIAS)")
    p.add_argument("alias")
    p = command("rollback", cmd_rollback, "move NAME's head back to the version before it")
    p.add_argument("name")


__all__ = ["add_registry_commands"]
