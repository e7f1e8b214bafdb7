"""The serving engine without HTTP: how long one decode step takes for 1..N running streams.

Separates the engine's own cost from the server's (event loop, SSE, the client process on the same cores):
submit N requests, prefill them all, then time `Engine.step()` while every row decodes.

    .venv/bin/python bench/bench_engine_decode.py --rows 1,8,16 --dtype fp32 [--quantize int8-dynamic]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import slimlm
from slimlm.engine.core import Engine, EngineConfig, Request
from slimlm.engine.sampling import SamplingParams


def step_ms(llm, rows: int, steps: int, max_batch: int, fused: bool = True) -> list[float]:
    """Milliseconds of each of `steps` decode steps with `rows` streams running (greedy, 158-token prompts)."""
    engine = Engine(
        llm.model, llm.tokenizer, EngineConfig(max_batch=max_batch, max_seq_len=512, max_loras=0, fused_decode=fused)
    )
    for i in range(rows):
        ids = llm.tokenizer.prompt_ids(f"story {i} " + "the cat sat on the mat " * 20, chat=True)
        engine.submit(Request(ids, SamplingParams(max_new_tokens=steps + 8, ignore_eos=True)))
    while engine.waiting or any(r.pending is None for r in engine.running.values()):  # admit + prefill everyone
        engine.step()
    engine.step()  # warm-up decode
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--quantize", default=None, choices=["int8", "int8-dynamic", "int4"])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--rows", default="1,8,16", help="comma list of running streams")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-fused", action="store_true", help="the model's own forward, not the fused CPU decode step")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    llm = slimlm.load(args.model, dtype=args.dtype, quantize=args.quantize, group_size=args.group_size)
    rows = [int(r) for r in args.rows.split(",")]
    print(
        f"{args.model} {args.dtype} {args.quantize or ''}, {args.threads} threads, "
        f"{args.steps} decode steps per row count, "
        f"fused decode {'off' if args.no_fused else 'on'}\n"
    )
    print("| running streams | step ms (median [min–max]) | tokens/s |\n|---:|---:|---:|")
    for n in rows:
        t = step_ms(llm, n, args.steps, max(rows), fused=not args.no_fused)
        med = statistics.median(t)
        print(f"| {n} | {med:.1f} [{min(t):.1f}–{max(t):.1f}] | {n / med * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
