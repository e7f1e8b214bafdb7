"""`slimlm quantize`: load a model, quantize its weights, save the packed folder (reloads without re-quantizing)."""

from __future__ import annotations

import argparse
import time

from slimlm.eval.corpus import calibration_ids
from slimlm.quantize.model import SCHEMES


def add_quantize_commands(sub) -> None:
    """Register `quantize` on the CLI's subparsers `sub`."""
    q = sub.add_parser("quantize", help="quantize a model's weights (int8, int8-dynamic, int4) and save it packed")
    q.add_argument("--model", default="smollm2-135m", help="alias, HF folder, .gguf file or HF hub id")
    q.add_argument("--scheme", required=True, choices=SCHEMES,
                   help="int8: weight-only per channel; int8-dynamic: + activations per token; int4: grouped RTN")
    q.add_argument("--group-size", type=int, default=64, help="int4 group size: 32, 64 or 128")
    q.add_argument("--method", default="rtn", choices=["rtn", "gptq"],
                   help="int4 only: rtn = round to nearest; gptq = data-aware, uses calibration text")
    q.add_argument("--smooth", type=float, default=None, metavar="ALPHA",
                   help="SmoothQuant before quantizing (int8-dynamic; 0.5 is the paper's alpha); uses calibration text")
    q.add_argument("--calib-file", default=None,
                   help="calibration text for gptq/--smooth (default: the built-in corpus's calibration split)")
    q.add_argument("--calib-samples", type=int, default=32, help="gptq/--smooth: calibration sequences")
    q.add_argument("--calib-seq-len", type=int, default=512, help="gptq/--smooth: tokens per calibration sequence")
    q.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of what stays unquantized (norms)")
    q.add_argument("--out", required=True, help="output folder (written atomically)")
    q.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    from slimlm.checkpoint import model_folder
    from slimlm.llm import load
    from slimlm.quantize.model import (check_scheme, describe_quantization, quantize_model_, quantized_bytes,
                                       save_quantized)

    check_scheme(args.scheme, args.group_size)  # before the slow load
    if args.method == "gptq" and args.scheme != "int4":
        raise ValueError("--method gptq is for --scheme int4")
    t0 = time.perf_counter()
    llm = load(args.model, dtype=args.dtype)
    dense = quantized_bytes(llm.model)
    calib = None
    if args.smooth is not None or args.method == "gptq":
        calib = calibration_ids(llm.tokenizer, args.calib_file, args.calib_samples, args.calib_seq_len)
    if args.smooth is not None:
        from slimlm.quantize.smooth import smooth_model_

        info = smooth_model_(llm.model, calib, args.smooth)
        print(f"smoothed {info['groups']} input groups (largest channel max / median before: "
              f"{info['max_outlier_ratio_before']:.0f}x)")
    if args.method == "gptq":
        from slimlm.quantize.gptq import gptq_quantize_model_

        gptq_quantize_model_(llm.model, calib, args.group_size)
    else:
        quantize_model_(llm.model, args.scheme, args.group_size)
    folder = save_quantized(llm.model, args.out, llm.tokenizer)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    method = f", {args.method}" if args.scheme == "int4" else ""
    print(f"{model_folder(args.model).name} -> {folder} ({describe_quantization(llm.model.quantization)}{method}): "
          f"weights {dense / 2**20:,.1f} MiB in {args.dtype} -> {quantized_bytes(llm.model) / 2**20:,.1f} MiB, "
          f"model.safetensors {size / 2**20:,.1f} MiB, {time.perf_counter() - t0:.1f} s")
    return 0
