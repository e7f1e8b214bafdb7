"""`slimlm quantize`: load a model, quantize its weights, save the packed folder (reloads without re-quantizing)."""

from __future__ import annotations

import argparse
import time

from slimlm.checkpoint.atomic import OVERWRITE_HELP, check_output
from slimlm.compress.quantize_workflow import QuantizeConfig
from slimlm.load_config import SAVE_SKIP, SaveLoadConfig
from slimlm.quantize.compressed_tensors import FORMATS, check_ct_format, default_format
from slimlm.recipe import add_command_flags, config_from_flags

QUANTIZE_DESCRIPTION = (
    "Quantize a model and save it as a folder that slimlm reads back without re-quantizing: slimlm.load(), "
    "`slimlm generate/chat/serve/eval --model FOLDER`, `slimlm export onnx` (int8/int4 stay low-bit). "
    "--format compressed-tensors (the default for int8, int8-dynamic and int8-static) writes the layout of "
    "llm-compressor, which transformers (AutoModelForCausalLM, with compressed-tensors installed) and vLLM load as "
    "quantized. --format slimlm (the default for int4, rtn/gptq/qat: compressed-tensors cannot hold its float zero "
    "points) writes slimlm's packed layout, which transformers, vLLM and llama.cpp's convert_hf_to_gguf.py refuse "
    "with an error rather than load random weights; for those, give them the unquantized model or use "
    "`slimlm export` for ONNX / TorchScript / TFLite."
)


def add_quantize_commands(sub) -> None:
    """Register `quantize` on the CLI's subparsers `sub`."""
    q = sub.add_parser(
        "quantize",
        help="quantize a model's weights (int8, int8-dynamic, int8-static, int4) and save it packed",
        description=QUANTIZE_DESCRIPTION,
    )
    add_command_flags(q, SaveLoadConfig, skip=SAVE_SKIP)  # --model, --dtype (fp32: of what stays unquantized)
    add_command_flags(q, QuantizeConfig, required=("scheme",))
    q.add_argument(
        "--format",
        default=None,
        choices=FORMATS,
        help="compressed-tensors: read as quantized by transformers and vLLM (int8 schemes; their "
        "default); slimlm: slimlm's packed layout (every scheme; the default for int4)",
    )
    q.add_argument("--out", required=True, help="output folder (written atomically)")
    q.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    q.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    from slimlm.checkpoint import model_folder
    from slimlm.checkpoint.quantized import save_quantized
    from slimlm.compress.quantize_workflow import quantize_by_recipe_
    from slimlm.llm import load
    from slimlm.quantize.schemes import describe_quantization, quantized_bytes

    # --dynamic-above 0 on the command line: every layer static
    recipe = config_from_flags(QuantizeConfig, args, dynamic_above=args.dynamic_above or None)
    recipe.validate()  # before the slow load
    fmt = args.format or default_format(recipe.scheme)
    check_ct_format(recipe.scheme, fmt)
    check_output(args.out, overwrite=args.overwrite, inputs=[args.model, args.calib_file])
    t0 = time.perf_counter()
    llm = load(args.model, dtype=args.dtype)
    dense = quantized_bytes(llm.model)
    info = quantize_by_recipe_(llm.model, llm.tokenizer, recipe)
    if "smoothing" in info:
        print(
            f"smoothed {info['smoothing']['groups']} input groups (largest channel max / median before: "
            f"{info['smoothing']['max_outlier_ratio_before']:.0f}x)"
        )
    if "qat" in info:
        print(
            f"QAT: {info['qat']['steps']} steps, final loss {info['qat']['final_loss']:.4f}, "
            f"{info['qat']['tokens_per_s']:.0f} tokens/s"
        )
    if "static" in info:
        pct = f" {recipe.percentile}" if recipe.observer == "percentile" else ""
        n_dyn = len(info["static"]["dynamic_layers"])
        print(
            f"calibrated {info['static']['layers'] - n_dyn} activation scales ({recipe.observer}{pct}); "
            f"{n_dyn} layers per-token dynamic (max |x| > {recipe.dynamic_above} x p{recipe.percentile})"
        )
    folder = save_quantized(llm.model, args.out, llm.tokenizer, format=fmt)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    method = f", {args.method}" if args.scheme == "int4" or args.method != "rtn" else ""
    what = f"{describe_quantization(llm.model.quantization)}{method}"
    print(
        f"{model_folder(args.model).name} -> {folder} ({what}) as {fmt}: "
        f"weights {dense / 2**20:,.1f} MiB in {args.dtype} -> {quantized_bytes(llm.model) / 2**20:,.1f} MiB, "
        f"model.safetensors {size / 2**20:,.1f} MiB, {time.perf_counter() - t0:.1f} s"
    )
    return 0
