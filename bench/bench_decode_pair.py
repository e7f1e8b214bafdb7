"""Decode and prefill speed of two saved models, alternated in one process (A, B, A, B, ...): the speed-up of a
pruned or distilled model over its source, measured the way BENCHMARKING.md asks.

Each round runs slimlm.eval.speed.measure_speed (batch 1, greedy, --prompt-tokens then --new-tokens decode steps,
median of 3 after a warm-up) on A then on B; the table gives both medians and the median of the per-round B/A
ratios. Reproduce (issue 5's two targets):

    .venv/bin/python -m slimlm.cli prune --structured mlp --ratio 0.25 --out runs/prune_mlp25
    .venv/bin/python bench/bench_decode_pair.py --a smollm2-135m --b runs/prune_mlp25 --rounds 7
    .venv/bin/python bench/bench_decode_pair.py --a runs/compress_half/0-base \
        --b runs/compress_half/2-distill-alpha0.5 --rounds 7
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", required=True, help="reference model (alias or folder)")
    p.add_argument("--b", required=True, help="model compared with it")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    a, b = (slimlm.load(m, dtype=args.dtype).model for m in (args.a, args.b))
    cfg = SpeedConfig(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, warmup=1, repeats=3)
    rows = []
    t0 = time.perf_counter()
    for r in range(args.rounds):
        ra, rb = measure_speed(a, cfg), measure_speed(b, cfg)
        rows.append((ra, rb))
        print(
            f"[{time.perf_counter() - t0:5.0f} s] round {r + 1}: decode {ra['decode_tokens_per_s']:.1f} vs "
            f"{rb['decode_tokens_per_s']:.1f} tok/s ({rb['decode_tokens_per_s'] / ra['decode_tokens_per_s']:.2f}x), "
            f"prefill {ra['prefill_tokens_per_s']:.0f} vs {rb['prefill_tokens_per_s']:.0f}",
            flush=True,
        )
    out = {"a": args.a, "b": args.b, "args": vars(args)}
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s"):
        out[key] = {
            "a": statistics.median(x[key] for x, _ in rows),
            "b": statistics.median(y[key] for _, y in rows),
            "ratio": statistics.median(y[key] / x[key] for x, y in rows),
            "ratios": [round(y[key] / x[key], 3) for x, y in rows],
        }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
