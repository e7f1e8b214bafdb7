"""The `slimlm` command line: generate, chat, info, finetune, merge, data, serve, batch, registry, bench, eval,
quantize, prune, distill, compress, fuse, export, estimate, deploy.
Thin: parses flags, calls the API, prints.

Errors a user can fix (slimlm.errors.SlimlmError, and a missing or unreadable path) print one line on stderr and exit
with status 2 for bad input (flags, configs, recipes, data files, checkpoints) or 1 for a runtime failure (a port in
use); Ctrl-C exits 130. Any other exception is a bug and shows its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from slimlm.checkpoint.atomic import OVERWRITE_HELP, atomic_folder, check_output
from slimlm.errors import USER_ERRORS, InputError, report_error
from slimlm.load_config import MODEL_ONLY_SKIP, SAVE_SKIP, LoadConfig, SaveLoadConfig
from slimlm.recipe import add_command_flags, config_from_flags
from slimlm.version import installed_version


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """The load flags (--model, --dtype, --device, --compile, --adapter, --quantize, --group-size, --backend)."""
    add_command_flags(p, LoadConfig)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling(args: argparse.Namespace, **extra):
    from slimlm.engine.sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=list(args.stop),
        **extra,
    )


def _load(args: argparse.Namespace):
    import dataclasses

    from slimlm.llm import load

    return load(**dataclasses.asdict(config_from_flags(LoadConfig, args)))


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise InputError("empty prompt: pass --prompt TEXT or pipe text on stdin")
    params = _sampling(args, ignore_eos=args.ignore_eos)  # validate flags before the slow load
    t0 = time.perf_counter()
    llm = _load(args)
    load_s = time.perf_counter() - t0
    chat = None if args.chat is None else args.chat
    if args.json:
        c = llm.complete([prompt], params, chat=chat)[0]
        out = {
            "model": args.model,
            "text": c.text,
            "finish_reason": c.finish_reason,
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "load_s": round(load_s, 3),
            "prefill_s": round(c.prefill_s, 4),
            "decode_s": round(c.decode_s, 4),
            "prefill_tokens_per_s": round(c.prefill_tokens_per_s, 2),
            "decode_tokens_per_s": round(c.decode_tokens_per_s, 2),
            "dtype": str(llm.model.dtype).removeprefix("torch."),
            "device": str(llm.model.device),
            "compiled": args.compile,
        }
        print(json.dumps(out, ensure_ascii=False))
        return 0
    for _, piece, done in llm.stream_batch([prompt], params, chat=chat):
        print(piece, end="", flush=True)
        if done is not None:
            print()
            if args.verbose:
                print(
                    f"[{done.prompt_tokens} prompt tokens, {done.completion_tokens} generated, "
                    f"prefill {done.prefill_tokens_per_s:.0f} tok/s, decode {done.decode_tokens_per_s:.1f} tok/s, "
                    f"{done.finish_reason}]",
                    file=sys.stderr,
                )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _load(args)
    params = _sampling(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(f"slimlm chat with {args.model} — /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        for piece in llm.stream(messages, params):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_info(args: argparse.Namespace) -> int:
    from pathlib import Path

    from slimlm.checkpoint import model_folder
    from slimlm.checkpoint.hf import read_hf_config

    if (Path(args.model) / "adapter_config.json").is_file():
        return _adapter_info(Path(args.model), args.json)
    folder = model_folder(args.model)
    config = read_hf_config(folder)
    n = config.num_params()
    bytes_per = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "int4": 0.5}
    info = {
        "model": args.model,
        "path": str(folder),
        "config": config.to_dict(),
        "parameters": n,
        "weights_bytes": {k: int(n * b) for k, b in bytes_per.items()},
        "kv_cache_bytes_per_token": {
            "fp32": config.kv_cache_bytes_per_token(4),
            "bf16": config.kv_cache_bytes_per_token(2),
        },
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model       {args.model}\npath        {folder}")
    print(f"parameters  {n:,} ({n / 1e6:.1f} M)")
    for k, v in config.to_dict().items():
        print(f"  {k:<20} {v}")
    print("weights     " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in info["weights_bytes"].items()))
    kv = info["kv_cache_bytes_per_token"]
    print(f"kv cache    {kv['bf16']:,} bytes/token in bf16, {kv['fp32']:,} in fp32")
    return 0


def _adapter_info(folder, as_json: bool) -> int:
    from slimlm.peft import read_adapter_config
    from slimlm.peft.common import read_adapter_files
    from slimlm.recipe import to_dict

    method, cfg, raw = read_adapter_config(folder)
    _, tensors = read_adapter_files(folder)
    n = sum(t.numel() for t in tensors.values())
    notes = {
        "bitfit": "BitFit adds zero-initialised biases to the listed Llama projections (which have none) and "
        "trains only those (and RMSNorm gains if train_norms); merging gives a model with biases.",
        "adapter": "bottleneck adapters are not linear in the base weights: they cannot be merged.",
        "prefix": "prefixes are extra keys/values, not weights: they cannot be merged.",
        "prompt": "soft prompts are extra input embeddings, not weights: they cannot be merged.",
    }
    info = {
        "adapter": str(folder),
        "method": method,
        "peft_type": raw.get("peft_type"),
        "base_model": raw.get("base_model_name_or_path"),
        "config": to_dict(cfg),
        "parameters": n,
        "tensors": len(tensors),
        "note": notes.get(method, ""),
    }
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        if v not in ("", None):
            print(f"{k:<11} {v:,}" if isinstance(v, int) else f"{k:<11} {v}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from slimlm.peft.merge import merge_to_folder

    check_output(args.out, overwrite=args.overwrite, inputs=[args.model, args.adapter])
    report = merge_to_folder(args.model, args.adapter, args.out, dtype=args.dtype)
    print(json.dumps(report, indent=2))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from slimlm.checkpoint import model_folder
    from slimlm.tokenizer import Tokenizer
    from slimlm.train.data import DataConfig, check_file

    cfg = DataConfig(max_seq_len=args.max_seq_len, train_on_prompt=args.train_on_prompt, format=args.format)
    cfg.validate()
    tokenizer = Tokenizer.from_pretrained(model_folder(args.model))
    print(check_file(args.file, tokenizer, cfg))
    return 0


def cmd_data_task(args: argparse.Namespace) -> int:
    from slimlm.tasks import TASKS

    if args.task not in TASKS:
        raise InputError(f"unknown task {args.task!r}; bundled tasks: {', '.join(TASKS)}")
    out = check_output(args.out, overwrite=args.overwrite)
    with atomic_folder(out) as tmp:  # like every output folder: replaced whole, never half-written
        paths = TASKS[args.task].write_splits(tmp, n_train=args.train, n_val=args.val, n_test=args.test, seed=args.seed)
    for split, path in paths.items():
        print(f"{split:<6} {out / path.name}")
    return 0


def _add_merge_and_data_parsers(sub) -> None:

    m = sub.add_parser("merge", help="fold a LoRA/DoRA/QLoRA or BitFit adapter into the base; save an HF folder")
    # --model (the base the adapter was trained on), --adapter, --dtype (of the saved weights)
    add_command_flags(m, SaveLoadConfig, skip=tuple(n for n in SAVE_SKIP if n != "adapter"), required=("adapter",))
    m.add_argument("--out", required=True, help="folder for the merged model")
    m.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    m.set_defaults(func=cmd_merge)

    d = sub.add_parser("data", help="check training data; write a bundled task's splits")
    dsub = d.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("check", help="validate a JSONL file and show a rendered sample with the trained tokens marked")
    c.add_argument("file")
    add_command_flags(c, LoadConfig, skip=MODEL_ONLY_SKIP)  # --model: whose tokenizer and chat template to use
    c.add_argument("--max-seq-len", type=int, default=1024)
    c.add_argument("--train-on-prompt", action="store_true")
    c.add_argument("--format", default="auto", help="auto, chat, alpaca, prompt_completion or text")
    c.set_defaults(func=cmd_data_check)
    t = dsub.add_parser("task", help="write train/val/test JSONL of a bundled task (e.g. extract_json)")
    t.add_argument("task")
    t.add_argument("--out", required=True)
    t.add_argument("--train", type=int, default=2000)
    t.add_argument("--val", type=int, default=100)
    t.add_argument("--test", type=int, default=200)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    t.set_defaults(func=cmd_data_task)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimlm", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--version", action="version", version=f"slimlm {installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt")
    _add_model_args(g)
    _add_sampling_args(g)
    g.add_argument("--prompt", help="prompt text (default: read stdin)")
    g.add_argument(
        "--chat",
        dest="chat",
        action="store_true",
        default=None,
        help="wrap the prompt in the chat template (default when the tokenizer has one)",
    )
    g.add_argument("--raw", dest="chat", action="store_false", help="plain text continuation, no chat template")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past stop tokens (benchmarks)")
    g.add_argument("--json", action="store_true", help="print text, token counts and timings as JSON")
    g.add_argument("-v", "--verbose", action="store_true", help="print token counts and speed on stderr")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with streaming replies")
    _add_model_args(c)
    _add_sampling_args(c)
    c.add_argument("--system", default=None, help="system prompt")
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser(
        "info",
        help="config, parameter count and memory per dtype (weights are not loaded); or what an adapter folder holds",
    )
    add_command_flags(i, LoadConfig, skip=MODEL_ONLY_SKIP)  # --model: also an adapter folder (what it holds)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
    from slimlm.compress.cli import add_compress_commands
    from slimlm.deploy.cli import add_deploy_commands
    from slimlm.eval.cli import add_eval_commands
    from slimlm.export.cli import add_export_commands
    from slimlm.fuse.cli import add_fuse_commands
    from slimlm.memory.cli import add_estimate_commands
    from slimlm.merge.cli import add_merge_models_commands
    from slimlm.prune.cli import add_prune_commands
    from slimlm.quantize.cli import add_quantize_commands
    from slimlm.serve.bench import add_bench_commands
    from slimlm.serve.cli import add_registry_commands, add_serve_commands
    from slimlm.train.cli import add_distill_commands, add_finetune_commands

    add_finetune_commands(sub)
    _add_merge_and_data_parsers(sub)

    add_serve_commands(sub)
    add_registry_commands(sub)
    add_bench_commands(sub)
    add_eval_commands(sub)
    add_quantize_commands(sub)
    add_prune_commands(sub)
    add_distill_commands(sub)
    add_compress_commands(sub)
    add_fuse_commands(sub)
    add_merge_models_commands(sub)
    add_export_commands(sub)
    add_estimate_commands(sub)
    add_deploy_commands(sub)
    return parser


def _innermost_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub-)sub-command parser that `args` came through, e.g. `slimlm export onnx`'s."""
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return _innermost_parser(action.choices[getattr(args, action.dest)], args)
    return parser


def _unknown_flags_error(parser: argparse.ArgumentParser, extras: list[str]) -> None:
    """Exit 2 with the sub-command's own usage, the unknown flags and the closest known ones."""
    import difflib

    known = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    hints = []
    for flag in (e.split("=")[0] for e in extras if e.startswith("--")):
        tail = flag[2:].replace("-", "_")  # --lr -> --train.lr; --max-steps -> --train.max_steps
        hints += [o for o in known if o.endswith(f".{tail}")] or difflib.get_close_matches(flag, known, n=2)
    hint = f" (did you mean {', '.join(dict.fromkeys(hints))}?)" if hints else ""
    parser.error(f"unrecognized arguments: {' '.join(extras)}{hint}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed: `--nproc` re-runs it under torchrun
    if extras:  # parse_args would print the top-level usage; the user needs the sub-command's
        _unknown_flags_error(_innermost_parser(parser, args), extras)
    try:
        return args.func(args)
    # User-fixable (bad paths, flags, configs and files: 2; a runtime failure such as a busy port: 1): one line.
    # The loaders wrap third-party errors (safetensors, gguf, json, UTF-8) into InputError with the file's path.
    # Anything else (a plain ValueError, TypeError, ...) is a bug: it propagates with its traceback.
    except USER_ERRORS as e:
        return report_error(args.command, e)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
