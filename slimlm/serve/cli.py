"""`slimlm serve` and `slimlm batch`: their flags, made from dataclasses, then the server or a batch job; and
`slimlm registry push|list|show|alias|rollback`, the command line of slimlm.serve.registry (parse, call, print).

The flags come from ServeLoadConfig (the model and how to load it), ServeConfig's fields (adapters, keys, limits),
EngineConfig (through the two subclasses below, which state the commands' own defaults) and ListenConfig; the help
text of each is its field's comment (slimlm.recipe). `serve_config` turns parsed flags back into a ServeConfig.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
from dataclasses import dataclass, field
from typing import Any

from slimlm.engine.core import EngineConfig
from slimlm.errors import InputError
from slimlm.load_config import SERVE_SKIP, ServeLoadConfig
from slimlm.recipe import add_command_flags, config_from_flags
from slimlm.serve.ray_serve import RayServeConfig, build_app, config_from_dict
from slimlm.serve.registry import KINDS, Registry
from slimlm.serve.state import ServeConfig


@dataclass
class ServeEngineConfig(EngineConfig):
    """The engine as `slimlm serve` and `batch` run it: batch and context sized for the machine by default."""

    # sequences decoded together (KV cache slots); 0 = auto: 16 on a CPU, 64 on a GPU
    max_batch: int = 0
    # prompt + output tokens per request; 0 = auto: the model's context up to 4096, halved until the KV cache fits
    # a quarter of free memory
    max_seq_len: int = 0


@dataclass
class ServerEngineConfig(ServeEngineConfig):
    """`slimlm serve`'s engine: requests time out (a batch job waits for every line)."""

    # a request still unfinished this long after it arrived (queue time included) is aborted and its slot freed:
    # 504 (a stream ends with an error event); 0 = no limit
    request_timeout_s: float = field(default=600.0, metadata={"flag": "--request-timeout", "metavar": "SECONDS"})


@dataclass
class ListenConfig:
    """Where `slimlm serve` listens (not in ServeConfig: under Ray the proxy's host and port are Ray's)."""

    host: str = "127.0.0.1"  # address to listen on (0.0.0.0: every interface)
    port: int = 8000  # HTTP port
    # also serve KServe v2 / Triton gRPC (GRPCInferenceService, for tritonclient.grpc) on this port, same engine and
    # keys; tensors text_input -> text_output; 0 = off
    grpc_port: int = field(default=0, metadata={"metavar": "PORT"})


ENGINE_FLAGLESS = ("prefix_block", "ngram_max", "ngram_min", "fused_decode")  # engine settings with no flag
# ServeConfig fields with flags on both `serve` and `batch`, and those of `serve` alone (the rest: load flags,
# engine flags, and --memory-budget, a size parsed from text).
SHARED_FIELDS = ("served_name", "adapters", "registry", "draft_model", "max_tokens_limit")
SERVER_FIELDS = (
    "api_key_file",
    "api_keys",
    "admin_key_file",
    "allow_runtime_lora",
    "lora_roots",
    "models",
    "max_models",
    "load_timeout_s",
    "max_body_bytes",
    "drain_timeout_s",
)


def _all_but(cls: type, names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in names)


def add_server_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by `serve` and `batch`: the model, adapters, and the engine's limits."""
    add_command_flags(p, ServeLoadConfig, skip=SERVE_SKIP)
    add_command_flags(p, ServeConfig, skip=_all_but(ServeConfig, SHARED_FIELDS))
    add_command_flags(p, ServeEngineConfig, skip=(*ENGINE_FLAGLESS, "request_timeout_s"))
    p.set_defaults(engine_config=ServeEngineConfig)


def serve_config(args: argparse.Namespace, fields: tuple[str, ...] = SHARED_FIELDS, **extra) -> ServeConfig:
    """The ServeConfig of `serve` / `batch` flags: the load and engine flags, and the ServeConfig `fields` read
    from flags; `extra` sets fields directly."""
    load = config_from_flags(ServeLoadConfig, args)
    load_values = {k: v for k, v in dataclasses.asdict(load).items() if k not in SERVE_SKIP}
    load_values["quantize"] = None if load.quantize == "none" else load.quantize
    engine_cls = getattr(args, "engine_config", ServeEngineConfig)
    engine = EngineConfig(**dataclasses.asdict(config_from_flags(engine_cls, args)))  # the plain class, same values
    from_flags = {f: v for f, v in vars(config_from_flags(ServeConfig, args)).items() if f in fields}
    cfg = ServeConfig(**{**from_flags, **load_values, "engine": engine, **extra})
    cfg.validate()
    return cfg


def cmd_serve(args: argparse.Namespace) -> int:
    from slimlm.serve.server import run_server

    cfg = serve_config(
        args,
        (*SHARED_FIELDS, *SERVER_FIELDS),
        api_keys=api_keys(args),
        memory_budget=parse_size(args.memory_budget, "--memory-budget"),
    )
    if not 0 <= args.grpc_port <= 65535:
        raise InputError(f"--grpc-port {args.grpc_port}: send a port in 1..65535, or 0 for no gRPC")
    run_server(cfg, args.host, args.port, args.grpc_port)
    return 0


SIZE_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "M": 1000**2,
    "MB": 1000**2,
    "G": 1000**3,
    "GB": 1000**3,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TB": 1000**4,
    "TIB": 2**40,
}


def parse_size(text: str | None, flag: str) -> int:
    """'3GiB', '800MB', '1.5G', '123456' -> bytes (decimal K/M/G/T, binary KiB/MiB/GiB/TiB); None or '0' -> 0."""
    import re

    if text is None:
        return 0
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if m is None or unit not in SIZE_UNITS:
        raise InputError(
            f"{flag} {text!r}: send a size such as 3GiB, 800MB or 1.5G (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    return int(float(m.group(1)) * SIZE_UNITS[unit])


def api_keys(args: argparse.Namespace) -> list[str]:
    """--api-key values and SLIMLM_API_KEY (both merged with --api-key-file's keys by ServerState)."""
    import os

    env = os.environ.get("SLIMLM_API_KEY", "").strip()
    return list(args.api_key) + ([env] if env else [])


def cmd_batch(args: argparse.Namespace) -> int:
    from slimlm.checkpoint.atomic import check_output
    from slimlm.serve.batch import run_batch

    check_output(args.output, overwrite=args.overwrite, inputs=[args.input, args.model], flag="OUTPUT", kind="file")
    summary = run_batch(serve_config(args), args.input, args.output, progress=not args.quiet)
    print(summary)
    return 0 if summary.failed == 0 else 1


def add_serve_commands(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and many LoRA adapters")
    add_server_args(s)
    add_command_flags(s, ListenConfig)
    add_command_flags(s, ServeConfig, skip=_all_but(ServeConfig, SERVER_FIELDS))
    s.add_argument(
        "--memory-budget",
        default=None,
        metavar="SIZE",
        help="bytes of weights + KV caches the resident base models may take, e.g. 3GiB or 800MB: "
        "loading one more unloads least recently used idle ones until it fits (default: no limit)",
    )
    add_command_flags(s, ServerEngineConfig, skip=_all_but(ServerEngineConfig, ("request_timeout_s",)))
    s.set_defaults(engine_config=ServerEngineConfig)
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("batch", help="run an OpenAI batch-format JSONL file through the serving engine, offline")
    add_server_args(b)
    b.add_argument("input", help="JSONL: {custom_id, method: POST, url: /v1/chat/completions, body: {...}} per line")
    b.add_argument("output", help="JSONL of results, one per input line, in OpenAI's batch output format")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT file (never the INPUT)")
    b.set_defaults(func=cmd_batch)


# ------------------------------------------------------------------ the Ray Serve app (slimlm deploy ray)


def ray_app_builder(args: dict):
    """Ray Serve application builder, the `import_path` of `serve run` / `serve deploy` config files
    (`slimlm.serve.cli:ray_app_builder`). `args`: {"serve": ServeConfig fields (as `slimlm deploy ray` writes
    them) or "serve_args": "`slimlm serve` flags", "ray": {RayServeConfig fields}}. API keys come from the
    SLIMLM_API_KEY environment variable of the process that builds the app, never from the file."""
    unknown = set(args) - {"serve", "serve_args", "ray"}
    if unknown or ("serve" in args) == ("serve_args" in args):
        raise InputError(f"the slimlm Ray app takes args serve (or serve_args) and ray; got {sorted(args)}")
    fields = {f.name for f in dataclasses.fields(RayServeConfig)}
    bad = set(args.get("ray", {})) - fields
    if bad:
        raise InputError(f"unknown ray settings {sorted(bad)}; known: {sorted(fields)}")
    if "serve_args" in args:  # the flags' parser reads SLIMLM_API_KEY itself
        serve_config = serve_config_from_flags(args["serve_args"])
    else:
        serve_config = config_from_dict(args["serve"])
        env_key = os.environ.get("SLIMLM_API_KEY", "").strip()
        serve_config.api_keys = [*serve_config.api_keys, *([env_key] if env_key else [])]
    return build_app(serve_config, RayServeConfig(**args.get("ray", {})))


def serve_config_from_flags(flags: str | list[str]) -> ServeConfig:
    """A ServeConfig from `slimlm serve`'s flags (the model, engine and API-key flags), parsed by its own parser."""

    class Raising(argparse.ArgumentParser):
        def error(self, message: str):  # argparse would print usage and exit the replica
            raise InputError(f"serve_args: {message}")

    argv = shlex.split(flags) if isinstance(flags, str) else list(flags)
    parser = Raising(prog="slimlm")
    add_serve_commands(parser.add_subparsers(dest="command", parser_class=Raising))
    args = parser.parse_args(["serve", *argv])
    ignored = [
        f
        for f in ("--host", "--port", "--grpc-port", "--drain-timeout")
        if any(a == f or a.startswith(f + "=") for a in argv)
    ]
    if ignored:
        raise InputError(
            f"{', '.join(ignored)}: not used under Ray (the HTTP proxy's host and port are the Ray "
            "settings; Ray drains replicas itself)"
        )
    # serve's own settings that apply under Ray (not the model pool's, --load-timeout or --drain-timeout)
    under_ray = ("api_key_file", "max_body_bytes", "admin_key_file", "allow_runtime_lora", "lora_roots")
    return serve_config(args, (*SHARED_FIELDS, *under_ray), api_keys=api_keys(args))


# ------------------------------------------------------------- slimlm registry push|list|show|alias|rollback


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
        print(
            json.dumps(
                [{**e.to_dict(), "versions": counts[e.name], "aliases": reg.aliases(e.name)} for e in heads], indent=2
            )
        )
        return 0
    if not heads:
        print(f"the registry at {reg.root} is empty: `slimlm registry push NAME PATH` adds an artifact")
        return 0
    rows = [
        [
            e.name,
            f"v{e.version}",
            counts[e.name],
            e.kind,
            e.method,
            e.parent_base,
            ",".join(f"{a}=v{v}" for a, v in reg.aliases(e.name).items()),
            e.sha256[:12],
            e.created_at,
        ]
        for e in heads
    ]
    print(_table(["NAME", "HEAD", "VERSIONS", "KIND", "METHOD", "PARENT", "ALIASES", "SHA256", "CREATED"], rows))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    reg = _registry(args)
    head, aliases, entries = reg.head(args.name), reg.aliases(args.name), reg.entries(args.name)
    if args.json:
        print(
            json.dumps(
                {
                    "name": args.name,
                    "head": head,
                    "aliases": aliases,
                    "versions": [e.to_dict() for e in entries],
                    "history": reg.history(args.name),
                },
                indent=2,
            )
        )
        return 0
    rows = [
        [
            f"v{e.version}",
            "*" if e.version == head else "",
            ",".join(a for a, v in aliases.items() if v == e.version),
            e.kind,
            e.method,
            e.parent_base,
            e.sha256[:12],
            e.created_at,
            _metrics_brief(e.metrics),
            e.path,
        ]
        for e in entries
    ]
    print(
        _table(["VERSION", "HEAD", "ALIASES", "KIND", "METHOD", "PARENT", "SHA256", "CREATED", "METRICS", "PATH"], rows)
    )
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
    r = sub.add_parser(
        "registry",
        help="versioned registry of models, quantized artifacts and adapters",
        description="Versioned, immutable artifacts: refer to them as NAME (head), NAME@N or NAME@ALIAS.",
    )
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
