"""Held-out perplexity of exported ONNX models run by ONNX Runtime next to the same weights in PyTorch.

Exports made by bench/bench_export.py (--export-dir) are scored with slimlm.eval.perplexity (windows of 512,
--ppl-tokens tokens of the built-in held-out corpus): the ONNX file through export/ort.py's OrtModel, and the
PyTorch model loaded the way the export was made. Reproduce:

    .venv/bin/python bench/bench_export_quality.py --json bench/results/export_quality.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import slimlm
from slimlm.eval.corpus import builtin_corpus
from slimlm.eval.perplexity import perplexity_of_ids
from slimlm.export.ort import OrtModel

FORMATS = {"fp32": None, "int8": "int8", "int8-dynamic": "int8-dynamic", "int4-g64": "int4"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--export-dir", default="runs/export_bench")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.formats.split(","):
        llm = slimlm.load(args.model, dtype="fp32", quantize=FORMATS[name], group_size=64)
        ids = llm.tokenizer.encode(builtin_corpus("heldout"))
        torch_ppl = perplexity_of_ids(llm.model, ids, max_tokens=args.ppl_tokens, progress=False)["ppl"]
        ort = OrtModel(Path(args.export_dir) / name, threads=args.threads)
        ort_ppl = perplexity_of_ids(ort, ids, max_tokens=args.ppl_tokens, batch_size=1, progress=False)["ppl"]
        rows.append({"format": name, "torch_ppl": torch_ppl, "ort_ppl": ort_ppl})
        print(f"| {name} | {torch_ppl:.3f} | {ort_ppl:.3f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
