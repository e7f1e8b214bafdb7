"""`slimlm quantize`: load a model, quantize its weights, save the packed folder (reloads without re-quantizing)."""

from __future__ import annotations

import argparse
import time

from slimlm.quantize.model import SCHEMES


def add_quantize_commands(sub) -> None:
    """Register `quantize` on the CLI's subparsers `sub`."""
    q = sub.add_parser("quantize", help="quantize a model's weights (int8, int8-dynamic, int4) and save it packed")
    q.add_argument("--model", default="smollm2-135m", help="alias, HF folder, .gguf file or HF hub id")
    q.add_argument("--scheme", required=True, choices=SCHEMES,
                   help="int8: weight-only per channel; int8-dynamic: + activations per token; int4: grouped RTN")
    q.add_argument("--group-size", type=int, default=64, help="int4 group size: 32, 64 or 128")
    q.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of what stays unquantized (norms)")
    q.add_argument("--out", required=True, help="output folder (written atomically)")
    q.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    from slimlm.checkpoint import model_folder
    from slimlm.llm import load
    from slimlm.quantize.model import (check_scheme, describe_quantization, quantize_model_, quantized_bytes,
                                       save_quantized)

    check_scheme(args.scheme, args.group_size)  # before the slow load
    t0 = time.perf_counter()
    llm = load(args.model, dtype=args.dtype)
    dense = quantized_bytes(llm.model)
    quantize_model_(llm.model, args.scheme, args.group_size)
    folder = save_quantized(llm.model, args.out, llm.tokenizer)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    print(f"{model_folder(args.model).name} -> {folder} ({describe_quantization(llm.model.quantization)}): "
          f"weights {dense / 2**20:,.1f} MiB in {args.dtype} -> {quantized_bytes(llm.model) / 2**20:,.1f} MiB, "
          f"model.safetensors {size / 2**20:,.1f} MiB, {time.perf_counter() - t0:.1f} s")
    return 0
