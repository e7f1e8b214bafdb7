"""Every fine-tuning method on the same task, data and steps: trainable %, adapter size, test exact match,
training tokens/s and peak RSS.

Each method runs `slimlm.train.finetune.finetune` in its own subprocess (so peak RSS is that run's) on the bundled
extract_json task with SmolLM2-135M-Instruct, then scores greedy answers on the held-out test split. Learning
rates differ per method (each family's usual range); everything else is shared. Reproduce:

    .venv/bin/python bench/bench_methods.py --steps 40 --test 100 --json bench/results/methods.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

# method name in the table -> (slimlm method, section overrides, learning rate)
METHODS = {
    "full": ("full", {}, 5e-5),
    "lora": ("lora", {"lora": {"r": 16, "alpha": 32}}, 1e-3),
    "dora": ("lora", {"lora": {"r": 16, "alpha": 32, "use_dora": True}}, 1e-3),
    "qlora": ("qlora", {"lora": {"r": 16, "alpha": 32}}, 1e-3),
    "adapter-houlsby": ("adapter", {"adapter": {"style": "houlsby", "bottleneck": 64}}, 1e-3),
    "adapter-pfeiffer": ("adapter", {"adapter": {"style": "pfeiffer", "bottleneck": 64}}, 1e-3),
    "bitfit": ("bitfit", {"bitfit": {"train_norms": True}}, 3e-3),
    "prefix": ("prefix", {"prefix": {"num_virtual_tokens": 20, "projection": False}}, 1e-2),
    "prompt": (
        "prompt",
        {"prompt": {"num_virtual_tokens": 20, "init_text": "Extract the fields as JSON: name, age, city, job."}},
        3e-2,
    ),
}


def run_one(name: str, args: argparse.Namespace) -> dict:
    """Child process: fine-tune one method, score the test split, report."""
    import torch

    from slimlm.eval.task_accuracy import chat_eval_set, generation_accuracy
    from slimlm.peft.common import ADAPTER_WEIGHTS
    from slimlm.recipe import from_dict
    from slimlm.train.finetune import FinetuneConfig, finetune

    torch.set_num_threads(args.threads)
    method, sections, lr = METHODS[name]
    task = Path(args.out) / "task"
    cfg = from_dict(
        FinetuneConfig,
        {
            "model": args.model,
            "method": method,
            "data": str(task / "train.jsonl"),
            "out": str(Path(args.out) / name),
            "task": "extract_json",
            "dataset": {"max_seq_len": 256},
            "train": {"max_steps": args.steps, "batch_size": 8, "lr": lr, "warmup_steps": 3, "seed": 0},
            **sections,
        },
    )
    res = finetune(cfg, progress=False)
    model = _load_result(args.model, res.output, method)
    test = chat_eval_set(task / "test.jsonl")[: args.test]
    score = generation_accuracy(model.model, model.tokenizer, test, "extract_json", max_new_tokens=48)
    size = (res.output / ADAPTER_WEIGHTS) if method != "full" else res.output / "model.safetensors"
    return {
        "method": name,
        "trainable": res.trainable,
        "total": res.total,
        "trainable_percent": 100 * res.trainable / res.total,
        "file_bytes": size.stat().st_size,
        "exact_match": score["exact_match"],
        "test_records": score["n"],
        "tokens_per_s": res.train.tokens_per_s,
        "train_s": res.train.elapsed_s,
        "final_loss": res.train.final_loss,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _load_result(model: str, output: Path, method: str):
    import slimlm

    if method == "full":
        return slimlm.load(str(output), dtype="fp32")
    return slimlm.load(model, dtype="fp32", adapter=output)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/bench_methods")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_one(args.child, args)), flush=True)
        return
    from slimlm.tasks import extract_json

    extract_json.write_splits(Path(args.out) / "task", n_train=2000, n_val=100, n_test=200, seed=0)
    rows = []
    for name in args.methods.split(","):
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--child", name, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[0][7:]))
        print(f"{name}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(f"\n{args.steps} steps × batch 8, extract_json, {args.test} test records, {args.threads} threads\n")
    print("| method | trainable % | adapter file | test exact match | train tokens/s | train s | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['method']} | {r['trainable_percent']:.3f} | {r['file_bytes'] / 2**20:.2f} MiB | "
            f"{100 * r['exact_match']:.1f}% | {r['tokens_per_s']:.0f} | {r['train_s']:.0f} | {r['peak_rss_mib']:.0f} |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
