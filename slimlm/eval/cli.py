"""`slimlm eval`: perplexity, task accuracy and speed of one model (+ adapter) as a Markdown table and JSON.

    slimlm eval --model M [--adapter A] [--dtype D] [--ppl [FILE]] [--ppl-tokens N] [--seq-len L] [--stride S]
                [--task FILE] [--task-metric NAME] [--speed] [--json OUT]

`--ppl` alone measures on the built-in held-out corpus (slimlm.eval.corpus); with no --ppl, --task or --speed,
`--ppl` is implied. The table has one row, so tables of several runs (e.g. compression variants) stack.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slimlm.errors import USER_ERRORS, InputError, report_error

BUILTIN = "builtin:heldout"


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """The flags of `slimlm eval`: the load flags (LoadConfig; --compile: time the compiled decode step in
    --speed), then what to measure."""
    from slimlm.load_config import EVAL_SKIP, LoadConfig
    from slimlm.recipe import add_command_flags

    add_command_flags(p, LoadConfig, skip=EVAL_SKIP)
    p.add_argument(
        "--ppl",
        nargs="?",
        const=BUILTIN,
        default=None,
        metavar="FILE",
        help="perplexity on FILE (UTF-8 text, or .jsonl with a 'text' field per line); "
        "without FILE on the built-in held-out corpus",
    )
    p.add_argument("--ppl-tokens", type=int, default=None, metavar="N", help="score at most N tokens (default: all)")
    p.add_argument("--seq-len", type=int, default=512, help="perplexity window in tokens (default 512)")
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="window step; < seq-len scores each token once with overlap as context (default: seq-len)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="perplexity windows per forward pass")
    p.add_argument("--task", default=None, metavar="FILE", help="JSONL chat records: greedy answers, exact match")
    p.add_argument("--task-metric", default=None, metavar="NAME", help="a bundled task's scorer (e.g. extract_json)")
    p.add_argument("--task-limit", type=int, default=None, metavar="N", help="score the first N records only")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length cap for --task")
    p.add_argument("--speed", action="store_true", help="prefill/decode tokens/s, size on disk, peak RSS")
    p.add_argument("--speed-prompt", type=int, default=128, help="prompt tokens for --speed")
    p.add_argument("--speed-new", type=int, default=32, help="decoded tokens for --speed")
    p.add_argument("--speed-repeats", type=int, default=3, help="timed runs for --speed (the median is reported)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_eval_commands(sub) -> None:
    """Register `eval` on the subparsers `sub` of the slimlm command line."""
    e = sub.add_parser(
        "eval",
        help="perplexity, task accuracy and speed of a model (Markdown table + JSON)",
        description=__doc__.split("\n\n")[0],
    )
    add_eval_args(e)
    e.set_defaults(func=cmd_eval)


def read_text(path: str | Path) -> str:
    """A text file's contents; for .jsonl, the 'text' field of every record joined by a blank line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such text file for --ppl")
    if path.suffix != ".jsonl":
        return path.read_text(encoding="utf-8")
    from slimlm.jsonl import read_lines

    texts = []
    for line in read_lines(path):  # blank lines skipped; bad bytes and bad JSON come back as line.error
        if line.error is not None:
            raise InputError(f"{path}:{line.number}: {line.error}")
        if not isinstance(line.value, dict) or not isinstance(line.value.get("text"), str):
            raise InputError(f"{path}:{line.number}: each JSONL record needs a string 'text' field for --ppl")
        texts.append(line.value["text"])
    return "\n\n".join(texts)


def _check_args(args: argparse.Namespace) -> None:
    """Fail on bad flags before the slow model load."""
    from slimlm.eval.perplexity import sliding_windows
    from slimlm.eval.speed import SpeedConfig
    from slimlm.eval.task_accuracy import task_metric_names

    if args.ppl is None and args.task is None and not args.speed:
        args.ppl = BUILTIN
    if args.ppl is not None:
        if args.ppl != BUILTIN and not Path(args.ppl).is_file():
            raise FileNotFoundError(f"{args.ppl}: no such text file for --ppl")
        sliding_windows(2, args.seq_len, args.stride or args.seq_len, args.ppl_tokens)  # validates the numbers
        if args.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.task is not None and not Path(args.task).is_file():
        raise FileNotFoundError(f"{args.task}: no such task file for --task")
    if args.task_metric is not None and args.task_metric not in task_metric_names():
        raise InputError(f"unknown --task-metric {args.task_metric!r}; bundled tasks: {', '.join(task_metric_names())}")
    if args.task_metric is not None and args.task is None:
        raise InputError("--task-metric needs --task FILE")
    if args.speed:
        SpeedConfig(args.speed_prompt, args.speed_new, repeats=args.speed_repeats).validate()


def _model_source(model: str, loaded_from: Path | None) -> Path | None:
    """What to measure on disk: the path given, the file an alias names, else the folder the model loaded from."""
    from slimlm.checkpoint import ALIASES, resolve

    if Path(model).exists():
        return Path(model)
    if model in ALIASES:
        return resolve(model)
    return loaded_from


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model once and run what the flags ask for; the JSON-ready results."""
    import dataclasses

    import torch

    from slimlm.eval.speed import SpeedConfig, disk_size, measure_speed, memory_report
    from slimlm.llm import load
    from slimlm.load_config import LoadConfig
    from slimlm.quantize.schemes import describe_quantization
    from slimlm.recipe import config_from_flags

    _check_args(args)
    t0 = time.perf_counter()
    llm = load(**dataclasses.asdict(config_from_flags(LoadConfig, args)))  # backend: torch (no --backend here)
    out: dict[str, Any] = {
        "model": args.model,
        "adapter": args.adapter,
        "quantization": describe_quantization(llm.model.quantization),
        "dtype": str(llm.model.dtype).removeprefix("torch."),
        "device": str(llm.model.device),
        "parameters": sum(p.numel() for p in llm.model.parameters()),
        "load_s": time.perf_counter() - t0,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if args.ppl is not None:
        from slimlm.eval.corpus import builtin_corpus, corpus_info
        from slimlm.eval.perplexity import perplexity

        text = builtin_corpus("heldout") if args.ppl == BUILTIN else read_text(args.ppl)
        res = perplexity(
            llm.model,
            llm.tokenizer,
            text,
            seq_len=args.seq_len,
            stride=args.stride or args.seq_len,
            max_tokens=args.ppl_tokens,
            batch_size=args.batch_size,
            progress=not args.quiet,
        )
        res["text"] = args.ppl
        if args.ppl == BUILTIN:
            res["corpus"] = corpus_info()
        out["perplexity"] = res
    if args.task is not None:
        from slimlm.eval.task_accuracy import task_accuracy

        out["task"] = task_accuracy(
            llm.model, llm.tokenizer, args.task, args.task_metric, args.task_limit, args.max_new_tokens
        )
    if args.speed:
        cfg = SpeedConfig(args.speed_prompt, args.speed_new, repeats=args.speed_repeats)
        out["speed"] = measure_speed(llm.model, cfg)
        source = _model_source(args.model, llm.path)
        out["speed"]["model_bytes"] = disk_size(source) if source is not None else None
        if args.adapter is not None:
            out["speed"]["adapter_bytes"] = disk_size(args.adapter)
    out["memory"] = memory_report(llm.model.device)
    return out


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def format_table(res: dict[str, Any]) -> str:
    """One Markdown table with one row: the columns of what was measured."""
    cols = [
        ("model", res["model"] + (f" + {res['adapter']}" if res.get("adapter") else "")),
        ("dtype", res["dtype"]),
        ("weights", res.get("quantization") or res["dtype"]),
    ]
    if "perplexity" in res:
        p = res["perplexity"]
        cols += [
            ("ppl", _fmt(p["ppl"], 3)),
            ("nll", _fmt(p["nll"], 4)),
            ("tokens", _fmt(p["tokens_scored"])),
            ("seq_len/stride", f"{p['seq_len']}/{p['stride']}"),
        ]
    if "task" in res:
        t = res["task"]
        cols += [(f"acc ({t['metric']})", f"{t['accuracy']:.3f}"), ("n", _fmt(t["n"]))]
    if "speed" in res:
        s = res["speed"]
        mib = None if s.get("model_bytes") is None else s["model_bytes"] / 2**20
        cols += [
            ("prefill tok/s", _fmt(s["prefill_tokens_per_s"], 1)),
            ("decode tok/s", _fmt(s["decode_tokens_per_s"], 1)),
            ("disk MiB", _fmt(mib, 1)),
        ]
    cols.append(("peak RSS MiB", _fmt(res["memory"]["peak_rss_bytes"] / 2**20, 1)))
    head = "| " + " | ".join(c for c, _ in cols) + " |"
    rule = "|" + "|".join("-" * (len(c) + 2) for c, _ in cols) + "|"
    row = "| " + " | ".join(v for _, v in cols) + " |"
    return "\n".join([head, rule, row])


def cmd_eval(args: argparse.Namespace) -> int:
    from slimlm.checkpoint.atomic import check_output

    if args.json:  # a report is regenerated freely, but never written over what it measures
        ppl = args.ppl if args.ppl not in (None, BUILTIN) else None
        check_output(
            args.json, overwrite=True, inputs=[args.model, args.adapter, args.task, ppl], flag="--json", kind="file"
        )
    res = run_eval(args)
    print(format_table(res))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        tmp.replace(path)  # a kill leaves the old report or the new one, never half of one
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m slimlm.eval.cli ...` (the same flags as `slimlm eval`), for use before the command is wired in.
    Errors as `slimlm eval`: one line for a SlimlmError or a bad path, a traceback for a bug."""
    parser = argparse.ArgumentParser(prog="slimlm eval", description=__doc__.split("\n\n")[0])
    add_eval_args(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_eval(args)
    except USER_ERRORS as e:
        return report_error("eval", e)


if __name__ == "__main__":
    sys.exit(main())
