"""Predicted (slimlm.memory) vs measured peak memory of SmolLM2-135M: inference, LoRA, QLoRA and full fine-tuning.

    .venv/bin/python bench/bench_memory.py                       # 12 points, about 6 minutes on 2 cores
    .venv/bin/python bench/bench_memory.py --only lora full      # some modes
    .venv/bin/python bench/bench_memory.py --device cuda         # max_memory_allocated instead of RSS

Each point runs in a fresh interpreter with torch.set_num_threads(1):
  1. import torch and slimlm, then run the same code path once on a tiny random model, so that lazily loaded
     kernels, thread pools and allocator arenas belong to the baseline, not to the measurement; gc.collect() and
     malloc_trim(0); baseline = VmRSS.
  2. load SmolLM2-135M (alias `smollm2-135m`: the cached HF folder of the bundled GGUF), apply the method, build
     AdamW and take one tiny step (1 x 8 tokens) so that the optimizer states exist, as in every step after the
     first; gc.collect() and malloc_trim(0), so buffers the load freed are not counted as the step's.
  3. reset the kernel's RSS high-water mark (`5` > /proc/self/clear_refs), run the measured work, read VmHWM.
measured = VmHWM - baseline: the weights, optimizer states and everything the step holds at its peak; that is what
the estimate's total predicts (it excludes the Python + torch runtime, which the baseline holds). On CUDA:
torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), the weights included.

Every CPU point is measured twice, under two glibc malloc settings:
  pinned   MALLOC_MMAP_THRESHOLD_=131072: glibc's default threshold, fixed. Every tensor of 128 KiB or more gets its
           own mapping, returned to the OS when freed, so RSS follows the bytes of live tensors: the quantity the
           estimator predicts, and the validated column (tolerance 15 %).
  default  glibc as it comes: after freeing a mapped block glibc raises the threshold to that block's size (up to
           32 MiB), so activation-sized tensors come from the heap, and what is freed inside the heap stays
           resident. RSS then exceeds the live bytes by that slack, shown alongside (not a tensor the estimate
           misses: with the threshold pinned the same step measures as predicted).

Work: training = one step of slimlm.train.trainer (accumulate_gradients + optimizer_step, the functions `train`
runs every step) on B x T random tokens, each labelled; inference = slimlm.generate.generate_tokens: a prefill of
B prompts of T tokens and 16 decoded tokens, in a static KV cache of T + 16 slots.
The prediction comes from the model's config.json alone (slimlm.memory.estimate_memory); no weights are read.
Results: a Markdown table on stdout and JSON in bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m"
NEW_TOKENS = 16
# mode -> (PEFT method, compute dtype). Training keeps fp32 weights; bf16 there means autocast (QLoRA's usual
# setting); inference loads the weights in bf16, what `slimlm.load` picks on this CPU (AVX512-BF16).
MODES = {"infer": (None, "bf16"), "lora": ("lora", "fp32"), "qlora": ("qlora", "bf16"), "full": ("full", "fp32")}
SIZES = {"infer": [(1, 128), (4, 512), (8, 512)], "train": [(1, 128), (4, 256), (4, 512)]}
TOLERANCE = 0.15


# ---- child: one measurement ------------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _settle() -> None:
    """Free what Python and glibc still hold, so RSS shows live memory only."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _prepare(model, mode: str, device: str, batch: int, seq: int):
    """Apply the method and return the work to measure (a function of no arguments)."""
    import torch

    from slimlm.generate import SamplingParams, generate_tokens
    from slimlm.peft import apply_peft, make_config
    from slimlm.train.checkpoint import trainable_parameters
    from slimlm.train.trainer import (
        TrainConfig,
        _training_mode,
        accumulate_gradients,
        make_optimizer,
        optimizer_step,
    )

    method, dtype = MODES[mode]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=gen)
    if method is None:
        prompts = ids.tolist()
        params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
        return lambda: [None for _ in generate_tokens(model, prompts, params)]
    apply_peft(model, method, make_config(method, {}))
    model.to(device)
    cfg = TrainConfig(batch_size=batch, precision=dtype)
    params = trainable_parameters(model)
    optimizer, scheduler = make_optimizer(params, cfg)

    def step(input_ids):
        with _training_mode(model, cfg.gradient_checkpointing):
            accumulate_gradients(model, [{"input_ids": input_ids, "labels": input_ids.clone()}], cfg)
            optimizer_step(optimizer, scheduler, None, list(params.values()), cfg.max_grad_norm)

    step(ids[:1, :8])  # the first step creates AdamW's states
    return lambda: step(ids)


def _warm_up(mode: str, device: str) -> None:
    """The same code path on a tiny random model: kernels, thread pools and arenas are then part of the baseline."""
    import torch

    from slimlm.config import ModelConfig
    from slimlm.model import Transformer

    dtype = torch.bfloat16 if mode == "infer" and MODES[mode][1] == "bf16" else torch.float32
    config = ModelConfig.from_name("tiny")
    with torch.device("meta"):  # as the checkpoint loader builds models: its first use imports torch._dynamo
        Transformer(config)
    model = Transformer(config).to(device=device, dtype=dtype)
    _prepare(model, mode, device, 2, 16)()


def child(mode: str, batch: int, seq: int, device: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from slimlm.checkpoint import load_model

    _warm_up(mode, device)
    _settle()
    cuda = device == "cuda"
    base = torch.cuda.memory_allocated() if cuda else _status_kib("VmRSS") * 1024
    wdt = torch.bfloat16 if mode == "infer" and MODES[mode][1] == "bf16" else torch.float32
    _, _, model = load_model(MODEL, wdt, device)
    work = _prepare(model, mode, device, batch, seq)
    _settle()
    ready = torch.cuda.memory_allocated() if cuda else _status_kib("VmRSS") * 1024
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    work()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
    return {"baseline_bytes": base, "persistent_bytes": ready - base, "measured_bytes": peak - base,
            "work_seconds": round(seconds, 2)}


# ---- parent: predict, run children, report ---------------------------------------------------------------------

def predict(config, mode: str, batch: int, seq: int, device: str):
    from slimlm.memory import MemoryQuery, estimate_memory

    method, dtype = MODES[mode]
    if method is None:
        q = MemoryQuery(mode="infer", dtype=dtype, batch=batch, seq=seq, kv_cache_tokens=seq + NEW_TOKENS,
                        device=device)
    else:
        q = MemoryQuery(mode="train" if method == "full" else "finetune", method=method, dtype=dtype, batch=batch,
                        seq=seq, device=device)
    return estimate_memory(config, q)


PINNED = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # see the module docstring


def run_point(mode: str, batch: int, seq: int, device: str, env: dict[str, str]) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(batch), str(seq), "--device", device]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, **env})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{mode} {batch}x{seq} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", choices=list(MODES), default=list(MODES))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", default="bench/results/memory.json")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "BATCH", "SEQ"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        mode, batch, seq = args.child[0], int(args.child[1]), int(args.child[2])
        print("RESULT " + json.dumps(child(mode, batch, seq, args.device)), flush=True)
        return 0

    from slimlm.checkpoint import model_folder
    from slimlm.checkpoint.hf import read_hf_config

    config = read_hf_config(model_folder(MODEL))  # converts the GGUF once if needed; reads config.json only
    results = [measure(config, mode, batch, seq, args.device) for mode in args.only
               for batch, seq in SIZES["infer" if mode == "infer" else "train"]]
    worst = max(abs(r["error"]) for r in results)
    print(f"\nworst error {100 * worst:.1f} % (tolerance {100 * TOLERANCE:.0f} %)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": MODEL, "device": args.device, "threads": 1, "python": platform.python_version(),
            "machine": platform.machine(), "torch": _torch_version(), "date": time.strftime("%Y-%m-%d"),
            "new_tokens": NEW_TOKENS, "tolerance": TOLERANCE, "pinned_env": PINNED}
    out.write_text(json.dumps({"meta": meta, "points": results}, indent=2))
    print(f"wrote {out}")
    return 0 if worst <= TOLERANCE else 1


HEADER = ("| mode | dtype | batch x seq | predicted MiB | measured MiB (pinned) | error | measured MiB (glibc default) "
          "| error | peak phase |\n|---|---|---|---:|---:|---:|---:|---:|---|")


def measure(config, mode: str, batch: int, seq: int, device: str) -> dict:
    """Predict one point, measure it (pinned and default malloc on CPU), print its table row."""
    if not measure.printed:
        print(HEADER)
        measure.printed = True
    est = predict(config, mode, batch, seq, device)
    got = run_point(mode, batch, seq, device, PINNED if device == "cpu" else {})
    default = run_point(mode, batch, seq, device, {}) if device == "cpu" else got
    err, err_default = (est.total / g["measured_bytes"] - 1 for g in (got, default))
    mib = 2**20
    print(f"| {mode} | {MODES[mode][1]} | {batch} x {seq} | {est.total / mib:,.0f} | {got['measured_bytes'] / mib:,.0f} "
          f"| {100 * err:+.1f} % | {default['measured_bytes'] / mib:,.0f} | {100 * err_default:+.1f} % "
          f"| {est.peak_phase} |", flush=True)
    return {"mode": mode, "method": MODES[mode][0], "dtype": MODES[mode][1], "batch": batch, "seq": seq,
            "predicted_bytes": est.total, "error": round(err, 4), "error_glibc_default": round(err_default, 4),
            "peak_phase": est.peak_phase, "measured": got, "measured_glibc_default": default,
            "estimate": est.to_dict()}


measure.printed = False


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    sys.exit(main())
