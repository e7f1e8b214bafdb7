"""`slimlm serve` and `slimlm batch`: flags onto ServeConfig / EngineConfig, then the server or a batch job."""

from __future__ import annotations

import argparse

from slimlm.engine.core import EngineConfig
from slimlm.serve.state import ServeConfig


def add_server_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by `serve` and `batch`: the model, adapters, and the engine's limits."""
    p.add_argument("--model", default="smollm2-135m", help="alias, HF folder, .gguf file or HF hub id")
    p.add_argument("--served-name", default=None, help="the base model's name in the API (default: from --model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--quantize", default="auto", choices=["auto", "none", "int8", "int8-dynamic", "int4"],
                   help="quantize the base model's weights after loading (slimlm.quantize). auto (default): int8 "
                        "weight-only with fp32 activations on a CPU, where the fused decode step reads one byte per "
                        "weight (+0.2%% perplexity on SmolLM2), nothing on a GPU; none: serve the weights as loaded")
    p.add_argument("--group-size", type=int, default=64, help="int4 group size (32, 64 or 128)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"],
                   help="onnxruntime: --model is a folder from `slimlm export onnx`, run by ONNX Runtime")
    p.add_argument("--adapters", nargs="*", default=[], metavar="[NAME=]DIR", help="LoRA adapter folders to serve")
    p.add_argument("--registry", default=None, help="registry root whose adapters are served by name[@version]")
    p.add_argument("--max-batch", type=int, default=0,
                   help="sequences decoded together (KV cache slots); 0 = auto: 16 on a CPU, 64 on a GPU "
                        "(default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond this get 429")
    p.add_argument("--max-seq-len", type=int, default=0,
                   help="prompt + output tokens per request; 0 = auto: the model's context up to 4096, halved "
                        "until the KV cache fits a quarter of free memory (default: %(default)s)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens processed per engine step")
    p.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV of prompt prefixes seen before, e.g. a shared system prompt or chat history "
                        "(automatic prefix caching; hit rate in /metrics)")
    p.add_argument("--prefix-cache-tokens", type=int, default=8192, help="prefix cache size in tokens")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="element type of the KV cache: auto = fp16 for quantized weights with fp32 activations on a "
                        "CPU (the --quantize auto default: half the memory and the bytes each decode step reads, as "
                        "llama.cpp's default; keys and values rounded to fp16), else the model's dtype; fp32 keeps "
                        "them exact")
    p.add_argument("--speculative", default=None, choices=["ngram", "draft"],
                   help="speculative decoding, guesses verified in one forward (greedy output unchanged, sampled "
                        "output keeps its distribution): ngram = prompt lookup (guesses copied from the context; "
                        "helps when outputs repeat the input); draft = a smaller model's greedy guesses "
                        "(needs --draft-model)")
    p.add_argument("--draft-model", default=None, metavar="PATH",
                   help="with --speculative draft: the draft model (alias, HF folder, .gguf or hub id) — smaller, "
                        "with the same tokenizer as --model (e.g. a student from `slimlm distill`); loaded with "
                        "the same --dtype, --device and --quantize")
    p.add_argument("--num-speculative-tokens", type=int, default=4,
                   help="guesses verified per step (ngram and draft)")
    p.add_argument("--draft-vocab", type=int, default=0, metavar="N",
                   help="with --speculative draft: the draft guesses among token ids < N only (its LM head cut to N "
                        "rows; BPE ids are roughly in frequency order), a cheaper draft step; outputs unchanged. "
                        "0 = its whole vocabulary")
    p.add_argument("--max-loras", type=int, default=4, help="LoRA adapters resident at once (LRU); 0 = none")
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask")


def serve_config(args: argparse.Namespace, **extra) -> ServeConfig:
    engine = EngineConfig(max_batch=args.max_batch, max_seq_len=args.max_seq_len, max_queue=args.max_queue,
                          prefill_chunk=args.prefill_chunk, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                          prefix_cache=args.prefix_cache, prefix_cache_tokens=args.prefix_cache_tokens,
                          speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
                          draft_vocab=args.draft_vocab,
                          kv_cache_dtype=args.kv_cache_dtype,
                          request_timeout_s=getattr(args, "request_timeout", 0.0))  # a `serve` flag only
    cfg = ServeConfig(model=args.model, served_name=args.served_name, dtype=args.dtype, device=args.device,
                      quantize=None if args.quantize == "none" else args.quantize, group_size=args.group_size,
                      backend=args.backend, adapters=list(args.adapters), registry=args.registry,
                      max_tokens_limit=args.max_tokens_limit, draft_model=args.draft_model, engine=engine, **extra)
    cfg.validate()
    return cfg


def cmd_serve(args: argparse.Namespace) -> int:
    from slimlm.serve.server import run_server

    cfg = serve_config(args, api_key_file=args.api_key_file, api_keys=api_keys(args),
                       max_body_bytes=args.max_body_bytes,
                       drain_timeout_s=args.drain_timeout, admin_key_file=args.admin_key_file,
                       allow_runtime_lora=args.allow_runtime_lora, lora_roots=list(args.lora_root),
                       models=list(args.models), max_models=args.max_models,
                       memory_budget=parse_size(args.memory_budget, "--memory-budget"),
                       load_timeout_s=args.load_timeout)
    if not 0 <= args.grpc_port <= 65535:
        raise ValueError(f"--grpc-port {args.grpc_port}: send a port in 1..65535, or 0 for no gRPC")
    run_server(cfg, args.host, args.port, args.grpc_port)
    return 0


SIZE_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3, "GB": 1000**3,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TB": 1000**4, "TIB": 2**40}


def parse_size(text: str | None, flag: str) -> int:
    """'3GiB', '800MB', '1.5G', '123456' -> bytes (decimal K/M/G/T, binary KiB/MiB/GiB/TiB); None or '0' -> 0."""
    import re

    if text is None:
        return 0
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if m is None or unit not in SIZE_UNITS:
        raise ValueError(f"{flag} {text!r}: send a size such as 3GiB, 800MB or 1.5G (units B, KB, MB, GB, TB, KiB, "
                         "MiB, GiB, TiB)")
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
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=0, metavar="PORT",
                   help="also serve KServe v2 / Triton gRPC (GRPCInferenceService, for tritonclient.grpc) on this "
                        "port, same engine and keys; tensors text_input -> text_output; 0 = off (default)")
    s.add_argument("--api-key-file", default=None, help="file with one API key per line; /v1/* then needs one")
    s.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="an API key /v1/* (and /tokenize, /detokenize, /version) then need, as "
                        "'Authorization: Bearer KEY'; repeatable; merged with --api-key-file and the SLIMLM_API_KEY "
                        "environment variable (which keeps the key out of `ps`)")
    s.add_argument("--allow-runtime-lora", action="store_true",
                   help="turn on POST /v1/load_lora_adapter and /v1/unload_lora_adapter (off: they answer 404); "
                        "needs --lora-root, and --admin-key-file when API keys are set")
    s.add_argument("--lora-root", action="append", default=[], metavar="DIR",
                   help="with --allow-runtime-lora: runtime adapters load only from under this folder (symlinks "
                        "resolved); repeatable")
    s.add_argument("--admin-key-file", default=None,
                   help="file with one admin key per line: the runtime LoRA routes then need one (inference keys "
                        "get 403 there); admin keys also work on the inference routes")
    s.add_argument("--models", nargs="*", default=[], metavar="NAME=PATH",
                   help="more base models to serve besides --model (alias, HF folder, .gguf file or hub id), each "
                        "named NAME in the API and loaded on its first request; base models pushed to --registry "
                        "are served by name the same way")
    s.add_argument("--max-models", type=int, default=0, metavar="N",
                   help="base models resident at once: loading one more unloads the least recently used idle one "
                        "(never one with a running request); 0 = all stay loaded (default)")
    s.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="bytes of weights + KV caches the resident base models may take, e.g. 3GiB or 800MB: "
                        "loading one more unloads least recently used idle ones until it fits (default: no limit)")
    s.add_argument("--load-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="how long a request waits for its base model to load (or for room to load it) before a "
                        "503 with Retry-After; the load goes on (default: %(default)s)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20)
    s.add_argument("--drain-timeout", type=float, default=30.0, help="seconds running requests get after SIGTERM")
    s.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="a request still unfinished this long after it arrived (queue time included) is aborted "
                        "and its slot freed: 504 (a stream ends with an error event); 0 = no limit "
                        "(default: %(default)s)")
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("batch", help="run an OpenAI batch-format JSONL file through the serving engine, offline")
    add_server_args(b)
    b.add_argument("input", help="JSONL: {custom_id, method: POST, url: /v1/chat/completions, body: {...}} per line")
    b.add_argument("output", help="JSONL of results, one per input line, in OpenAI's batch output format")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT file (never the INPUT)")
    b.set_defaults(func=cmd_batch)
