"""LoRA fine-tuning speed and memory of slimlm vs HF transformers + PEFT, SmolLM2-135M on CPU, each in a fresh process.

    .venv/bin/python bench/bench_finetune.py                                    # the full run (machine idle, please)
    .venv/bin/python bench/bench_finetune.py --reps 1 --steps 2 --seq-len 64    # a quick check
    .venv/bin/python bench/bench_finetune.py --engines slimlm-fp32,hf-peft-fp32 --json out/finetune.json

What is measured (see /work/shared/BENCHMARKING.md):
  * the same work for every engine: SmolLM2-135M-Instruct (the HF folder slimlm converts from the bundled GGUF,
    fp32 weights); LoRA r=16 alpha=32 dropout 0 on every linear of the decoder blocks (q k v o gate up down, not
    lm_head); AdamW lr 2e-4, betas (0.9, 0.999), weight decay 0, constant LR, grad-norm clip 1.0 (slimlm's default, as
    HF's Trainer does); one fixed batch of --batch x --seq-len token ids (sentences of a fixed English text shuffled
    per row, seeded), causal-LM loss on every token (HF labels=input_ids; slimlm Sample(ids, ids[1:] + [IGNORE]));
  * slimlm runs its real trainer, slimlm.train.trainer.train(), for --warmup + --steps steps; step times come from its
    metrics.jsonl (input tokens / tokens_per_s). HF + PEFT runs model(input_ids=ids, labels=ids, use_cache=False),
    loss.backward(), clip, AdamW step, zero_grad, timed with perf_counter, attn_implementation="sdpa". "bf16" = fp32
    weights with torch.autocast("cpu", bfloat16) around forward + loss, for both;
  * tokens/s = batch * seq_len / step time, over the --steps measured steps of all repetitions (each process drops its
    first --warmup steps): median [min-max]; ratios are medians of per-repetition paired ratios;
  * peak RSS = the child's resource.getrusage(RUSAGE_SELF).ru_maxrss at the end; "RSS after load" = its VmRSS once the
    model is loaded and LoRA applied; "baseline" = a fresh interpreter that imports torch (to subtract).
Each engine runs in a fresh subprocess with torch.set_num_threads(--threads, default 2); the engine list runs --reps
times in the same order (A, B, A, B, ...). Step-1 loss = the untrained model's loss on the batch: in fp32 slimlm and HF
must agree (a correctness check); later losses differ a little (random LoRA A init).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL = "smollm2-135m"
ENGINES = ["slimlm-fp32", "slimlm-bf16", "hf-peft-fp32", "hf-peft-bf16"]
OPTIONAL_ENGINES = ["slimlm-fp32-ckpt", "slimlm-bf16-ckpt"]  # gradient checkpointing
PEERS = ["hf-peft-bf16", "hf-peft-fp32"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
LR, CLIP = 2e-4, 1.0


def settings(engine: str) -> str:
    amp = "fp32 weights + autocast bf16" if "-bf16" in engine else "fp32"
    if engine.startswith("slimlm"):
        return f"{amp}, slimlm train()" + (", gradient checkpointing" if engine.endswith("-ckpt") else "")
    return f"{amp}, sdpa, PEFT LoRA, plain loop"


# ---- the child: one engine in a fresh process ------------------------------------------------------------------


def _rss_mb() -> float:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_slimlm(engine: str, rows: list[list[int]], n_steps: int) -> tuple[list[float], list[float], dict]:
    from slimlm.checkpoint import load_model
    from slimlm.peft import apply_peft, make_config
    from slimlm.train.batch import IGNORE, Sample
    from slimlm.train.trainer import TrainConfig, train

    _, _, model = load_model(MODEL, torch.float32, "cpu")
    apply_peft(model, "lora", make_config("lora", {**LORA, "target_modules": "all-linear"}))
    loaded = {
        "rss_after_load_mb": _rss_mb(),
        "peak_after_load_mb": _peak_mb(),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    samples = [Sample(r, r[1:] + [IGNORE]) for r in rows]
    cfg = TrainConfig(
        max_steps=n_steps,
        batch_size=len(rows),
        lr=LR,
        weight_decay=0.0,
        min_lr_ratio=1.0,
        max_grad_norm=CLIP,
        precision="bf16" if "-bf16" in engine else "fp32",
        gradient_checkpointing=engine.endswith("-ckpt"),
        log_every=1,
        seed=0,
    )
    with tempfile.TemporaryDirectory() as out:
        res = train(model, samples, cfg, out, progress=False)
        recs = [json.loads(ln) for ln in res.metrics_path.read_text().splitlines()]
    recs = [r for r in recs if "tokens_per_s" in r]
    n_tok = sum(len(r) for r in rows)  # input tokens per step (one micro-batch = the whole batch)
    return [n_tok / r["tokens_per_s"] for r in recs], [r["loss"] for r in recs], loaded


def run_hf(engine: str, rows: list[list[int]], n_steps: int) -> tuple[list[float], list[float], dict]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from slimlm.checkpoint import model_folder

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(
        str(model_folder(MODEL)), dtype=torch.float32, attn_implementation="sdpa"
    )
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    loaded = {
        "rss_after_load_mb": _rss_mb(),
        "peak_after_load_mb": _peak_mb(),
        "trainable_params": sum(p.numel() for p in params),
    }
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=0.0)
    model.train()
    torch.manual_seed(0)
    ids = torch.tensor(rows)
    times, losses = [], []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled="-bf16" in engine):
            out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        times.append(time.perf_counter() - t0)
    return times, losses, loaded


def child(engine: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if engine == "baseline":
        print("RESULT " + json.dumps({"peak_rss_mb": _peak_mb()}))
        return
    rows = json.loads(sys.stdin.read())
    fn = run_slimlm if engine.startswith("slimlm") else run_hf
    times, losses, loaded = fn(engine, rows, args.warmup + args.steps)
    print(
        "RESULT "
        + json.dumps(
            {
                "step_s": times[args.warmup :],
                "warmup_step_s": times[: args.warmup],
                "losses": losses,
                "peak_rss_mb": _peak_mb(),
                **loaded,
            }
        )
    )


# ---- the parent --------------------------------------------------------------------------------------------------


def make_rows(batch: int, seq_len: int, seed: int) -> list[list[int]]:
    """batch rows of seq_len token ids: the sentences of a fixed text, shuffled per row with seed + row."""
    from bench_generate import TEXT
    from transformers import AutoTokenizer

    from slimlm.checkpoint import model_folder

    tok = AutoTokenizer.from_pretrained(str(model_folder(MODEL)))
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(TEXT.split()))
    rows = []
    for b in range(batch):
        rng, ids = random.Random(seed + b), []
        while len(ids) < seq_len:
            rng.shuffle(sentences)
            ids += tok.encode(" ".join(sentences) + " ", add_special_tokens=False)
        rows.append(ids[:seq_len])
    return rows


def run_child(engine: str, args: argparse.Namespace, rows: list[list[int]]) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        engine,
        "--threads",
        str(args.threads),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    proc = subprocess.run(cmd, input=json.dumps(rows), capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"engine {engine} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _paired(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help=f"comma-separated subset of: {', '.join(ENGINES)} (default: all); also available: "
        f"{', '.join(OPTIONAL_ENGINES)}",
    )
    ap.add_argument(
        "--reps", type=int, default=3, help="runs of the whole engine list, each engine a fresh process (default 3)"
    )
    ap.add_argument("--steps", type=int, default=5, help="measured optimizer steps per process (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="steps per process before the measured ones (default 2)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the text shuffle (default 0)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every process (default 2)")
    ap.add_argument("--json", metavar="OUT", help="write raw results to this JSON file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES + OPTIONAL_ENGINES]
    if unknown or args.steps < 1 or args.warmup < 0:
        raise SystemExit(
            f"unknown engine(s) {unknown}; choose from {', '.join(ENGINES + OPTIONAL_ENGINES)}"
            if unknown
            else "--steps must be >= 1 and --warmup >= 0"
        )

    import peft
    from bench_generate import command_line, machine_info, versions

    info, vers, cmd = machine_info(args.threads), {**versions(), "peft": peft.__version__}, command_line()
    vers.pop("llama_cpp_python", None)
    rows = make_rows(args.batch, args.seq_len, args.seed)
    n_tok = args.batch * args.seq_len
    print(
        f"command: {cmd}\nbatch {args.batch} x {args.seq_len} tokens; {args.warmup} warm-up + {args.steps} measured "
        f"steps per process; {args.threads} threads",
        flush=True,
    )
    base = run_child("baseline", args, rows)["peak_rss_mb"]
    raw: dict[str, list[dict]] = {e: [] for e in engines}
    for rep in range(args.reps):
        for e in engines:
            raw[e].append(run_child(e, args, rows))
        print(
            f"[rep {rep + 1}/{args.reps}] "
            + "; ".join(
                f"{e} {n_tok / statistics.median(raw[e][-1]['step_s']):.0f} tok/s, {raw[e][-1]['peak_rss_mb']:.0f} MiB"
                for e in engines
            ),
            flush=True,
        )

    res = {}
    for e in engines:
        steps = [s for r in raw[e] for s in r["step_s"]]
        peak = _med(raw[e], "peak_rss_mb")
        res[e] = {
            "settings": settings(e),
            "tokens_per_s": n_tok / statistics.median(steps),
            "tokens_per_s_min": n_tok / max(steps),
            "tokens_per_s_max": n_tok / min(steps),
            "step_s_median": statistics.median(steps),
            "peak_rss_mb": peak,
            "peak_minus_baseline_mb": peak - base,
            "rss_after_load_mb": _med(raw[e], "rss_after_load_mb"),
            "trainable_params": raw[e][0]["trainable_params"],
            "step1_loss": raw[e][0]["losses"][0],
            "last_loss": raw[e][0]["losses"][-1],
        }
    tps = {e: [n_tok / statistics.median(r["step_s"]) for r in raw[e]] for e in engines}
    rss = {e: [r["peak_rss_mb"] for r in raw[e]] for e in engines}
    ratios = {
        e: {
            p: {"tokens_per_s": _paired(tps[e], tps[p]), "peak_rss": _paired(rss[e], rss[p])}
            for p in PEERS
            if p in engines and p != e
        }
        for e in engines
    }

    print(
        f"\n### LoRA r=16 fine-tuning of SmolLM2-135M, CPU, {args.threads} threads, batch {args.batch} x "
        f"{args.seq_len} tokens (median of {args.reps} processes x {args.steps} steps, min–max in brackets)\n"
    )
    print(
        "| engine | settings | tokens/s | step s | peak RSS MiB | − baseline | RSS after load | trainable | "
        "step-1 loss | last loss |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for e, r in res.items():
        print(
            f"| {e} | {r['settings']} | {r['tokens_per_s']:,.0f} [{r['tokens_per_s_min']:,.0f}–"
            f"{r['tokens_per_s_max']:,.0f}] | {r['step_s_median']:.2f} | {r['peak_rss_mb']:,.0f} | "
            f"{r['peak_minus_baseline_mb']:,.0f} | {r['rss_after_load_mb']:,.0f} | {r['trainable_params']:,} | "
            f"{r['step1_loss']:.4f} | {r['last_loss']:.4f} |"
        )
    peers = [p for p in PEERS if p in engines]
    if peers:
        print(
            "\nRatios engine / peer (median of per-repetition paired ratios; tokens/s > 1 = faster, "
            "peak RSS < 1 = less memory). Target: slimlm ≥ 2× HF + PEFT tokens/s, ≤ 0.6× its peak RSS.\n"
        )
        print("| engine | " + " | ".join(f"tokens/s ×{p} | peak RSS ×{p}" for p in peers) + " |")
        print("|---|" + "---:|" * (2 * len(peers)))
        for e in engines:
            print(
                f"| {e} | "
                + " | ".join(
                    f"{ratios[e][p]['tokens_per_s']:.2f} | {ratios[e][p]['peak_rss']:.2f}"
                    if p in ratios[e]
                    else "– | –"
                    for p in peers
                )
                + " |"
            )
    if "slimlm-fp32" in res and "hf-peft-fp32" in res:
        d = abs(res["slimlm-fp32"]["step1_loss"] - res["hf-peft-fp32"]["step1_loss"])
        print(
            f"\nfp32 step-1 loss check: |slimlm − HF| = {d:.2e} ({'OK' if d < 1e-3 else 'MISMATCH'}: same model, "
            "same tokens, no update yet)"
        )
    print(f"Baseline (fresh interpreter + import torch) peak RSS: {base:.0f} MiB; MiB = 2**20 bytes")
    print(
        f"Machine: {info['cpu']}; {args.threads} threads; oneDNN bf16 supported: "
        f"{'yes' if info['onednn_bf16_supported'] else 'no (bf16 matmuls emulated: expect slow bf16)'}"
    )
    print("Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    print(f"Command: `{cmd}`")
    if args.json:
        out = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": cmd,
            "machine": info,
            "versions": vers,
            "args": vars(args),
            "baseline_peak_rss_mb": base,
            "results": res,
            "ratios": ratios,
            "runs": raw,
            "token_ids": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
