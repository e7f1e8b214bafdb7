"""Speed effect of each fusion pass on SmolLM2-135M (prefill and decode), and of BatchNorm folding on a small CNN.

    .venv/bin/python bench/bench_fuse.py                                  # the full run (fp32; ~5 min on 2 idle cores)
    .venv/bin/python bench/bench_fuse.py --dtypes fp32,bf16 --rounds 9    # bf16 too (slow on AVX2-only CPUs)
    .venv/bin/python bench/bench_fuse.py --tiny --rounds 1 --json /tmp/fuse_smoke.json   # smoke test, seconds

Variants of the same loaded model (deep copies, all in memory at once):
  base; one pass each (qkv, gate_up, norms); all (merge,norms,qkv,gate_up); lora = base + a random LoRA adapter
  (r=16, all linears, unmerged, as `--adapter` runs it); lora+merge (merge pass only); lora+all (every pass).
Every variant's logits are first checked against its reference (max |Δ| printed; base for the passes, lora for the
lora rows). Measured per variant, greedy, fresh static KVCache each run (slimlm.generate.prefill /
decode_one_token, the path LLM.generate takes):
  prefill tok/s at batch 1 and batch 4 (--prompt-tokens random token ids per row), and
  decode tok/s at batch 1 (--new-tokens steps after the batch-1 prefill, argmax fed back).
One warm-up run per variant, then --rounds rounds; each round measures every variant once, one after another
(interleaved), so a slow spell of the machine hits all of them alike. Reported: the median over rounds, and each
ratio as the median of the per-round ratios (variant tok/s / reference tok/s of the same round).

CNN: slimlm.fuse.example_cnn.SmallResNet (--cnn-channels, --cnn-blocks residual blocks; conv-bn-relu stem, skip
connections, Linear-BN1d head) in eval mode, batch --cnn-batch of 3x64x64 images, latency of one forward before and
after fold_conv_bn_ + fold_linear_bn_, interleaved for --rounds rounds of --cnn-iters forwards each.
Results go to --json (default bench/results/fuse.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from slimlm.fuse import fold_conv_bn_, fold_linear_bn_, fuse_model_
from slimlm.fuse.example_cnn import SmallResNet, randomize_batchnorms_
from slimlm.generate import decode_one_token, prefill
from slimlm.kv_cache import KVCache

# variant -> (what it starts from, fusion passes applied, the variant its logits and speed are compared with)
VARIANTS = {
    "base": ("base", (), "base"),
    "qkv": ("base", ("qkv",), "base"),
    "gate_up": ("base", ("gate_up",), "base"),
    "norms": ("base", ("norms",), "base"),
    "all": ("base", ("merge", "norms", "qkv", "gate_up"), "base"),
    "lora": ("lora", (), "lora"),
    "lora+merge": ("lora", ("merge",), "lora"),
    "lora+all": ("lora", ("merge", "norms", "qkv", "gate_up"), "lora"),
}


def load_base(args, dtype: torch.dtype):
    """The model to fuse: SmolLM2-135M (or --model), or with --tiny a random 2-layer model for smoke runs."""
    if args.tiny:
        from slimlm.config import ModelConfig
        from slimlm.model import Transformer

        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_name("tiny")).to(dtype).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.2 * torch.randn_like(p))  # gains away from 1, so the norms pass folds something
        return model
    import slimlm

    return slimlm.load(args.model, dtype=dtype).model


def with_lora(base, seed: int = 0):
    """base + a LoRA adapter (r=16, alpha=32, all linears) with random B, so it changes the outputs."""
    from slimlm.peft import apply_peft, make_config

    model = copy.deepcopy(base)
    apply_peft(model, "lora", make_config("lora", {"r": 16, "alpha": 32}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.01 * torch.randn(p.shape, generator=g).to(p.dtype))
    return model.eval()


def build_variants(base, names: list[str]) -> tuple[dict, dict]:
    """{variant: model}, {variant: {pass: report dict}}."""
    starts = {"base": base}
    if any(VARIANTS[n][0] == "lora" for n in names):
        starts["lora"] = with_lora(base)
    models, reports = {}, {}
    for n in names:
        start, passes, _ = VARIANTS[n]
        model = starts[start] if not passes else copy.deepcopy(starts[start])
        if passes:
            reports[n] = {k: r.to_dict() for k, r in fuse_model_(model, passes).items()}
        models[n] = model
    return models, reports


def _clock(model) -> float:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter()


@torch.no_grad()
def run_once(model, prompts: dict[int, torch.Tensor], new_tokens: int) -> dict[str, float]:
    """Seconds of prefill at each batch size, and of new_tokens decode steps after the batch-1 prefill."""
    out = {}
    for B, prompt in prompts.items():
        T = prompt.shape[1]
        cache = KVCache.for_model(model, B, T + (new_tokens if B == 1 else 0))
        cache.reset()
        t0 = _clock(model)
        logits = prefill(model, prompt, cache, torch.arange(T, device=prompt.device))
        t1 = _clock(model)
        out[f"prefill_b{B}"] = t1 - t0
        if B == 1 and new_tokens:
            for step in range(new_tokens):
                token = logits.argmax(dim=-1, keepdim=True)  # [1, 1]
                logits = decode_one_token(model, token, cache, torch.tensor([T + step], device=prompt.device))
            out["decode_b1"] = _clock(model) - t1
    return out


@torch.no_grad()
def check_logits(models: dict, prompt: torch.Tensor) -> dict[str, float]:
    """max |logit(variant) - logit(its reference)| on the batch-1 prompt."""
    ref_logits = {}
    diffs = {}
    for n, model in models.items():
        ref = VARIANTS[n][2]
        if ref not in ref_logits:
            ref_logits[ref] = models[ref](prompt).float()
        diffs[n] = (model(prompt).float() - ref_logits[ref]).abs().max().item()
    return diffs


def bench_llm(args, dtype: torch.dtype) -> dict:
    base = load_base(args, dtype)
    models, reports = build_variants(base, args.variants)
    g = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    prompts = {B: torch.randint(0, vocab, (B, args.prompt_tokens), generator=g).to(base.device) for B in args.batches}
    if 1 not in prompts:
        prompts[1] = torch.randint(0, vocab, (1, args.prompt_tokens), generator=g).to(base.device)
    diffs = check_logits(models, prompts[1])
    for _n, model in models.items():  # warm-up: allocator, oneDNN kernel selection
        run_once(model, prompts, min(args.new_tokens, 4))
    rounds: list[dict[str, dict[str, float]]] = []
    for r in range(args.rounds):
        rounds.append({n: run_once(model, prompts, args.new_tokens) for n, model in models.items()})
        print(f"  round {r + 1}/{args.rounds} done", flush=True)
    tokens = {f"prefill_b{B}": B * args.prompt_tokens for B in prompts}
    tokens["decode_b1"] = args.new_tokens
    rows = {}
    for n in models:
        ref = VARIANTS[n][2]
        row = {"passes": list(VARIANTS[n][1]), "reference": ref, "max_logit_diff": diffs[n]}
        for metric, count in tokens.items():
            row[f"{metric}_tok_s"] = statistics.median(count / rd[n][metric] for rd in rounds)
            row[f"{metric}_ratio"] = statistics.median(rd[ref][metric] / rd[n][metric] for rd in rounds)
        rows[n] = row
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "variants": rows,
        "reports": reports,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "batches": sorted(prompts),
    }


@torch.no_grad()
def bench_cnn(args) -> dict:
    torch.manual_seed(0)
    net = randomize_batchnorms_(SmallResNet(args.cnn_channels, args.cnn_blocks)).eval()
    folded = copy.deepcopy(net)
    conv_report, linear_report = fold_conv_bn_(folded), fold_linear_bn_(folded)
    x = torch.randn(args.cnn_batch, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    diff = (net(x) - folded(x)).abs().max().item()
    times = {"unfolded": [], "folded": []}
    for _ in range(args.rounds):
        for name, m in (("unfolded", net), ("folded", folded)):
            t0 = time.perf_counter()
            for _ in range(args.cnn_iters):
                m(x)
            times[name].append((time.perf_counter() - t0) / args.cnn_iters)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    ratio = statistics.median(u / f for u, f in zip(times["unfolded"], times["folded"]))
    return {
        "model": f"SmallResNet(channels={args.cnn_channels}, blocks={args.cnn_blocks})",
        "input": [args.cnn_batch, 3, 64, 64],
        "max_abs_diff": diff,
        "latency_ms": ms,
        "speedup": ratio,
        "folded": conv_report.fused + linear_report.fused,
    }


def print_llm(res: dict) -> None:
    print(f"\n{res['dtype']}: tok/s (ratio to reference: >1 is faster); max |Δ logit| vs reference")
    metrics = [k.removesuffix("_tok_s") for k in next(iter(res["variants"].values())) if k.endswith("_tok_s")]
    print(f"{'variant':12s} {'ref':5s} " + " ".join(f"{m:>18s}" for m in metrics) + "   max|Δ|")
    for n, row in res["variants"].items():
        cells = " ".join(f"{row[m + '_tok_s']:9.1f} ({row[m + '_ratio']:.3f})" for m in metrics)
        print(f"{n:12s} {row['reference']:5s} {cells}   {row['max_logit_diff']:.1e}")
    for n, rep in res["reports"].items():
        for pass_name, r in rep.items():
            if r["skipped"]:
                what, why = next(iter(r["skipped"].items()))
                print(f"  {n}/{pass_name}: {len(r['skipped'])} skipped, e.g. {what}: {why}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tiny", action="store_true", help="a random tiny model instead of --model (smoke test)")
    p.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, bf16")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batches", default="1,4", help="prefill batch sizes (decode runs at batch 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--cnn-channels", type=int, default=64)
    p.add_argument("--cnn-blocks", type=int, default=3)
    p.add_argument("--cnn-batch", type=int, default=8)
    p.add_argument("--cnn-iters", type=int, default=5, help="forwards per CNN timing")
    p.add_argument("--no-cnn", action="store_true")
    p.add_argument("--json", default="bench/results/fuse.json")
    args = p.parse_args()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown --variants {unknown}; choose from {', '.join(VARIANTS)}")
    wanted = set(args.variants) | {VARIANTS[v][2] for v in args.variants}  # + the references they compare with
    args.variants = [v for v in VARIANTS if v in wanted]
    args.batches = sorted({int(b) for b in args.batches.split(",")})
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    result = {
        "model": "tiny (random)" if args.tiny else args.model,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "rounds": args.rounds,
        "llm": [],
    }
    t0 = time.perf_counter()
    for d in args.dtypes.split(","):
        print(f"[{time.perf_counter() - t0:5.0f} s] {d}: building variants and measuring", flush=True)
        result["llm"].append(bench_llm(args, dtypes[d.strip()]))
        print_llm(result["llm"][-1])
    if not args.no_cnn:
        result["cnn"] = cnn = bench_cnn(args)
        print(
            f"\nCNN {cnn['model']} batch {cnn['input']}: {cnn['latency_ms']['unfolded']:.2f} ms -> "
            f"{cnn['latency_ms']['folded']:.2f} ms per forward ({cnn['speedup']:.3f}x), "
            f"{len(cnn['folded'])} BatchNorms folded, max |Δ| {cnn['max_abs_diff']:.1e}"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
