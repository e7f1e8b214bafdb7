"""`slimlm quantize`: load a model, quantize its weights, save the packed folder (reloads without re-quantizing)."""

from __future__ import annotations

import argparse
import time

from slimlm.checkpoint.atomic import OVERWRITE_HELP, check_output
from slimlm.eval.corpus import add_calibration_args
from slimlm.quantize.compressed_tensors import FORMATS, check_ct_format, default_format
from slimlm.quantize.model import SCHEMES
from slimlm.quantize.recipe import METHODS, QuantizeRecipe
from slimlm.quantize.static import OBSERVERS

QUANTIZE_DESCRIPTION = (
    "Quantize a model and save it as a folder that slimlm reads back without re-quantizing: slimlm.load(), "
    "`slimlm generate/chat/serve/eval --model FOLDER`, `slimlm export onnx` (int8/int4 stay low-bit). "
    "--format compressed-tensors (the default for int8, int8-dynamic and int8-static) writes the layout of "
    "llm-compressor, which transformers (AutoModelForCausalLM, with compressed-tensors installed) and vLLM load as "
    "quantized. --format slimlm (the default for int4, rtn/gptq/qat: compressed-tensors cannot hold its float zero "
    "points) writes slimlm's packed layout, which transformers, vLLM and llama.cpp's convert_hf_to_gguf.py refuse "
    "with an error rather than load random weights; for those, give them the unquantized model or use "
    "`slimlm export` for ONNX / TorchScript / TFLite.")


def add_quantize_commands(sub) -> None:
    """Register `quantize` on the CLI's subparsers `sub`."""
    q = sub.add_parser("quantize", help="quantize a model's weights (int8, int8-dynamic, int8-static, int4) and save it packed",
                       description=QUANTIZE_DESCRIPTION)
    q.add_argument("--model", default="smollm2-135m", help="alias, HF folder, .gguf file or HF hub id")
    q.add_argument("--scheme", required=True, choices=SCHEMES,
                   help="int8: weight-only per channel; int8-dynamic: + activations per token; int8-static: + one "
                        "calibrated activation scale per layer; int4: grouped")
    q.add_argument("--group-size", type=int, default=64, help="int4 group size: 32, 64 or 128")
    q.add_argument("--method", default="rtn", choices=METHODS,
                   help="rtn = round to nearest; gptq (int4) = data-aware, uses calibration text; qat (int4, int8) = "
                        "train through the rounding on calibration text, then convert")
    q.add_argument("--qat-steps", type=int, default=100, help="qat: optimizer steps (batch --qat-batch)")
    q.add_argument("--qat-lr", type=float, default=1e-5, help="qat: peak learning rate (warmup, cosine)")
    q.add_argument("--qat-batch", type=int, default=4, help="qat: calibration windows per step")
    q.add_argument("--qat-loss", default="kd", choices=["kd", "ce"],
                   help="qat: kd = KL to the full-precision model (self-distillation); ce = next-token loss")
    q.add_argument("--smooth", type=float, default=None, metavar="ALPHA",
                   help="SmoothQuant before quantizing (int8-dynamic/static; 0.5 is the paper's alpha); uses calibration text")
    q.add_argument("--observer", default="minmax", choices=OBSERVERS,
                   help="int8-static: activation range from the max |x| (minmax) or a percentile of |x|")
    q.add_argument("--percentile", type=float, default=99.99,
                   help="int8-static: the percentile of --observer percentile and of --dynamic-above")
    q.add_argument("--dynamic-above", type=float, default=4.0,
                   help="int8-static: layers whose max |x| exceeds this times the percentile run per-token dynamic "
                        "(0: none)")
    add_calibration_args(q, "gptq, int8-static and --smooth (qat: its training text)")
    q.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of what stays unquantized (norms)")
    q.add_argument("--format", default=None, choices=FORMATS,
                   help="compressed-tensors: read as quantized by transformers and vLLM (int8 schemes; their "
                        "default); slimlm: slimlm's packed layout (every scheme; the default for int4)")
    q.add_argument("--out", required=True, help="output folder (written atomically)")
    q.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    q.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    from slimlm.checkpoint import model_folder
    from slimlm.llm import load
    from slimlm.quantize.model import describe_quantization, quantized_bytes, save_quantized
    from slimlm.quantize.recipe import quantize_by_recipe_

    recipe = QuantizeRecipe(**{f: getattr(args, f) for f in QuantizeRecipe.__dataclass_fields__})
    recipe.dynamic_above = recipe.dynamic_above or None  # 0 on the command line: every layer static
    recipe.validate()  # before the slow load
    fmt = args.format or default_format(recipe.scheme)
    check_ct_format(recipe.scheme, fmt)
    check_output(args.out, overwrite=args.overwrite, inputs=[args.model, args.calib_file])
    t0 = time.perf_counter()
    llm = load(args.model, dtype=args.dtype)
    dense = quantized_bytes(llm.model)
    info = quantize_by_recipe_(llm.model, llm.tokenizer, recipe)
    if "smoothing" in info:
        print(f"smoothed {info['smoothing']['groups']} input groups (largest channel max / median before: "
              f"{info['smoothing']['max_outlier_ratio_before']:.0f}x)")
    if "qat" in info:
        print(f"QAT: {info['qat']['steps']} steps, final loss {info['qat']['final_loss']:.4f}, "
              f"{info['qat']['tokens_per_s']:.0f} tokens/s")
    if "static" in info:
        pct = f" {recipe.percentile}" if recipe.observer == "percentile" else ""
        n_dyn = len(info["static"]["dynamic_layers"])
        print(f"calibrated {info['static']['layers'] - n_dyn} activation scales ({recipe.observer}{pct}); "
              f"{n_dyn} layers per-token dynamic (max |x| > {recipe.dynamic_above} x p{recipe.percentile})")
    folder = save_quantized(llm.model, args.out, llm.tokenizer, format=fmt)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    method = f", {args.method}" if args.scheme == "int4" or args.method != "rtn" else ""
    what = f"{describe_quantization(llm.model.quantization)}{method}"
    print(f"{model_folder(args.model).name} -> {folder} ({what}) as {fmt}: "
          f"weights {dense / 2**20:,.1f} MiB in {args.dtype} -> {quantized_bytes(llm.model) / 2**20:,.1f} MiB, "
          f"model.safetensors {size / 2**20:,.1f} MiB, {time.perf_counter() - t0:.1f} s")
    return 0
