"""LoRA fine-tuning on 1 vs N processes (torchrun, CPU gloo): tokens/s and each rank's peak RSS, SmolLM2-135M.

    .venv/bin/python bench/bench_distributed.py                          # 1 vs 2 processes, ddp and fsdp
    .venv/bin/python bench/bench_distributed.py --steps 4 --seq-len 64   # a quick check
    .venv/bin/python bench/bench_distributed.py --json bench/results/distributed.json

What is measured: the real command, `slimlm finetune --method lora` (1 process) and `slimlm finetune --nproc N
--train.strategy S` (torchrun), on the same global batch (--batch samples of --seq-len tokens per optimizer step,
grad_accum 1, fp32, LoRA r=16 on every linear), --warmup + --steps steps. tokens/s = the median over the measured
steps of metrics.jsonl's tokens_per_s (input tokens of the whole global step / step time), so N processes report
the job's throughput, not one rank's. Peak RSS = the highest VmRSS sampled every 0.1 s of each process that trains
(the training ranks; not the torchrun launcher). 1 process uses every core (OMP_NUM_THREADS = cores); N processes
get cores // N threads each (what `--nproc` sets); 1 process also runs on 1 thread, for reference.

On a 2-core machine, 2 processes on the 2 cores measure correctness and memory, not scaling: the two ranks split
the same two cores one process already used, and add gloo all-reduces over loopback, so they can only be slower.
What it shows is the per-rank memory: ddp replicates the model and optimizer (each rank about one process's RSS),
fsdp shards parameters, gradients and optimizer state (with a 135M model the saving is small against the Python +
PyTorch baseline of each process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the cat sat on the mat and ran to the big house while a quick brown fox jumps over the lazy dog near "
    "the river under the moon"
).split()


def cpu_flags() -> str:
    """Model name and the SIMD flags that decide CPU matmul speed."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), platform.processor()
    )
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    simd = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "sse4"))]
    return f"{name}; {os.cpu_count()} cores; {' '.join(sorted(simd))}"


def write_data(path: Path, n: int, seq_len: int, seed: int = 0) -> Path:
    """n text records of about seq_len tokens each (plain words; the exact count depends on the tokenizer)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(seq_len))}) + "\n")
    return path


def _rss_mb(pid: int) -> float:
    try:
        line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return 0.0


def _descendants(pid: int) -> list[int]:
    """Every process under `pid`, read from /proc (Linux)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return children + [d for c in children for d in _descendants(c)]


def _training_pids(root: int) -> dict[int, int]:
    """rank -> pid of the processes under (and including) `root` that run `slimlm finetune` (not the launcher)."""
    found = {}
    for pid in [root, *_descendants(root)]:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
            env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
        except OSError:
            continue
        if "slimlm" in cmd and "finetune" in cmd and "torch.distributed.run" not in cmd and "--nproc" not in cmd:
            found[int(env.get("RANK", "0"))] = pid
    return found


def run(nproc: int, strategy: str, args: argparse.Namespace, data: Path, out: Path, threads: int | None = None) -> dict:
    """One `slimlm finetune` run; returns tokens/s, per-rank peak RSS and wall time. `threads` per rank (default:
    cores // nproc)."""
    cores = os.cpu_count() or 1
    cmd = [
        sys.executable,
        "-m",
        "slimlm",
        "finetune",
        "--model",
        args.model,
        "--method",
        "lora",
        "--data",
        str(data),
        "--out",
        str(out),
        "--train.max_steps",
        str(args.warmup + args.steps),
        "--train.batch_size",
        str(args.batch),
        "--dataset.max_seq_len",
        str(args.seq_len),
        "--train.tensorboard",
        "false",
        "--lora.r",
        "16",
        "--lora.alpha",
        "32",
        "--train.strategy",
        strategy,
        "-q",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env["OMP_NUM_THREADS"] = str(threads or max(1, cores // nproc))
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, float] = {}
    while proc.poll() is None:
        for rank, pid in _training_pids(proc.pid).items():
            peaks[rank] = max(peaks.get(rank, 0.0), _rss_mb(pid))
        time.sleep(0.1)
    log = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log[-4000:]}")
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    tok_s = [r["tokens_per_s"] for r in lines if "tokens_per_s" in r][args.warmup :]
    losses = [r["loss"] for r in lines if "loss" in r]
    return {
        "nproc": nproc,
        "strategy": strategy if nproc > 1 else "-",
        "threads_per_rank": env["OMP_NUM_THREADS"],
        "tokens_per_s": statistics.median(tok_s),
        "peak_rss_mb_per_rank": [round(peaks[r]) for r in sorted(peaks)],
        "wall_s": time.perf_counter() - t0,
        "losses": losses,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nproc", type=int, default=2, help="compared with 1 process")
    p.add_argument("--strategies", default="ddp,fsdp")
    p.add_argument("--batch", type=int, default=4, help="global samples per optimizer step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="measured steps")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of tokens/s")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    print(f"cpu: {cpu_flags()}")
    print(f"load average before: {os.getloadavg()[0]:.2f} (other work on the machine slows every run)")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp) / "train.jsonl", 64, args.seq_len)
        # 1 process on every core, and on 1 thread (on a busy machine 2 OpenMP threads can lose more to waiting for
        # each other than they gain), then N processes.
        plan = [(1, "ddp", None), (1, "ddp", 1)] + [(args.nproc, s, None) for s in args.strategies.split(",")]
        for i, (nproc, strategy, threads) in enumerate(plan):
            results.append(run(nproc, strategy, args, data, Path(tmp) / f"run{i}", threads))
            r = results[-1]
            print(
                f"{nproc} proc {r['strategy']:>4}  {r['tokens_per_s']:8.0f} tokens/s  peak RSS per rank "
                f"{r['peak_rss_mb_per_rank']} MiB  ({r['threads_per_rank']} threads/rank, {r['wall_s']:.0f} s wall)",
                flush=True,
            )
    ref = results[0]["losses"]
    for r in results[1:]:  # the same global batch: the same optimisation, up to float reassociation
        r["max_loss_diff_vs_1proc"] = max(abs(a - b) for a, b in zip(ref, r["losses"]))
        print(
            f"{r['nproc']} proc {r['strategy']}: max |loss - 1 proc loss| over the steps = "
            f"{r['max_loss_diff_vs_1proc']:.2e}"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"cpu": cpu_flags(), "args": vars(args), "results": results}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
