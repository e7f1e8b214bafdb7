"""`slimlm export onnx|torchscript|tflite|tensorrt|gguf|gguf-lora`: write a model in a format other runtimes load."""

from __future__ import annotations

import argparse
import json

from slimlm.checkpoint.atomic import OVERWRITE_HELP, check_output
from slimlm.errors import InputError
from slimlm.load_config import EXPORT_SKIP, GGUF_SKIP, LoadConfig
from slimlm.recipe import add_command_flags


def add_export_commands(sub) -> None:
    """Register `export` and its formats on the CLI's subparsers `sub`."""
    e = sub.add_parser("export", help="export a model: onnx (+ onnxruntime), torchscript, tflite, tensorrt, gguf")
    fmt = e.add_subparsers(dest="format", required=True)
    for name, help_ in (
        ("onnx", "ONNX decoder graph with KV-cache inputs/outputs (int8/int4 stay low-bit)"),
        ("torchscript", "traced TorchScript decoder (.pt) that runs without slimlm"),
        ("tflite", "LiteRT/TFLite model with prefill and decode signatures (needs litert-torch)"),
    ):
        p = fmt.add_parser(name, help=help_)
        # --model, --adapter (merged before export), --quantize (or a folder from slimlm quantize), --group-size
        add_command_flags(p, LoadConfig, skip=EXPORT_SKIP)
        p.add_argument("--out", required=True, help="output folder (written atomically)")
        p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
        p.add_argument("--no-check", action="store_true", help="skip the parity check after export")
        if name == "onnx":
            p.add_argument(
                "--exact",
                action="store_true",
                help="quantized models: fp32 arithmetic on the stored codes in ONNX Runtime (exact, slow "
                "on CPU) instead of its int8-compute kernels (fast, activations quantized per block)",
            )
        p.add_argument("--json", action="store_true", help="print the export metadata as JSON")
        if name == "tflite":
            p.add_argument("--prefill-len", type=int, default=64, help="fixed prompt length of the prefill signature")
            p.add_argument("--max-len", type=int, default=512, help="static KV cache length")
        p.set_defaults(func=cmd_export)
    t = fmt.add_parser("tensorrt", help="build a TensorRT engine from an ONNX export (needs CUDA + tensorrt)")
    t.add_argument("--onnx", required=True, help="folder written by `slimlm export onnx` (unquantized)")
    t.add_argument("--out", required=True)
    t.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    t.add_argument("--max-batch", type=int, default=8)
    t.add_argument("--max-len", type=int, default=2048)
    t.add_argument("--fp32", action="store_true", help="no fp16 kernels")
    t.set_defaults(func=cmd_tensorrt)
    add_gguf_commands(fmt)


def add_gguf_commands(fmt) -> None:
    """`export gguf` (a llama.cpp/Ollama model file) and `export gguf-lora` (a llama.cpp LoRA adapter file)."""
    from slimlm.export.gguf import GGUF_TYPES

    g = fmt.add_parser("gguf", help="GGUF file for llama.cpp / Ollama (f32, f16, bf16, q8_0, q4_0, ...)")
    # --model (a slimlm-quantized folder is dequantized and requantized), --adapter (merged into the weights)
    add_command_flags(g, LoadConfig, skip=GGUF_SKIP)
    g.add_argument(
        "--type",
        default="f16",
        help=f"tensor type: {', '.join(GGUF_TYPES)}; norms stay f32, q4/q5 "
        "keep the token embedding at q8_0 (K-quants such as q4_k are refused: the gguf package cannot write them; "
        "run llama.cpp's llama-quantize on an f16 export)",
    )
    g.add_argument(
        "--tokenizer-pre",
        default=None,
        help="llama.cpp pre-tokenizer name (tokenizer.ggml.pre); default: "
        "carried over from a .gguf --model, else detected from the tokenizer as llama.cpp's converter does",
    )
    g.add_argument("--out", required=True, help="output .gguf file (written atomically)")
    g.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    g.add_argument("--json", action="store_true", help="print the export metadata as JSON")
    g.set_defaults(func=cmd_gguf)
    lo = fmt.add_parser("gguf-lora", help="LoRA adapter as a llama.cpp LoRA GGUF (use with the base model's GGUF)")
    # --model: the adapter's base model (checks that it fits); --adapter: slimlm's or HF PEFT's LoRA folder
    add_command_flags(lo, LoadConfig, skip=GGUF_SKIP, required=("adapter",))
    lo.add_argument("--type", default="f32", choices=["f32", "f16"], help="tensor type of lora_a / lora_b")
    lo.add_argument("--out", required=True, help="output .gguf file (written atomically)")
    lo.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    lo.add_argument("--json", action="store_true", help="print the export metadata as JSON")
    lo.set_defaults(func=cmd_gguf_lora)


def cmd_export(args: argparse.Namespace) -> int:
    from slimlm.llm import load

    check_output(args.out, overwrite=args.overwrite, inputs=[args.model, args.adapter])
    if args.format == "onnx":
        from slimlm.export.onnx import export_onnx as export
        from slimlm.export.onnx import require_onnx

        require_onnx()  # before the slow load
    elif args.format == "torchscript":
        from slimlm.export.torchscript import export_torchscript as export
    else:
        from slimlm.export.tflite import export_tflite, require_litert

        require_litert()
        if args.quantize:
            raise InputError("--quantize does not apply to tflite (LiteRT quantizes with its own tools)")

        def export(model, tokenizer, out, check):
            return export_tflite(model, tokenizer, out, args.prefill_len, args.max_len, check)

    llm = load(args.model, dtype="fp32", quantize=args.quantize, group_size=args.group_size)
    if args.adapter:
        from slimlm.peft import merge_adapter

        llm.load_adapter(args.adapter)
        merge_adapter(llm.model)
    extra = {"int8_compute": not args.exact} if args.format == "onnx" else {}
    meta = export(llm.model, llm.tokenizer, args.out, check=not args.no_check, **extra)
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    size = meta.get("onnx_bytes") or meta.get("tflite_bytes")
    print(
        f"wrote {args.out} ({args.format}{', ' + format(size / 2**20, '.1f') + ' MiB' if size else ''}, "
        f"{meta.get('export_s', 0):.0f} s)"
    )
    if meta.get("swapped_layers"):
        print("quantized layers kept low-bit: " + ", ".join(f"{n} {k}" for k, n in meta["swapped_layers"].items()))
    for k, v in (meta.get("parity") or {}).items():
        print(f"parity {k}: {v:.2e}")
    return 0


def cmd_tensorrt(args: argparse.Namespace) -> int:
    from slimlm.export.tensorrt import build_tensorrt_engine

    check_output(args.out, overwrite=args.overwrite, inputs=[args.onnx])
    info = build_tensorrt_engine(args.onnx, args.out, args.max_batch, args.max_len, fp16=not args.fp32)
    print(json.dumps(info, indent=2))
    return 0


def cmd_gguf(args: argparse.Namespace) -> int:
    from slimlm.checkpoint import resolve
    from slimlm.export.gguf import check_type, export_gguf
    from slimlm.llm import load

    qtype = check_type(args.type)  # before the slow load
    check_output(args.out, overwrite=args.overwrite, inputs=[args.model, args.adapter], kind="file")
    llm = load(args.model, dtype="fp32")
    if args.adapter:
        from slimlm.peft import merge_adapter

        llm.load_adapter(args.adapter)
        merge_adapter(llm.model)
    meta = export_gguf(
        llm.model,
        llm.tokenizer.hf,
        llm.path,
        args.out,
        qtype,
        pre=args.tokenizer_pre,
        source=resolve(args.model),
        name=str(args.model),
    )
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    types = ", ".join(f"{n} {t}" for t, n in meta["tensor_types"].items())
    print(
        f"wrote {args.out} ({meta['arch']}, {qtype}, {meta['bytes'] / 2**20:.1f} MiB, tensors: {types}; "
        f"tokenizer.ggml.pre={meta['tokenizer_pre']}, {meta['export_s']:.0f} s)"
    )
    return 0


def cmd_gguf_lora(args: argparse.Namespace) -> int:
    from slimlm.export.gguf import export_gguf_lora
    from slimlm.llm import load

    check_output(args.out, overwrite=args.overwrite, inputs=[args.model, args.adapter], kind="file")
    llm = load(args.model, dtype="fp32")
    llm.load_adapter(args.adapter)  # refuses an adapter whose shapes do not fit this base
    meta = export_gguf_lora(llm.model, args.out, args.type, name=str(args.adapter))
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    print(
        f"wrote {args.out} (llama.cpp LoRA, {meta['layers']} layers, alpha {meta['alpha']:g}, "
        f"{meta['bytes'] / 2**20:.1f} MiB); load it with the base model's GGUF, e.g. llama-cli -m BASE.gguf "
        f"--lora {args.out}"
    )
    return 0
