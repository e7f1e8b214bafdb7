"""Distillation on the bundled extract_json task: a half-depth student distilled from the LoRA-tuned teacher vs the
same student trained on hard labels only (alpha = 0), same data, steps and learning rate.

    .venv/bin/python bench/bench_distill.py --out runs/distill_bench

Steps: (1) the task splits (as scripts/demo.py writes them); (2) the teacher: SmolLM2-135M-Instruct + LoRA r=16
alpha=32 all-linear, 60 steps of 8, lr 1e-3, 5 warm-up steps, max_seq_len 256 (the demo's recipe; an existing
OUT/teacher/adapter is reused); (3) the student = every other layer of the merged teacher (15 of 30), trained in
full, distilled with a top-k teacher cache (--alpha/--temperature), then (4) the hard-label student; (5) a few
steps with the teacher on the fly, to measure what the cache saves; (6) exact match on --test held-out test
records and fp32 batch-1 decode speed (slimlm.eval.speed). Prints a table and writes OUT/bench_distill.json.
Choices (steps, lr, alpha, T) are made on val, never on test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from slimlm.checkpoint import load_model
from slimlm.eval.speed import SpeedConfig, measure_speed
from slimlm.eval.task_accuracy import chat_eval_set, generation_accuracy
from slimlm.tasks import extract_json
from slimlm.tokenizer import Tokenizer
from slimlm.train.distill import DistillConfig, distill, load_teacher
from slimlm.train.finetune import FinetuneConfig, finetune

MODEL = "smollm2-135m"


def teacher_adapter(out: Path, splits: dict[str, Path], steps: int = 60) -> Path:
    """OUT/teacher/adapter: reused if present, else trained as scripts/demo.py finetune_stage does (60 steps)."""
    adapter = out / "teacher" / "adapter"
    if (adapter / "adapter_config.json").is_file():
        return adapter
    cfg = FinetuneConfig(
        model=MODEL,
        method="lora",
        data=str(splits["train"]),
        eval_data=str(splits["val"]),
        out=str(out / "teacher"),
        task="extract_json",
    )
    cfg.lora.r, cfg.lora.alpha = 16, 32.0
    cfg.dataset.max_seq_len = 256
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.lr, cfg.train.warmup_steps = steps, 8, 1e-3, 5
    return finetune(cfg).output


def student_config(
    args: argparse.Namespace, splits: dict[str, Path], adapter: Path, out: Path, alpha: float, steps: int, cache: str
) -> DistillConfig:
    cfg = DistillConfig(
        teacher=MODEL,
        teacher_adapter=str(adapter),
        student_layers=args.student_layers,
        alpha=alpha,
        temperature=args.temperature,
        kl=args.kl,
        teacher_cache=cache,
        top_k=args.top_k,
        teacher_cache_path=str(args.out / "teacher_topk.safetensors"),
        data=str(splits["train"]),
        eval_data=str(splits["val"]) if steps == args.steps else None,
        out=str(out),
    )
    cfg.dataset.max_seq_len = 256
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.lr = steps, 8, args.lr
    cfg.train.warmup_steps = min(args.warmup, steps)
    return cfg


def step_seconds(metrics: Path) -> float:
    """Mean seconds per optimizer step after the first (wall time between logged steps; no eval in between)."""
    rows = [r for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    return (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / max(len(rows) - 1, 1)


def exact_match(folder_or_model, tokenizer, test) -> float:
    model = load_model(folder_or_model)[2] if isinstance(folder_or_model, (str, Path)) else folder_or_model
    return generation_accuracy(model, tokenizer, test, "extract_json", max_new_tokens=48)["exact_match"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/distill_bench"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--kl", default="forward")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--student-layers", type=int, default=15)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--timing-steps", type=int, default=4, help="steps of the on-the-fly run that times the cache")
    p.add_argument("--teacher-steps", type=int, default=60, help="LoRA steps of the teacher (the demo's: 60)")
    args = p.parse_args()
    out = args.out
    splits = {s: out / "task" / f"{s}.jsonl" for s in ("train", "val", "test")}
    if not all(f.is_file() for f in splits.values()):
        splits = extract_json.write_splits(out / "task", n_train=2000, n_val=100, n_test=200, seed=0)
    test = chat_eval_set(splits["test"])[: args.test]
    t0 = time.perf_counter()
    adapter = teacher_adapter(out, splits, args.teacher_steps)
    teacher_train_s = time.perf_counter() - t0

    path, teacher = load_teacher(MODEL, str(adapter), torch.device("cpu"))
    tokenizer = Tokenizer.from_pretrained(path)
    runs, em, speed = {}, {}, {}
    plan = (
        ("distilled", args.alpha, args.steps, "topk"),
        ("hard_labels", 0.0, args.steps, "none"),
        ("online_timing", args.alpha, args.timing_steps, "none"),
    )
    for name, alpha, steps, cache in plan:  # results are written after every stage (a long run can be cut short)
        t0 = time.perf_counter()
        res = distill(student_config(args, splits, adapter, out / name, alpha, steps, cache), progress=False)
        runs[name] = {"res": res, "wall_s": time.perf_counter() - t0, "step_s": step_seconds(res.train.metrics_path)}
        print(
            f"{name}: {res.train.steps} steps, final loss {res.train.final_loss:.4f}, eval {res.train.eval_metrics}, "
            f"{runs[name]['step_s']:.1f} s/step, {runs[name]['wall_s']:.0f} s wall",
            flush=True,
        )
        if name != "online_timing":
            em[name] = exact_match(res.output, tokenizer, test)
            print(f"{name}: exact match {100 * em[name]:.1f} % on {len(test)} test records", flush=True)
        if name == "hard_labels":
            em["teacher"] = exact_match(teacher, tokenizer, test)
            speed_cfg = SpeedConfig(prompt_tokens=128, new_tokens=32, warmup=1, repeats=3)
            student = load_model(runs["distilled"]["res"].output)[2]
            speed = {
                "teacher": measure_speed(teacher, speed_cfg)["decode_tokens_per_s"],
                "student": measure_speed(student, speed_cfg)["decode_tokens_per_s"],
            }
            print(f"teacher exact match {100 * em['teacher']:.1f} %; decode tok/s {speed}", flush=True)
        write_json(args, runs, em, speed, teacher_train_s)
    report(args, runs, em, speed, teacher_train_s)


def write_json(args, runs, em, speed, teacher_train_s) -> None:
    summary = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "exact_match": em,
        "decode_tokens_per_s": speed,
        "teacher_train_s": teacher_train_s,
        "runs": {
            k: {
                "train_s": r["res"].train.elapsed_s,
                "wall_s": r["wall_s"],
                "step_s": r["step_s"],
                "final_loss": r["res"].train.final_loss,
                "val": r["res"].train.eval_metrics,
                "cache": r["res"].cache,
                "student_params": r["res"].student_params,
                "teacher_params": r["res"].teacher_params,
            }
            for k, r in runs.items()
        },
    }
    (args.out / "bench_distill.json").write_text(json.dumps(summary, indent=2))


def report(args, runs, em, speed, teacher_train_s) -> None:
    kd, hard, online = runs["distilled"], runs["hard_labels"], runs["online_timing"]
    cache = kd["res"].cache
    rows = [
        ("teacher (30 layers, LoRA merged)", em["teacher"], kd["res"].teacher_params, speed["teacher"], "-", "-"),
        (
            f"distilled student ({args.student_layers} layers, α={args.alpha}, T={args.temperature}, {args.kl} KL, "
            f"top-{args.top_k} cache)",
            em["distilled"],
            kd["res"].student_params,
            speed["student"],
            f"{kd['res'].train.elapsed_s:.0f} s + cache {cache['build_s']:.0f} s",
            kd["res"].train.eval_metrics,
        ),
        (
            f"hard-label student (α=0, {args.student_layers} layers)",
            em["hard_labels"],
            hard["res"].student_params,
            speed["student"],
            f"{hard['res'].train.elapsed_s:.0f} s",
            hard["res"].train.eval_metrics,
        ),
    ]
    print(f"\nextract_json, {args.test} test records, {args.steps} steps × 8, lr {args.lr}")
    print("| model | exact match | params | decode tok/s (fp32, batch 1) | training | val |")
    print("|---|---:|---:|---:|---:|---|")
    for name, e, n, s, t, v in rows:
        print(f"| {name} | {100 * e:.1f} % | {n / 1e6:.1f} M | {s:.1f} | {t} | {v} |")
    saved = online["step_s"] - kd["step_s"]
    print(
        f"\nteacher on the fly: {online['step_s']:.1f} s/step; cached top-{args.top_k}: {kd['step_s']:.1f} s/step "
        f"(saves {saved:.1f} s/step); the cache pre-pass took {cache['build_s']:.0f} s for {cache['built_samples']} "
        f"samples ({cache['build_s'] / max(args.steps, 1):.1f} s per step of this run); hard labels: "
        f"{hard['step_s']:.1f} s/step"
    )
    ratio = em["distilled"] / max(em["teacher"], 1e-9)
    print(
        f"targets: student EM / teacher EM = {100 * ratio:.0f} % (target ≥ 90 %), speed-up "
        f"{speed['student'] / speed['teacher']:.2f}× (target ≥ 1.6×), "
        f"distilled {'beats' if em['distilled'] > em['hard_labels'] else 'does NOT beat'} hard labels"
    )
    print(f"wrote {args.out / 'bench_distill.json'}")


if __name__ == "__main__":
    main()
