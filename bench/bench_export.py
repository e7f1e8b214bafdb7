"""ONNX Runtime vs PyTorch on SmolLM2-135M-Instruct: prefill and decode tokens/s, fp32 and quantized.

For each weight format the model is exported once with `slimlm.export.onnx.export_onnx` (kept in --export-dir and
reused), then the PyTorch model and the ONNX Runtime model (export/ort.py: the same generation harness,
slimlm.eval.speed.measure_speed, batch 1, greedy) are measured alternately, --rounds pairs after a warm-up each;
the table shows medians and the median of the per-pair ratios. Threads: torch and ORT both use --threads.
Formats: fp32; int8 (weight-only; PyTorch: _weight_int8pack_mm with bf16 activations; ORT: MatMulNBits 8-bit,
fp32 compute); int8-dynamic (PyTorch: per-token int8 activations, _int_mm; ORT: MatMulNBits 8-bit with
accuracy_level 4 = int8 compute); int4 g64 RTN (PyTorch: _weight_int4pack_mm_for_cpu; ORT: MatMulNBits 4-bit).
Reproduce:

    .venv/bin/python bench/bench_export.py --json bench/results/export.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import slimlm
from slimlm.eval.speed import SpeedConfig, measure_speed
from slimlm.export.onnx import METADATA_FILE, ONNX_FILE, export_onnx
from slimlm.export.ort import OrtModel
from slimlm.quantize.schemes import quantized_bytes

FORMATS = {"fp32": None, "int8": "int8", "int8-dynamic": "int8-dynamic", "int4-g64": "int4"}


def log(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)


def exported(name: str, llm, folder: Path, t0: float) -> dict:
    """Export (or reuse) the ONNX folder of this format; its metadata."""
    meta_path = folder / METADATA_FILE
    if not meta_path.is_file():
        log(f"exporting {name} to {folder}", t0)
        export_onnx(llm.model, llm.tokenizer, folder)
    return json.loads(meta_path.read_text())


def compare(name: str, quantize: str | None, args, t0: float) -> dict:
    llm = slimlm.load(args.model, dtype="fp32", quantize=quantize, group_size=64)
    meta = exported(name, llm, Path(args.export_dir) / name, t0)
    ort_model = OrtModel(Path(args.export_dir) / name, threads=args.threads)
    cfg = SpeedConfig(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, warmup=0, repeats=1)
    for model in (llm.model, ort_model):  # warm-up each
        measure_speed(model, SpeedConfig(prompt_tokens=args.prompt_tokens, new_tokens=4, warmup=0, repeats=1))
    pairs = []
    for r in range(args.rounds):
        pt = measure_speed(llm.model, cfg)
        ort = measure_speed(ort_model, cfg)
        pairs.append((pt, ort))
        log(
            f"{name} round {r + 1}: torch prefill {pt['prefill_tokens_per_s']:.0f} decode "
            f"{pt['decode_tokens_per_s']:.1f} | ort prefill {ort['prefill_tokens_per_s']:.0f} decode "
            f"{ort['decode_tokens_per_s']:.1f} tok/s",
            t0,
        )

    def med(i: int, key: str) -> float:
        return statistics.median(p[i][key] for p in pairs)

    def ratio(key: str) -> float:
        return statistics.median(p[1][key] / p[0][key] for p in pairs)

    return {
        "format": name,
        "torch_prefill": med(0, "prefill_tokens_per_s"),
        "ort_prefill": med(1, "prefill_tokens_per_s"),
        "prefill_ratio": ratio("prefill_tokens_per_s"),
        "torch_decode": med(0, "decode_tokens_per_s"),
        "ort_decode": med(1, "decode_tokens_per_s"),
        "decode_ratio": ratio("decode_tokens_per_s"),
        "onnx_mib": (Path(args.export_dir) / name / ONNX_FILE).stat().st_size / 2**20,
        "torch_weights_mib": quantized_bytes(llm.model) / 2**20,
        "parity": meta.get("parity"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--export-dir", default="runs/export_bench")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = [compare(name, FORMATS[name], args, t0) for name in args.formats.split(",")]
    print(
        "\n| weights | prefill tok/s torch | ORT | ORT/torch "
        "| decode tok/s torch | ORT | ORT/torch | .onnx MiB | max Δ logit |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['format']} | {r['torch_prefill']:.0f} | {r['ort_prefill']:.0f} | {r['prefill_ratio']:.2f} | "
            f"{r['torch_decode']:.1f} | {r['ort_decode']:.1f} | {r['decode_ratio']:.2f} | {r['onnx_mib']:.1f} | "
            f"{(r['parity'] or {}).get('max_logit_diff', float('nan')):.1e} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
