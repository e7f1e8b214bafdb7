"""Engine features on the real model, through `LLM.generate`'s engine: speculative decoding and prefix caching.

  speculative  single-stream greedy decoding of the bundled extract_json task's test prompts on the tuned model
               (base + LoRA adapter), with and without speculation — prompt lookup (n-gram), or with --draft a draft
               model (e.g. a `slimlm distill` student) loaded like the target: decode tokens/s, the per-round ratio,
               the acceptance rate, and whether every output is token-for-token identical.
  prefix       8 requests that share a ~230-token system prompt, submitted together after one unmeasured request
               that carried it: time to first token p50 with and without the prefix cache, outputs compared.

Rounds alternate off/on (see /work/shared/BENCHMARKING.md); medians are reported.

    .venv/bin/python bench/bench_engine_features.py --adapter runs/demo/lora/adapter --rounds 5
    .venv/bin/python bench/bench_engine_features.py --quick     # what `make demo` runs (1 round, fewer prompts)
    .venv/bin/python bench/bench_engine_features.py --draft STUDENT --spec-k 4   # STUDENT: slimlm distill's --out
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import machine_info  # noqa: E402

import slimlm  # noqa: E402
from slimlm.engine.core import Engine, EngineConfig, Request  # noqa: E402
from slimlm.engine.sampling import SamplingParams  # noqa: E402

SYSTEM = (
    "You are the support assistant of a hardware store. Answer in one or two sentences, politely, and only "
    "about the store's products, opening hours, returns and deliveries. "
) * 6


def task_prompts(llm, n: int, task_dir: Path | None) -> list[list[int]]:
    from slimlm.tasks.extract_json import make_examples, prompt_and_reference

    return [llm.tokenizer.prompt_ids(prompt_and_reference(e)[0], chat=True) for e in make_examples(n, seed=123)]


def run(
    llm, prompts: list[list[int]], cfg: EngineConfig, max_new: int, together: bool, warm: list[int] | None = None
) -> dict:
    """Greedy outputs, decode tok/s (single stream: one request at a time) or TTFTs (all submitted together);
    `warm`: a prompt run first, unmeasured (e.g. one that carries the shared system prompt)."""
    engine = Engine(llm.model, llm.tokenizer, cfg, draft_model=llm.draft_model if cfg.speculative == "draft" else None)
    if warm is not None:
        for _ in engine.generate([Request(warm, SamplingParams(max_new_tokens=2))]):
            pass
    outs, ttfts, decode_tokens, decode_s = [], [], 0, 0.0
    batches = [prompts] if together else [[p] for p in prompts]
    for batch in batches:
        reqs = [Request(p, SamplingParams(max_new_tokens=max_new)) for p in batch]
        t0 = time.perf_counter()
        for _ in engine.generate(reqs):
            pass
        for r in reqs:
            outs.append(r.output_ids)
            ttfts.append(r.t_first - t0)
            if r.n_generated > 1:
                decode_tokens += r.n_generated - 1
                decode_s += r.t_last - r.t_first
    return {
        "outputs": outs,
        "ttft_p50_s": statistics.median(ttfts),
        "decode_tok_s": decode_tokens / decode_s,
        "proposed": engine.spec_proposed,
        "accepted": engine.spec_accepted,
        "prefix_hit_tokens": engine.prefix_cache.hits if engine.prefix_cache else 0,
    }


def bench_speculative(llm, prompts, rounds: int, k: int, draft_vocab: int = 0) -> dict:
    """Plain decoding vs speculation (a draft model where llm has one, else prompt lookup), rounds alternating."""
    method = "draft" if llm.draft_model is not None else "ngram"
    base = dict(max_batch=1, max_seq_len=1024, max_loras=0, prefix_cache=False)
    rows = []
    for i in range(rounds):
        off = run(llm, prompts, EngineConfig(**base), 64, together=False)
        on = run(
            llm,
            prompts,
            EngineConfig(**base, speculative=method, num_speculative_tokens=k, draft_vocab=draft_vocab),
            64,
            together=False,
        )
        rows.append(
            {
                "off": off["decode_tok_s"],
                "on": on["decode_tok_s"],
                "ratio": on["decode_tok_s"] / off["decode_tok_s"],
                "identical": on["outputs"] == off["outputs"],
                "acceptance": on["accepted"] / max(on["proposed"], 1),
            }
        )
        print(
            f"  speculative round {i + 1}: off {off['decode_tok_s']:.1f} tok/s, {method} k={k} "
            f"{on['decode_tok_s']:.1f} tok/s ({rows[-1]['ratio']:.2f}x), acceptance {rows[-1]['acceptance']:.0%}, "
            f"identical {rows[-1]['identical']}",
            flush=True,
        )
    return {
        "method": method,
        "rounds": rows,
        "median_ratio": statistics.median(r["ratio"] for r in rows),
        "identical": all(r["identical"] for r in rows),
    }


def bench_prefix(llm, rounds: int, clients: int) -> dict:
    """`clients` requests sharing a system prompt, submitted together after one warm-up request that carried it
    (a served system prompt is hot): TTFT p50 with and without the prefix cache."""

    def chat(i, w):
        return llm.tokenizer.prompt_ids(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}: do you sell {w}?"}],
            chat=True,
        )

    prompts = [
        chat(i, w)
        for i, w in enumerate(["hammers", "paint", "ladders", "screws", "glue", "rope", "lamps", "tape"][:clients])
    ]
    warm = chat(99, "nails")
    base = dict(max_batch=clients, max_seq_len=512, max_loras=0)
    rows = []
    for i in range(rounds):
        off = run(llm, prompts, EngineConfig(**base, prefix_cache=False), 16, together=True, warm=warm)
        on = run(llm, prompts, EngineConfig(**base, prefix_cache=True), 16, together=True, warm=warm)
        rows.append(
            {
                "ttft_off_s": off["ttft_p50_s"],
                "ttft_on_s": on["ttft_p50_s"],
                "ratio": off["ttft_p50_s"] / on["ttft_p50_s"],
                "identical": on["outputs"] == off["outputs"],
                "hit_tokens": on["prefix_hit_tokens"],
            }
        )
        print(
            f"  prefix round {i + 1}: TTFT p50 without cache {1e3 * off['ttft_p50_s']:.0f} ms, with "
            f"{1e3 * on['ttft_p50_s']:.0f} ms ({rows[-1]['ratio']:.1f}x lower), {on['prefix_hit_tokens']} prompt "
            f"tokens from the cache, identical {rows[-1]['identical']}",
            flush=True,
        )
    return {
        "prompt_tokens": len(prompts[0]),
        "clients": clients,
        "rounds": rows,
        "median_ratio": statistics.median(r["ratio"] for r in rows),
        "identical": all(r["identical"] for r in rows),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapter", default=None, help="LoRA adapter of the tuned model (e.g. runs/demo/lora/adapter)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantize", default=None)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--spec-k", "--k", dest="k", type=int, default=4, help="speculative tokens per step")
    p.add_argument(
        "--draft",
        default=None,
        metavar="PATH",
        help="measure draft-model speculation with this draft (same tokenizer as --model, loaded with the "
        "same --dtype/--quantize) instead of prompt lookup",
    )
    p.add_argument(
        "--draft-vocab",
        type=int,
        default=0,
        metavar="N",
        help="with --draft: the draft guesses among token ids < N only (0: all)",
    )
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="1 round, 4 prompts")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.prompts = 1, 4
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    print(json.dumps(machine_info(torch.get_num_threads())))
    llm = slimlm.load(
        args.model, dtype=args.dtype, adapter=args.adapter, quantize=args.quantize, draft_model=args.draft
    )
    print(
        f"model {args.model}{' + ' + args.adapter if args.adapter else ''}, dtype {llm.model.dtype}, "
        f"{torch.get_num_threads()} threads{', draft ' + args.draft if args.draft else ''}",
        flush=True,
    )
    result = {
        "machine": machine_info(torch.get_num_threads()),
        "args": vars(args),
        "speculative": bench_speculative(
            llm, task_prompts(llm, args.prompts, None), args.rounds, args.k, args.draft_vocab
        ),
        "prefix": bench_prefix(llm, args.rounds, args.clients),
    }
    s, f = result["speculative"], result["prefix"]
    print(
        f"speculative ({s['method']}, k={args.k}): median decode speed-up {s['median_ratio']:.2f}x, "
        f"identical {s['identical']}"
    )
    print(
        f"prefix cache ({f['prompt_tokens']}-token prompts, {f['clients']} together): median TTFT p50 "
        f"{f['median_ratio']:.1f}x lower, identical {f['identical']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
