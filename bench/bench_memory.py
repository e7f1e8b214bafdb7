"""Predicted (slimlm.memory) vs measured peak memory of SmolLM2-135M: inference, LoRA, QLoRA and full fine-tuning.

    .venv/bin/python bench/bench_memory.py                       # 12 points, about 6 minutes on 2 cores
    .venv/bin/python bench/bench_memory.py --only lora full      # some modes
    .venv/bin/python bench/bench_memory.py --device cuda         # max_memory_allocated instead of RSS
    .venv/bin/python bench/bench_memory.py --world-size 2 --strategy ddp fsdp   # per rank, 8 points, ~8 minutes

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

Several processes (--world-size N --strategy ddp fsdp): each point is launched with `python -m torch.distributed.run
--standalone --nproc-per-node N` (gloo on loopback). Every rank does steps 1-3 above in its own process, through
the trainer's own multi-process path: `train.distributed.wrap_model(StepLoss(model), strategy)`, the optimizer
over the (sharded) parameters, two tiny steps before the measured one (DDP rebuilds its gradient buckets at the
second step's forward; from then on they stay resident), then `accumulate_step` on its B sequences + optimizer_step.
The table shows each rank's VmHWM - baseline (the process group and gloo's buffers from the warm-up are in the
baseline) against the per-rank estimate of MemoryQuery(batch=N x B, world_size=N, strategy=...). Pinned malloc
only; results in bench/results/memory_distributed.json.

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
# distributed: per rank, smaller (every DDP rank holds a whole model, and the ranks share the machine's memory)
SIZES = {
    "infer": [(1, 128), (4, 512), (8, 512)],
    "train": [(1, 128), (4, 256), (4, 512)],
    "distributed": [(1, 128), (2, 256)],
}
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


def _prepare(model, mode: str, device: str, batch: int, seq: int, strategy: str | None = None):
    """Apply the method and return the work to measure (a function of no arguments). With a strategy: this rank's
    training step on `batch` sequences, through the trainer's multi-process path."""
    import torch

    from slimlm.generate import SamplingParams, generate_tokens
    from slimlm.peft import apply_peft, make_config
    from slimlm.train.resume import trainable_parameters
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
    if strategy is not None:
        return _prepare_distributed(model, dtype, batch, seq, strategy)
    cfg = TrainConfig(batch_size=batch, precision=dtype)
    params = trainable_parameters(model)
    optimizer, scheduler = make_optimizer(params, cfg)

    def step(input_ids):
        with _training_mode(model, cfg.gradient_checkpointing):
            accumulate_gradients(model, [{"input_ids": input_ids, "labels": input_ids.clone()}], cfg)
            optimizer_step(optimizer, scheduler, None, list(params.values()), cfg.max_grad_norm)

    step(ids[:1, :8])  # the first step creates AdamW's states
    return lambda: step(ids)


def _prepare_distributed(model, dtype: str, batch: int, seq: int, strategy: str):
    """As train.trainer.train runs a step on several ranks: StepLoss wrapped in DDP / FSDP2, this rank's share."""
    import torch

    from slimlm.train.distributed import dist_info, wrap_model
    from slimlm.train.resume import trainable_parameters
    from slimlm.train.trainer import (
        StepLoss,
        TrainConfig,
        _training_mode,
        accumulate_step,
        make_optimizer,
        optimizer_step,
    )

    info = dist_info()
    cfg = TrainConfig(batch_size=batch * info.world_size, precision=dtype, strategy=strategy)
    wrapped = wrap_model(StepLoss(model, None, cfg.loss_chunk_size), strategy)
    params = trainable_parameters(model)  # after wrapping: FSDP2 makes them sharded DTensors
    optimizer, scheduler = make_optimizer(params, cfg)
    gen = torch.Generator().manual_seed(info.rank)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=gen)

    def step(input_ids):
        with _training_mode(model, cfg.gradient_checkpointing):
            accumulate_step(
                wrapped,
                [{"input_ids": input_ids, "labels": input_ids.clone()}],
                cfg,
                step_tokens=info.world_size * input_ids.numel(),
                world_size=info.world_size,
            )
            optimizer_step(optimizer, scheduler, None, list(params.values()), cfg.max_grad_norm)

    step(ids[:1, :8])  # AdamW's states
    step(ids[:1, :8])  # DDP rebuilds its buckets in this step's forward (the old ones are freed then)
    return lambda: step(ids)


def _warm_up(mode: str, device: str, strategy: str | None = None) -> None:
    """The same code path on a tiny random model: kernels, thread pools and arenas are then part of the baseline."""
    import torch

    from slimlm.config import ModelConfig
    from slimlm.model import Transformer

    dtype = torch.bfloat16 if mode == "infer" and MODES[mode][1] == "bf16" else torch.float32
    config = ModelConfig.from_name("tiny")
    with torch.device("meta"):  # as the checkpoint loader builds models: its first use imports torch._dynamo
        Transformer(config)
    model = Transformer(config).to(device=device, dtype=dtype)
    _prepare(model, mode, device, 2, 16, strategy)()


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
    return {
        "baseline_bytes": base,
        "persistent_bytes": ready - base,
        "measured_bytes": peak - base,
        "work_seconds": round(seconds, 2),
    }


def distributed_child(mode: str, batch: int, seq: int, strategy: str) -> dict:
    """One rank of a torchrun job: as `child`, with barriers so that every rank measures the same step."""
    import torch

    torch.set_num_threads(1)
    from slimlm.checkpoint import load_model
    from slimlm.train.distributed import barrier, dist_info, init_distributed, shutdown

    init_distributed("gloo")
    _warm_up(mode, "cpu", strategy)
    _settle()
    barrier()
    base = _status_kib("VmRSS") * 1024
    _, _, model = load_model(MODEL, torch.float32, "cpu")
    work = _prepare(model, mode, "cpu", batch, seq, strategy)
    _settle()
    barrier()
    ready = _status_kib("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    work()
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM") * 1024
    rank = dist_info().rank
    barrier()
    shutdown()
    return {
        "rank": rank,
        "baseline_bytes": base,
        "persistent_bytes": ready - base,
        "measured_bytes": peak - base,
        "work_seconds": round(seconds, 2),
    }


# ---- parent: predict, run children, report ---------------------------------------------------------------------


def predict(config, mode: str, batch: int, seq: int, device: str, world_size: int = 1, strategy: str | None = None):
    """The estimate of one point; with several processes `batch` is per rank (the query's is over all ranks)."""
    from slimlm.memory import MemoryQuery, estimate_memory

    method, dtype = MODES[mode]
    if method is None:
        q = MemoryQuery(
            mode="infer", dtype=dtype, batch=batch, seq=seq, kv_cache_tokens=seq + NEW_TOKENS, device=device
        )
    else:
        q = MemoryQuery(
            mode="train" if method == "full" else "finetune",
            method=method,
            dtype=dtype,
            batch=batch * world_size,
            seq=seq,
            device=device,
            world_size=world_size,
            strategy=strategy,
        )
    return estimate_memory(config, q)


PINNED = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # see the module docstring


def run_point(mode: str, batch: int, seq: int, device: str, env: dict[str, str]) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(batch), str(seq), "--device", device]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, **env})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{mode} {batch}x{seq} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--only", nargs="*", choices=list(MODES), default=None, help="modes (default: all; lora full with --world-size)"
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--world-size", type=int, default=1, help="processes per point (torchrun, gloo); default 1")
    ap.add_argument(
        "--strategy",
        nargs="*",
        choices=["ddp", "fsdp"],
        default=["ddp", "fsdp"],
        help="with --world-size > 1 (default: both)",
    )
    ap.add_argument(
        "--json", default=None, help="default bench/results/memory.json (memory_distributed.json with --world-size > 1)"
    )
    ap.add_argument("--child", nargs=3, metavar=("MODE", "BATCH", "SEQ"), help=argparse.SUPPRESS)
    ap.add_argument(
        "--dist-child", nargs=5, metavar=("MODE", "BATCH", "SEQ", "STRATEGY", "OUT_DIR"), help=argparse.SUPPRESS
    )
    args = ap.parse_args(argv)
    if args.child:
        mode, batch, seq = args.child[0], int(args.child[1]), int(args.child[2])
        print("RESULT " + json.dumps(child(mode, batch, seq, args.device)), flush=True)
        return 0
    if args.dist_child:
        mode, batch, seq, strategy, out_dir = args.dist_child
        result = distributed_child(mode, int(batch), int(seq), strategy)
        # One file per rank: the ranks share torchrun's stdout, where their lines could interleave.
        (Path(out_dir) / f"rank{result['rank']}.json").write_text(json.dumps(result))
        return 0
    distributed = args.world_size > 1
    if distributed and (args.device != "cpu" or "infer" in (args.only or [])):
        ap.error("--world-size measures training on CPU (gloo): drop --device cuda and the infer mode")

    from slimlm.checkpoint import model_folder
    from slimlm.checkpoint.hf import read_hf_config

    config = read_hf_config(model_folder(MODEL))  # converts the GGUF once if needed; reads config.json only
    if distributed:
        results = [
            r
            for mode in args.only or ["lora", "full"]
            for strategy in args.strategy
            for batch, seq in SIZES["distributed"]
            for r in measure_distributed(config, mode, batch, seq, args.world_size, strategy)
        ]
    else:
        results = [
            measure(config, mode, batch, seq, args.device)
            for mode in args.only or list(MODES)
            for batch, seq in SIZES["infer" if mode == "infer" else "train"]
        ]
    worst = max(abs(r["error"]) for r in results)
    print(f"\nworst error {100 * worst:.1f} % (tolerance {100 * TOLERANCE:.0f} %)")
    out = Path(args.json or f"bench/results/memory{'_distributed' if distributed else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": MODEL,
        "device": args.device,
        "threads": 1,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch": _torch_version(),
        "date": time.strftime("%Y-%m-%d"),
        "new_tokens": NEW_TOKENS,
        "tolerance": TOLERANCE,
        "pinned_env": PINNED,
        "world_size": args.world_size,
    }
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "points": results}, indent=2))
    tmp.replace(out)  # atomic: an interrupted run leaves the previous results
    print(f"wrote {out}")
    return 0 if worst <= TOLERANCE else 1


HEADER = (
    "| mode | dtype | batch x seq | predicted MiB | measured MiB (pinned) | error | measured MiB (glibc default) "
    "| error | peak phase |\n|---|---|---|---:|---:|---:|---:|---:|---|"
)


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
    print(
        f"| {mode} | {MODES[mode][1]} | {batch} x {seq} | {est.total / mib:,.0f} | {got['measured_bytes'] / mib:,.0f} "
        f"| {100 * err:+.1f} % | {default['measured_bytes'] / mib:,.0f} | {100 * err_default:+.1f} % "
        f"| {est.peak_phase} |",
        flush=True,
    )
    return {
        "mode": mode,
        "method": MODES[mode][0],
        "dtype": MODES[mode][1],
        "batch": batch,
        "seq": seq,
        "predicted_bytes": est.total,
        "error": round(err, 4),
        "error_glibc_default": round(err_default, 4),
        "peak_phase": est.peak_phase,
        "measured": got,
        "measured_glibc_default": default,
        "estimate": est.to_dict(),
    }


measure.printed = False


def run_distributed_point(mode: str, batch: int, seq: int, world_size: int, strategy: str) -> list[dict]:
    """Every rank's measurement of one point (a torchrun job of world_size processes, pinned malloc)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench_memory_") as out:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={world_size}",
            __file__,
            "--dist-child",
            mode,
            str(batch),
            str(seq),
            strategy,
            out,
        ]
        env = {**os.environ, **PINNED, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
        files = sorted(Path(out).glob("rank*.json"))
        if proc.returncode != 0 or len(files) != world_size:
            raise SystemExit(
                f"{strategy} {mode} {batch}x{seq} failed (exit {proc.returncode}, {len(files)} of "
                f"{world_size} ranks reported):\n{proc.stderr[-3000:]}"
            )
        return sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["rank"])


DIST_HEADER = (
    "| strategy | mode | batch x seq per rank | rank | predicted MiB per rank | measured MiB (pinned) | "
    "error | peak phase |\n|---|---|---|---:|---:|---:|---:|---|"
)


def measure_distributed(config, mode: str, batch: int, seq: int, world_size: int, strategy: str) -> list[dict]:
    """Predict one rank, measure every rank, print one table row per rank."""
    if not measure_distributed.printed:
        print(DIST_HEADER)
        measure_distributed.printed = True
    est = predict(config, mode, batch, seq, "cpu", world_size, strategy)
    rows = []
    for got in run_distributed_point(mode, batch, seq, world_size, strategy):
        err = est.total / got["measured_bytes"] - 1
        print(
            f"| {strategy} | {mode} | {batch} x {seq} | {got['rank']} | {est.total / 2**20:,.0f} "
            f"| {got['measured_bytes'] / 2**20:,.0f} | {100 * err:+.1f} % | {est.peak_phase} |",
            flush=True,
        )
        rows.append(
            {
                "strategy": strategy,
                "world_size": world_size,
                "mode": mode,
                "method": MODES[mode][0],
                "dtype": MODES[mode][1],
                "batch_per_rank": batch,
                "seq": seq,
                "rank": got["rank"],
                "predicted_bytes": est.total,
                "error": round(err, 4),
                "peak_phase": est.peak_phase,
                "measured": got,
                "estimate": est.to_dict(),
            }
        )
    return rows


measure_distributed.printed = False


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    sys.exit(main())
