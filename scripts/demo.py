"""The main job, end to end on the default model: load SmolLM2-135M-Instruct, chat, and report throughput.

Run by `make demo`. Later stages (fine-tune -> compress -> serve) join here as they are built.
"""

from __future__ import annotations

import argparse
import time

import torch

import slimlm

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Write a short poem about the sea.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--compile", action="store_true", help="compile the decode step (slow first call)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    torch.manual_seed(0)

    t0 = time.perf_counter()
    print(f"== loading {args.model} (the first run converts the GGUF to an HF folder in the cache) ==", flush=True)
    llm = slimlm.load(args.model, dtype=args.dtype, compile=args.compile)
    cfg = llm.config
    print(f"loaded in {time.perf_counter() - t0:.1f} s from {llm.path}\n"
          f"{cfg.num_params() / 1e6:.1f} M parameters, {cfg.n_layers} layers, GQA {cfg.n_heads}/{cfg.n_kv_heads} "
          f"heads, dtype {str(llm.model.dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads\n")

    rows = []
    for prompt in PROMPTS:
        print(f"user> {prompt}\nassistant> ", end="", flush=True)
        for _, piece, done in llm.stream_batch([prompt], slimlm.SamplingParams(max_new_tokens=args.max_new_tokens)):
            print(piece, end="", flush=True)
            if done is not None:
                rows.append(done)
        print("\n")

    batch = llm.complete(PROMPTS, max_new_tokens=32)
    print("batched (3 prompts of different lengths, one pass):")
    for c in batch:
        print(f"  - {c.text[:70]!r}")

    print("\n| prompt | prompt tokens | generated | prefill tok/s | decode tok/s | finish |")
    print("|---|---:|---:|---:|---:|---|")
    for prompt, c in zip(PROMPTS, rows):
        print(f"| {prompt[:32]} | {c.prompt_tokens} | {c.completion_tokens} | {c.prefill_tokens_per_s:.0f} | "
              f"{c.decode_tokens_per_s:.1f} | {c.finish_reason} |")
    gen = sum(c.completion_tokens for c in rows)
    dec = sum(c.decode_s for c in rows)
    print(f"\ntotal: {gen} tokens generated, mean decode {sum(c.completion_tokens - 1 for c in rows) / dec:.1f} tok/s")


if __name__ == "__main__":
    main()
