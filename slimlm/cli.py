"""The `slimlm` command line: generate, chat, info. Thin: parses flags, calls the Python API, prints.

Errors a user can fix (bad paths, bad flags, bad configs) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from slimlm.checkpoint import CheckpointError
from slimlm.config import ConfigError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="alias (smollm2-135m), HF model folder, .gguf file or HF hub id (default: smollm2-135m)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights and compute dtype; auto = bf16 where the hardware runs it natively, else fp32")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (first call compiles for a minute or more; then faster)")


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
    from slimlm.generate import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=list(args.stop), **extra)


def _load(args: argparse.Namespace):
    from slimlm.llm import load

    return load(args.model, dtype=args.dtype, device=args.device, compile=args.compile)


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise ValueError("empty prompt: pass --prompt TEXT or pipe text on stdin")
    params = _sampling(args, ignore_eos=args.ignore_eos)  # validate flags before the slow load
    t0 = time.perf_counter()
    llm = _load(args)
    load_s = time.perf_counter() - t0
    chat = None if args.chat is None else args.chat
    if args.json:
        c = llm.complete([prompt], params, chat=chat)[0]
        out = {"model": args.model, "text": c.text, "finish_reason": c.finish_reason,
               "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
               "load_s": round(load_s, 3), "prefill_s": round(c.prefill_s, 4), "decode_s": round(c.decode_s, 4),
               "prefill_tokens_per_s": round(c.prefill_tokens_per_s, 2),
               "decode_tokens_per_s": round(c.decode_tokens_per_s, 2),
               "dtype": str(llm.model.dtype).removeprefix("torch."), "device": str(llm.model.device),
               "compiled": args.compile}
        print(json.dumps(out, ensure_ascii=False))
        return 0
    for _, piece, done in llm.stream_batch([prompt], params, chat=chat):
        print(piece, end="", flush=True)
        if done is not None:
            print()
            if args.verbose:
                print(f"[{done.prompt_tokens} prompt tokens, {done.completion_tokens} generated, "
                      f"prefill {done.prefill_tokens_per_s:.0f} tok/s, decode {done.decode_tokens_per_s:.1f} tok/s, "
                      f"{done.finish_reason}]", file=sys.stderr)
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
    from slimlm.checkpoint import model_folder
    from slimlm.checkpoint.hf import read_hf_config

    folder = model_folder(args.model)
    config = read_hf_config(folder)
    n = config.num_params()
    bytes_per = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "int4": 0.5}
    info = {
        "model": args.model, "path": str(folder), "config": config.to_dict(), "parameters": n,
        "weights_bytes": {k: int(n * b) for k, b in bytes_per.items()},
        "kv_cache_bytes_per_token": {"fp32": config.kv_cache_bytes_per_token(4),
                                     "bf16": config.kv_cache_bytes_per_token(2)},
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt")
    _add_model_args(g)
    _add_sampling_args(g)
    g.add_argument("--prompt", help="prompt text (default: read stdin)")
    g.add_argument("--chat", dest="chat", action="store_true", default=None,
                   help="wrap the prompt in the chat template (default when the tokenizer has one)")
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

    i = sub.add_parser("info", help="config, parameter count and memory per dtype (weights are not loaded)")
    i.add_argument("--model", default="smollm2-135m", help="alias, HF folder, .gguf file or HF hub id")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"slimlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
