"""Peak RSS of loading SmolLM2-135M with slimlm (bf16, fp32), each in a fresh subprocess, minus a baseline.

    .venv/bin/python bench/bench_load_memory.py
    .venv/bin/python bench/bench_load_memory.py --reps 5 --json out/load_memory.json

Every case runs in its own fresh interpreter, which reports its peak resident set size
(resource.getrusage(RUSAGE_SELF).ru_maxrss, the high-water mark the kernel keeps, as /usr/bin/time -v reports it).
The baseline interpreter only imports torch and slimlm; "minus baseline" is what loading adds on top of it.
Cases:
  baseline                 import torch, slimlm
  baseline+transformers    the same plus `import transformers` (slimlm's tokenizer imports it when a model loads)
  load-bf16 / load-fp32    slimlm.load("smollm2-135m", dtype=...): weights + tokenizer (the full public path)
  load+gen-bf16 / -fp32    the same plus one 4-token generation, so every weight page has been touched: fp32 weights
                           stay memory-mapped from the cached safetensors file and only count in RSS once read
  weights-bf16 / -fp32     slimlm.checkpoint.load_model only: weights, no tokenizer, no transformers import
The GGUF -> HF folder conversion (done once, cached under ~/.cache/slimlm) is done before measuring, so no case pays
for it. Each case runs --reps times; the median is reported (RSS varies little between runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m"

PRELUDE = """
import json, resource, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads({threads})
import slimlm
"""
EPILOGUE = """
def _rss_mb(field):
    for line in open('/proc/self/status'):
        if line.startswith(field + ':'):
            return int(line.split()[1]) / 1024
    return float('nan')
out = {{'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'rss_now_mb': _rss_mb('VmRSS'),
        'rss_anon_now_mb': _rss_mb('RssAnon'), 'rss_file_now_mb': _rss_mb('RssFile'),
        'seconds': time.perf_counter() - t0, 'weights_mb': weights_mb}}
print('RESULT ' + json.dumps(out))
"""

CASES = {
    "baseline": "weights_mb = None",
    "baseline+transformers": "import transformers\nweights_mb = None",
    "load-bf16": "llm = slimlm.load({model!r}, dtype='bf16')\nm = llm.model",
    "load-fp32": "llm = slimlm.load({model!r}, dtype='fp32')\nm = llm.model",
    "load+gen-bf16": "llm = slimlm.load({model!r}, dtype='bf16')\nm = llm.model\n"
    "llm.complete(['Hello'], chat=False, max_new_tokens=4, ignore_eos=True)",
    "load+gen-fp32": "llm = slimlm.load({model!r}, dtype='fp32')\nm = llm.model\n"
    "llm.complete(['Hello'], chat=False, max_new_tokens=4, ignore_eos=True)",
    "weights-bf16": "from slimlm.checkpoint import load_model\n_, _, m = load_model({model!r}, torch.bfloat16)",
    "weights-fp32": "from slimlm.checkpoint import load_model\n_, _, m = load_model({model!r}, torch.float32)",
}
WEIGHTS = (
    "\nif 'm' in dir():\n    seen = {{}}\n    for p in list(m.parameters()) + list(m.buffers()):\n"
    "        seen[p.data_ptr()] = p.numel() * p.element_size()\n    weights_mb = sum(seen.values()) / 2**20\n"
)


def child_source(case: str, threads: int) -> str:
    return PRELUDE.format(threads=threads) + CASES[case].format(model=MODEL) + WEIGHTS.format() + EPILOGUE.format()


def run_case(case: str, threads: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", child_source(case, threads)], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"case {case} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def command_line() -> str:
    exe = sys.executable
    rel = os.path.relpath(exe)
    return shlex.join([rel if not rel.startswith("..") else exe] + sys.argv)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of: {', '.join(CASES)}")
    ap.add_argument("--reps", type=int, default=3, help="subprocesses per case (median reported; default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each subprocess (default 2)")
    ap.add_argument("--json", metavar="OUT", help="write results to this JSON file")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if "baseline" not in cases:
        cases.insert(0, "baseline")

    import torch
    import transformers

    import slimlm
    from slimlm.checkpoint import model_folder

    folder = model_folder(MODEL)  # convert the GGUF into the cache now, if needed, so no measured case does it
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    cmd = command_line()
    vers = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "slimlm": slimlm.__version__,
    }
    print(f"command: {cmd}")
    print(f"model folder: {folder}", flush=True)

    raw: dict[str, list[dict]] = {c: [] for c in cases}
    for rep in range(args.reps):  # alternate cases, as the speed benchmark alternates engines
        for c in cases:
            raw[c].append(run_case(c, args.threads))
        print(
            f"[rep {rep + 1}/{args.reps}] " + ", ".join(f"{c} {raw[c][-1]['peak_rss_mb']:.0f} MB" for c in cases),
            flush=True,
        )

    med = {
        c: {
            k: statistics.median(r[k] for r in raw[c]) if raw[c][0][k] is not None else None
            for k in ("peak_rss_mb", "rss_now_mb", "rss_anon_now_mb", "rss_file_now_mb", "seconds", "weights_mb")
        }
        for c in cases
    }
    base = med["baseline"]["peak_rss_mb"]
    print()
    print(f"### Peak RSS of loading SmolLM2-135M with slimlm (median of {args.reps} fresh processes each)")
    print()
    print(
        "| case | peak RSS MB | minus baseline MB | RSS at end MB (anon + file-backed) | weights in memory MB "
        "| seconds |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for c in cases:
        m = med[c]
        w = f"{m['weights_mb']:.0f}" if m["weights_mb"] is not None else "–"
        delta = "–" if c == "baseline" else f"{m['peak_rss_mb'] - base:.0f}"
        print(
            f"| {c} | {m['peak_rss_mb']:.0f} | {delta} | {m['rss_now_mb']:.0f} "
            f"({m['rss_anon_now_mb']:.0f} + {m['rss_file_now_mb']:.0f}) | {w} | {m['seconds']:.1f} |"
        )
    print()
    print(
        "baseline = a fresh interpreter that imports torch and slimlm; MB = 2**20 bytes; 'weights in memory' counts "
        "each distinct parameter/buffer storage once (tied embeddings once); "
        "file-backed RSS is mostly memory-mapped safetensors pages."
    )
    print(f"Machine: {cpu}; torch threads {args.threads}")
    print("Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    print(f"Command: `{cmd}`")
    if args.json:
        out = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": cmd,
            "cpu": cpu,
            "versions": vers,
            "args": vars(args),
            "median": med,
            "baseline_peak_rss_mb": base,
            "runs": raw,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
