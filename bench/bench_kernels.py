"""Speed of slimlm's int8 weight-only CPU kernel (slimlm/kernels) against torch's kernels, then decode end to end.

    .venv/bin/python bench/bench_kernels.py                 # microbench + SmolLM2-135M decode (~3 min on 2 cores)
    .venv/bin/python bench/bench_kernels.py --no-e2e        # microbench only (~30 s)
    .venv/bin/python bench/bench_kernels.py --shapes 576x1536 --ms 1,64,128,256   # e.g. to place the prefill switch

Microbench: for each SmolLM2-135M matrix (K -> N: q/o 576->576, k/v 576->192, gate/up 576->1536, down 1536->576,
tied head 576->49152) and each number of activation rows M, the median time of
  slimlm   torch.ops.slimlm.int8_linear(x fp32, qweight, scale)           (what Int8WeightOnlyLinear runs now)
  int8pack torch._weight_int8pack_mm(x bf16, qweight, scale bf16)          (what it ran before: bf16 activations)
  fp32     x @ w.T with the dense fp32 weight                              (the unquantized model)
  dyn      DynamicInt8Linear's path: per-row activation quantization + torch._int_mm
with GB/s of weight bytes read (int8: N*K, fp32: 4*N*K) and slimlm's speed-up over int8pack and over fp32.
End to end: slimlm.load("smollm2-135m", dtype="fp32", quantize="int8"), greedy decode of 64 tokens, decode tok/s
with the kernel and with SLIMLM_KERNELS=0, --rounds rounds alternating, medians reported.
Other processes on the machine slow every column alike; rerun when the numbers look noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from slimlm import kernels
from slimlm.quantize.int8 import quantize_int8_rows, quantize_int8_weight

SMOLLM2_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]  # (K, N)


def cpu_summary() -> str:
    """Model name and the vector flags that matter for these kernels."""
    name = (
        next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
        if os.path.exists("/proc/cpuinfo")
        else "?"
    )
    flags = [f for f in kernels.cpu_flags() if f.startswith(("avx2", "avx512", "amx", "fma", "avx_vnni"))]
    return f"{name}; flags: {' '.join(flags) or 'none of avx2/avx512/amx'}; torch threads {torch.get_num_threads()}"


def median_us(fn: Callable[[], object], min_s: float = 0.15, repeats: int = 7) -> float:
    """Median over `repeats` batches of the time per call in µs; each batch runs >= min_s / repeats seconds."""
    fn()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.02:
        fn()
        n += 1
    per_batch = max(1, int(n * min_s / repeats / 0.02))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(per_batch):
            fn()
        times.append((time.perf_counter() - t0) / per_batch)
    return statistics.median(times) * 1e6


def bench_shape(K: int, N: int, M: int) -> dict[str, float]:
    """µs per call of each kernel for x [M, K] and a random weight [N, K]."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) * 0.02
    q, s = quantize_int8_weight(w)
    x = torch.randn(M, K, generator=g)
    xb, sb = x.bfloat16(), s.bfloat16()
    qt = q.t()

    def dyn():
        xq, sx = quantize_int8_rows(x)
        return torch._int_mm(xq, qt).float() * sx * s

    out = {
        "fp32": median_us(lambda: x @ w.T),
        "int8pack": median_us(lambda: torch._weight_int8pack_mm(xb, q, sb)),
        "dyn": median_us(dyn, min_s=0.05, repeats=3),
    }  # slow on AVX2 (see the numbers): fewer repeats
    if kernels.load():
        out["slimlm"] = median_us(lambda: kernels.int8_linear(x, q, s))
    return out


def microbench(shapes: list[tuple[int, int]], ms: list[int]) -> None:
    print(
        f"{'K->N':>11} {'M':>3} | {'slimlm µs':>9} {'GB/s':>5} | {'int8pack µs':>11} {'GB/s':>5} | "
        f"{'fp32 µs':>8} {'GB/s':>5} | {'dyn µs':>7} | {'vs int8pack':>11} {'vs fp32':>7}"
    )
    for K, N in shapes:
        for M in ms:
            t = bench_shape(K, N, M)
            gbs = {k: (N * K * (4 if k == "fp32" else 1)) / (v * 1e-6) / 1e9 for k, v in t.items()}
            sl = t.get("slimlm", float("nan"))
            print(
                f"{K:>5}->{N:<5} {M:>3} | {sl:9.1f} {gbs.get('slimlm', 0):5.1f} | {t['int8pack']:11.1f} "
                f"{gbs['int8pack']:5.1f} | {t['fp32']:8.1f} {gbs['fp32']:5.1f} | {t.get('dyn', float('nan')):7.1f} | "
                f"{t['int8pack'] / sl:10.1f}x {t['fp32'] / sl:6.1f}x"
            )


def end_to_end(rounds: int, new_tokens: int) -> None:
    import slimlm
    from slimlm.generate import SamplingParams

    m = slimlm.load("smollm2-135m", dtype="fp32", quantize="int8")
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    prompt = "The history of the printing press began"
    runs: dict[str, list[float]] = {"kernel": [], "SLIMLM_KERNELS=0": []}
    for variant in ["kernel", "SLIMLM_KERNELS=0"]:  # warm-up (and the one-time build) outside the timing
        os.environ["SLIMLM_KERNELS"] = "0" if variant != "kernel" else "1"
        m.complete([prompt], params)
    for _ in range(rounds):
        for variant in runs:
            os.environ["SLIMLM_KERNELS"] = "0" if variant != "kernel" else "1"
            runs[variant].append(m.complete([prompt], params)[0].decode_tokens_per_s)
    os.environ.pop("SLIMLM_KERNELS")
    print(f"\nSmolLM2-135M fp32 + int8 weights, batch 1, {new_tokens} new tokens, decode tok/s (median of {rounds}):")
    for variant, v in runs.items():
        print(f"  {variant:<17} {statistics.median(v):6.1f}   runs: {', '.join(f'{x:.1f}' for x in v)}")
    print(f"  speed-up          {statistics.median(runs['kernel']) / statistics.median(runs['SLIMLM_KERNELS=0']):.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SMOLLM2_SHAPES), help="KxN,KxN,...")
    p.add_argument("--ms", default="1,4,16", help="activation rows M, comma-separated")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=3, help="end-to-end rounds per variant")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--no-e2e", action="store_true", help="skip the SmolLM2 decode check")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(cpu_summary())
    print(f"slimlm kernel: {kernels.isa()}  (built in {kernels.build_dir()})\n")
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    microbench(shapes, [int(v) for v in a.ms.split(",")])
    if not a.no_e2e:
        end_to_end(a.rounds, a.new_tokens)


if __name__ == "__main__":
    main()
