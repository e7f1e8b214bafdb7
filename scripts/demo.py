"""The main job, end to end on the default model: load SmolLM2-135M-Instruct, chat, report throughput, then fine-tune
it with LoRA on the bundled extract_json task and compare base vs tuned exact match on held-out data (and run the
same LoRA recipe on 2 processes with torchrun, DDP and FSDP2, at equal losses), then serve base and adapter side by
side from one OpenAI-compatible server (registry, concurrent requests, metrics, graceful drain), then quantize the
tuned model (int8, int4) and compare quality, speed and size, then run a compression chain on it (prune MLP channels
-> distill from the tuned model -> int8) with its measured ledger, then fuse it (merge, norm folding, q/k/v and
gate/up), export it to ONNX (int8) and run it in ONNX Runtime, export it to GGUF and score it in llama.cpp, write
its container, Kubernetes/KServe and Ray Serve configs (and run the Ray Serve deployment from zero replicas), and
estimate the memory of its fine-tuning run. After the merge stage one server hosts three base models, at most two
resident. The serving stage also asks the base model for schema-constrained JSON and calls the server over gRPC with
Triton's client; the quantization stage loads the int8 model in HF transformers.

Run by `make demo` (the quick run: every stage with fewer training steps, smaller evals and fewer requests, about
10 minutes on 2 cores) and `make demo-full` (`--full`: the longer training and larger evals). Each stage prints its
name and elapsed seconds; the run ends with a table of stage times and writes one self-contained HTML report,
OUT/report.html (scripts/demo_report.py), which it checks renders in headless Chromium where one is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from demo_report import StageResult, bar_chart, check_renders, find_chromium, write_report  # beside this file

import slimlm

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Write a short poem about the sea.",
]


# The quick run (`make demo`) and the full one (`make demo-full`, --full): what each stage trains, scores and sends.
# The quick run keeps every stage and its check (the loss falls and exact match rises after LoRA, the distributed
# losses agree, speculative outputs equal plain decoding ...); the full run trains longer and scores more records.
QUICK = {
    "steps": 12,
    "eval_every": 12,
    "val": 24,
    "test": 16,
    "eval_generate": 8,
    "max_new_tokens": 32,
    "dist_steps": 2,
    "serve_requests": 8,
    "structured_requests": 4,
    "draft_steps": 6,
    "quant_test": 8,
    "ppl_tokens": 1024,
    "compress_steps": 4,
    "calib_samples": 4,
    "speed_repeats": 1,
}
FULL = {
    "steps": 60,
    "eval_every": 20,
    "val": 100,
    "test": 100,
    "eval_generate": 50,
    "max_new_tokens": 96,
    "dist_steps": 4,
    "serve_requests": 32,
    "structured_requests": 16,
    "draft_steps": 60,
    "quant_test": 40,
    "ppl_tokens": 4096,
    "compress_steps": 40,
    "calib_samples": 32,
    "speed_repeats": 3,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--compile", action="store_true", help="compile the decode step (slow first call)")
    parser.add_argument(
        "--full",
        action="store_true",
        help="the longer run (`make demo-full`): more training steps, larger evals, more requests",
    )
    parser.add_argument("--out", default="runs/demo", help="where the stages write their data, results and report")
    preset = parser.add_argument_group("sizes (default: the quick run's, or --full's)")
    preset.add_argument("--max-new-tokens", type=int, help="chat tokens per prompt (quick 32, full 96)")
    preset.add_argument("--steps", type=int, help="LoRA optimizer steps, batch 8 (quick 12, full 60)")
    preset.add_argument("--test", type=int, help="held-out test records scored by fine-tuning (quick 16, full 100)")
    preset.add_argument("--serve-requests", type=int, help="requests the serving stage sends (quick 8, full 32)")
    preset.add_argument(
        "--quant-test",
        type=int,
        help="test records per quantized, compressed, merged, exported model (quick 8, full 40)",
    )
    preset.add_argument(
        "--compress-steps", type=int, help="distillation steps of the compression chain (quick 4, full 40)"
    )
    preset.add_argument(
        "--draft-steps", type=int, help="distillation steps of the speculative draft (quick 6, full 60)"
    )
    parser.add_argument("--skip-chat", action="store_true", help="skip the chat stage")
    parser.add_argument(
        "--skip-finetune",
        action="store_true",
        help="reuse the adapter of an earlier run in --out (for the serving stage)",
    )
    parser.add_argument("--skip-serve", action="store_true", help="skip the serving stage")
    parser.add_argument("--skip-quantize", action="store_true", help="skip the quantization stage")
    parser.add_argument("--skip-compress", action="store_true", help="skip the compression chain")
    parser.add_argument("--skip-merge", action="store_true", help="skip the model-merging stage")
    parser.add_argument(
        "--only",
        default=None,
        metavar="STAGE,...",
        help="run only these stages (e.g. serve,engine), reusing what earlier runs left in --out",
    )
    args = parser.parse_args()
    for key, value in (FULL if args.full else QUICK).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    plan = stage_plan(args, Path(args.out) / "lora" / "adapter")
    results: list[StageResult] = []
    t0 = time.perf_counter()
    try:
        for i, (name, fn, fn_args) in enumerate(plan, 1):
            run_stage(results, f"[{i}/{len(plan)}] {name}", fn, *fn_args)
    finally:
        finish(args, results, time.perf_counter() - t0)


def stage_plan(args: argparse.Namespace, adapter: Path) -> list[tuple[str, Callable, tuple]]:
    """(name, stage function, its arguments before the StageResult) for every stage this run does, in order."""
    plan: list[tuple[str, Callable, tuple]] = []
    if not args.skip_chat:
        plan.append(("chat", chat_stage, (args,)))
    if not args.skip_finetune:
        plan += [("finetune", finetune_stage, (args,)), ("distributed", distributed_stage, (args,))]
    if not args.skip_serve:
        plan += [("serve", serve_stage, (args, adapter)), ("engine", engine_stage, (args, adapter))]
    if not args.skip_quantize:
        plan.append(("quantize", quantize_stage, (args, adapter)))
    if not args.skip_compress:
        plan.append(("compress", compress_stage, (args, adapter)))
    if not args.skip_merge:
        plan.append(("merge", merge_stage, (args, adapter)))
        if not args.skip_serve:
            plan.append(("multimodel", multimodel_stage, (args,)))
    plan += [
        ("export", export_stage, (args, adapter)),
        ("gguf", gguf_stage, (args, adapter)),
        ("deploy", deploy_stage, (args,)),
        ("ray", ray_stage, (args,)),
        ("estimate", estimate_stage, (args,)),
    ]
    if args.only:
        wanted = set(args.only.split(","))
        if unknown := wanted - {name for name, _, _ in plan}:
            raise SystemExit(
                f"--only: unknown or skipped stages {sorted(unknown)}; stages: {', '.join(name for name, _, _ in plan)}"
            )
        plan = [step for step in plan if step[0] in wanted]
    return plan


def run_stage(results: list[StageResult], label: str, fn: Callable, *fn_args) -> None:
    """Run one stage with a fresh StageResult (appended to `results` even if it fails), timed and announced."""
    name = label.split("] ", 1)[-1]
    doc = " ".join((fn.__doc__ or "").split("\n\n")[0].split())
    rec = StageResult(name, title=doc)
    results.append(rec)
    print(f"\n##### {label} #####", flush=True)
    t0 = time.perf_counter()
    try:
        fn(*fn_args, rec)
    except BaseException as err:
        rec.status, rec.note = "failed", f"{type(err).__name__}: {err}"
        raise
    finally:
        rec.seconds = time.perf_counter() - t0
        print(f"##### {label}: {rec.status}, {rec.seconds:.1f} s #####", flush=True)


def finish(args: argparse.Namespace, results: list[StageResult], wall: float) -> None:
    """The table of stage times, the HTML report, and the check that it renders in headless Chromium."""
    print("\n| stage | status | seconds |\n|---|---|---:|")
    for r in results:
        print(f"| {r.name} | {r.status} | {r.seconds:.1f} |")
    print(f"| total (wall) | | {wall:.1f} |", flush=True)
    run = "full (--full)" if args.full else "quick (`make demo`; `make demo-full` trains longer and scores more)"
    intro = [
        f"Model {args.model}; {run} run: {args.steps} LoRA steps, {args.test} test records for fine-tuning, "
        f"{args.quant_test} per later model, {args.serve_requests} served requests; {torch.get_num_threads()} "
        f"threads; wall time {wall:.0f} s.",
        "The full run (`make demo-full`) trains 60 LoRA steps (quick: 12) with a validation eval every 20, "
        "distils the draft 60 steps and the compressed model 40 (quick: 6 and 4), scores 100 and 40 test records "
        "(quick: 16 and 8) and 4,096 perplexity tokens (quick: 1,024), calibrates pruning on 32 sequences (quick: 4), "
        "sends 32 requests (quick: 8) and scores the GGUF files in llama.cpp (built by `make llama-lib`): same "
        "stages, steadier numbers.",
    ]
    report = write_report(results, Path(args.out) / "report.html", title="slimlm demo report", intro=intro)
    print(f"report: {report}")
    if find_chromium() is None:
        print("report render check skipped: no chromium on PATH (Debian: apt-get install chromium)")
        return
    print(check_renders(report, [r.name for r in results]), flush=True)


def chat_stage(args: argparse.Namespace, rec: StageResult) -> None:
    """A short chat with the base model: streamed answers, a batched pass, prefill and decode throughput."""
    t0 = time.perf_counter()
    print(f"== loading {args.model} (the first run converts the GGUF to an HF folder in the cache) ==", flush=True)
    llm = slimlm.load(args.model, dtype=args.dtype, compile=args.compile)
    cfg = llm.config
    print(
        f"loaded in {time.perf_counter() - t0:.1f} s from {llm.path}\n"
        f"{cfg.num_params() / 1e6:.1f} M parameters, {cfg.n_layers} layers, GQA {cfg.n_heads}/{cfg.n_kv_heads} "
        f"heads, dtype {str(llm.model.dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads\n"
    )

    rows = []
    for prompt in PROMPTS:
        print(f"user> {prompt}\nassistant> ", end="", flush=True)
        pieces = []
        for _, piece, done in llm.stream_batch([prompt], slimlm.SamplingParams(max_new_tokens=args.max_new_tokens)):
            print(piece, end="", flush=True)
            pieces.append(piece)
            if done is not None:
                rows.append(done)
        print("\n")
        rec.lines += [f"user> {prompt}", f"assistant> {''.join(pieces)}", ""]

    batch = llm.complete(PROMPTS, max_new_tokens=32)
    print("batched (3 prompts of different lengths, one pass):")
    for c in batch:
        print(f"  - {c.text[:70]!r}")

    print("\n| prompt | prompt tokens | generated | prefill tok/s | decode tok/s | finish |")
    print("|---|---:|---:|---:|---:|---|")
    for prompt, c in zip(PROMPTS, rows):
        print(
            f"| {prompt[:32]} | {c.prompt_tokens} | {c.completion_tokens} | {c.prefill_tokens_per_s:.0f} | "
            f"{c.decode_tokens_per_s:.1f} | {c.finish_reason} |"
        )
    gen = sum(c.completion_tokens for c in rows)
    dec = sum(c.decode_s for c in rows)
    print(f"\ntotal: {gen} tokens generated, mean decode {sum(c.completion_tokens - 1 for c in rows) / dec:.1f} tok/s")
    rec.numbers.update(
        {
            "parameters (M)": round(cfg.num_params() / 1e6, 1),
            "dtype": str(llm.model.dtype),
            "tokens generated": gen,
            "mean decode tok/s": round(sum(c.completion_tokens - 1 for c in rows) / dec, 1),
        }
    )
    rec.table(
        "throughput per prompt (batch 1)",
        ["prompt", "prompt tokens", "generated", "prefill tok/s", "decode tok/s", "finish"],
        [
            [
                p[:40],
                c.prompt_tokens,
                c.completion_tokens,
                round(c.prefill_tokens_per_s),
                round(c.decode_tokens_per_s, 1),
                c.finish_reason,
            ]
            for p, c in zip(PROMPTS, rows)
        ],
    )
    rec.lines += ["batched (3 prompts of different lengths, one pass):"] + [f"  - {c.text[:70]!r}" for c in batch]


def finetune_stage(args: argparse.Namespace, rec: StageResult) -> Path:
    """LoRA on extract_json: the base model's exact match, a few minutes of CPU training, the tuned exact match."""
    from slimlm.checkpoint import load_model
    from slimlm.eval.task_accuracy import chat_eval_set, generation_accuracy
    from slimlm.tasks import extract_json
    from slimlm.tokenizer import Tokenizer
    from slimlm.train.finetune import FinetuneConfig, finetune

    out = Path(args.out)
    print(f"\n== fine-tuning: LoRA on the extract_json task ({args.steps} steps of 8) ==", flush=True)
    splits = extract_json.write_splits(out / "task", n_train=2000, n_val=100, n_test=200, seed=0)
    test = chat_eval_set(splits["test"])[: args.test]
    print(f"task: {extract_json.INSTRUCTION!r}\nexample answer: {test[0][1]}")

    path, _, base = load_model(args.model, torch.float32, "cpu")
    tokenizer = Tokenizer.from_pretrained(path)
    t0 = time.perf_counter()
    base_score = generation_accuracy(base, tokenizer, test, "extract_json", max_new_tokens=48)
    print(
        f"base model exact match on {len(test)} test records: {100 * base_score['exact_match']:.1f}% "
        f"({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    del base

    # the validation loss during training on the first `args.val` validation records (all 100 in the full run)
    val = out / "task" / f"val-{args.val}.jsonl"
    val.write_text("".join(splits["val"].read_text().splitlines(keepends=True)[: args.val]))
    cfg = FinetuneConfig(
        model=args.model,
        method="lora",
        data=str(splits["train"]),
        eval_data=str(val),
        out=str(out / "lora"),
        task="extract_json",
        eval_generate=args.eval_generate,
        eval_max_new_tokens=48,
    )
    cfg.lora.r, cfg.lora.alpha = 16, 32.0
    cfg.dataset.max_seq_len = 256
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.lr, cfg.train.warmup_steps = args.steps, 8, 1e-3, 5
    cfg.train.eval_every = min(args.eval_every, args.steps)
    res = finetune(cfg)

    llm = slimlm.load(args.model, dtype="fp32", adapter=res.output)
    t0 = time.perf_counter()
    tuned_score = generation_accuracy(llm.model, llm.tokenizer, test, "extract_json", max_new_tokens=48)
    answer = llm.generate(test[0][0], max_new_tokens=48, chat=True)
    print(
        f"tuned model exact match on {len(test)} test records: {100 * tuned_score['exact_match']:.1f}% "
        f"({time.perf_counter() - t0:.0f} s)\nexample: {answer}"
    )
    t = res.train
    print("\n| model | exact match (test) | training time | tokens/s | trainable | adapter |")
    print("|---|---:|---:|---:|---:|---|")
    print(f"| base SmolLM2-135M-Instruct | {100 * base_score['exact_match']:.1f}% | - | - | - | - |")
    print(
        f"| + LoRA r=16 all-linear | {100 * tuned_score['exact_match']:.1f}% | {t.elapsed_s:.0f} s | "
        f"{t.tokens_per_s:.0f} | {100 * res.trainable / res.total:.2f}% | {res.output} |"
    )
    summary = {
        "base_exact_match": base_score["exact_match"],
        "tuned_exact_match": tuned_score["exact_match"],
        "test_records": len(test),
        "train_s": t.elapsed_s,
        "steps": t.steps,
        "tokens_per_s": t.tokens_per_s,
    }
    (out / "demo_finetune.json").write_text(json.dumps(summary, indent=2))
    print(f"training curve: {res.out / 'training.png'}")
    metrics = [json.loads(line) for line in (res.out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    rec.numbers.update(
        {
            "steps (batch 8)": t.steps,
            "first / last training loss": f"{losses[0]:.3f} / {losses[-1]:.4f}",
            "base exact match": f"{100 * base_score['exact_match']:.1f}%",
            "tuned exact match": f"{100 * tuned_score['exact_match']:.1f}%",
            "test records": len(test),
            "training s": round(t.elapsed_s),
            "tokens/s": round(t.tokens_per_s),
            "trainable": f"{100 * res.trainable / res.total:.2f}%",
        }
    )
    rec.table(
        "validation during training",
        ["step", "eval loss", "exact match", "records"],
        [
            [m["step"], round(m["eval_loss"], 4), f"{100 * m['exact_match']:.0f}%", m["n"]]
            for m in metrics
            if "eval_loss" in m and "exact_match" in m
        ],
    )
    rec.image("training curve (LoRA r=16 on extract_json)", res.out / "training.png")
    rec.lines += [
        f"task: {extract_json.INSTRUCTION}",
        f"prompt: {test[0][0][-1]['content']}",
        f"reference: {test[0][1]}",
        f"tuned answer: {answer}",
    ]
    return res.output


def distributed_stage(args: argparse.Namespace, rec: StageResult) -> None:
    """The same LoRA run on 1 process and on 2 (torchrun, DDP and FSDP2) at the same global batch: the per-step
    losses agree (on 2 cores this shows correctness, not speed)."""
    out = Path(args.out) / "distributed"
    print("\n== fine-tuning on 2 processes: slimlm finetune --nproc 2 (torchrun; DDP and FSDP2) ==", flush=True)
    common = [
        "--model",
        args.model,
        "--method",
        "lora",
        "--data",
        str(Path(args.out) / "task" / "train.jsonl"),
        "--dataset.max_seq_len",
        "256",
        "--train.batch_size",
        "8",
        "--train.max_steps",
        str(args.dist_steps),
        "--train.lr",
        "1e-3",
        "--train.warmup_steps",
        "1",
        "--train.tensorboard",
        "false",
        "--overwrite",
        "-q",
    ]
    losses = {}
    for name, extra in (
        ("1 process", []),
        ("2 processes, DDP", ["--nproc", "2"]),
        ("2 processes, FSDP2", ["--nproc", "2", "--train.strategy", "fsdp"]),
    ):
        folder = out / name.replace(" ", "").replace(",", "-")
        cmd = [sys.executable, "-m", "slimlm", "finetune", *common, "--out", str(folder), *extra]
        if extra:
            print("$ slimlm finetune ... " + " ".join(extra), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        losses[name] = ([r["loss"] for r in rows if "loss" in r], time.perf_counter() - t0)
    ref = losses["1 process"][0]
    print("| run | loss per step (global batch 8) | largest difference vs 1 process | wall s |\n|---|---|---:|---:|")
    rows = []
    for name, (values, wall) in losses.items():
        diff = max(abs(a - b) for a, b in zip(values, ref))
        print(f"| {name} | {', '.join(f'{v:.5f}' for v in values)} | {diff:.1e} | {wall:.0f} |", flush=True)
        rows.append([name, ", ".join(f"{v:.5f}" for v in values), f"{diff:.1e}", round(wall)])
    rec.table(
        "loss per step at global batch 8", ["run", "loss per step", "largest difference vs 1 process", "wall s"], rows
    )
    rec.numbers["largest loss difference vs 1 process"] = f"{max(float(r[2]) for r in rows):.1e}"


def serve_stage(args: argparse.Namespace, adapter: Path, rec: StageResult) -> None:
    """Push the adapter to a registry, start `slimlm serve`, send base and adapter requests concurrently."""
    import signal
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from slimlm.eval.task_accuracy import chat_eval_set
    from slimlm.serve.registry import Registry
    from slimlm.tasks import extract_json

    out = Path(args.out)
    print("\n== serving: base model and the LoRA adapter from one server ==", flush=True)
    registry = Registry(out / "registry")
    entry = registry.push("extract-json", adapter)
    registry.alias(entry.ref, "prod")
    print(f"registry: pushed {entry.ref} ({entry.method}, sha256 {entry.sha256[:12]}), alias prod -> {entry.ref}")

    with socket.socket() as sock, socket.socket() as sock2:
        sock.bind(("127.0.0.1", 0))
        sock2.bind(("127.0.0.1", 0))
        port, grpc_port = sock.getsockname()[1], sock2.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "slimlm.cli",
        "serve",
        "--model",
        args.model,
        "--dtype",
        "fp32",
        "--port",
        str(port),
        "--registry",
        str(out / "registry"),
        "--max-batch",
        "8",
        "--max-seq-len",
        "512",
        "--grpc-port",
        str(grpc_port),
    ]
    print("$ slimlm " + " ".join(cmd[3:]), flush=True)
    log = open(out / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        models = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        print(f"ready; GET /v1/models: {models}")
        records = chat_eval_set(out / "task" / "test.jsonl")[: args.serve_requests // 2]
        jobs = [
            (name, msgs, ref) for msgs, ref in records for name in ("smollm2-135m", "smollm2-135m:extract-json@prod")
        ]

        def ask(job):
            name, msgs, ref = job
            r = httpx.post(
                url + "/v1/chat/completions",
                timeout=600,
                json={"model": name, "messages": msgs, "max_tokens": 48, "temperature": 0},
            )
            r.raise_for_status()
            body = r.json()
            answer = body["choices"][0]["message"]["content"]
            served.append((name, msgs[-1]["content"], answer, extract_json.exact_match(answer, ref)))
            return name, extract_json.exact_match(answer, ref), body["usage"]["completion_tokens"]

        served: list[tuple[str, str, str, bool]] = []  # (model field, user message, answer, exact), for the report

        t0 = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(ask, jobs))
        wall = time.perf_counter() - t0
        tokens = sum(n for _, _, n in results)
        print(
            f"{len(jobs)} concurrent requests ({min(16, len(jobs))} in flight, base and adapter rows mixed in each "
            "batch) in "
            f"{wall:.1f} s: {len(jobs) / wall:.2f} req/s, {tokens / wall:.0f} output tok/s"
        )
        print("| model field | exact match |\n|---|---:|")
        rec.numbers.update(
            {
                "requests": len(jobs),
                "wall s": round(wall, 1),
                "req/s": round(len(jobs) / wall, 2),
                "output tok/s": round(tokens / wall),
            }
        )
        for name in ("smollm2-135m", "smollm2-135m:extract-json@prod"):
            hits = [ok for n, ok, _ in results if n == name]
            print(f"| {name} | {100 * sum(hits) / len(hits):.1f}% of {len(hits)} |")
            rec.numbers[f"exact match, model {name}"] = f"{100 * sum(hits) / len(hits):.1f}% of {len(hits)}"
        rec.table(
            "what was served (concurrent chat completions, temperature 0)",
            ["model field", "user message", "answer", "exact match"],
            [[n, m[:90], a[:120], "yes" if ok else "no"] for n, m, a, ok in sorted(served)],
        )
        structured_stage(url, records[: args.structured_requests], rec)
        grpc_stage(url, f"127.0.0.1:{grpc_port}", rec)
        metrics = httpx.get(url + "/metrics").text.splitlines()
        print("GET /metrics (excerpt):")
        for line in metrics:
            if line.startswith(
                (
                    "vllm:time_to_first_token_seconds_sum",
                    "vllm:time_to_first_token_seconds_count",
                    "vllm:generation_tokens_total",
                    "vllm:request_success_total",
                )
            ):
                print("  " + line)
                rec.lines.append("GET /metrics: " + line)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        log.close()
    print(f"SIGTERM: drained and exited with status {code}; request log (JSON lines): {out / 'server.log'}")
    rec.numbers["exit status after SIGTERM (drained)"] = code


# The extract_json answer as a JSON schema: the untuned base model, constrained by it, writes the right shape.
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 40},
        "job": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "age", "city", "job"],
    "additionalProperties": False,
}


def structured_stage(url: str, records: list, rec: StageResult) -> None:
    """The base model with `response_format: json_schema` from 8 concurrent clients: every answer parses and
    validates, and exact match rises with no training (the tuned adapter is the other way to get there)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import jsonschema

    from slimlm.tasks import extract_json

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}

    def ask(record):
        msgs, ref = record
        r = httpx.post(
            url + "/v1/chat/completions",
            timeout=600,
            json={
                "model": "smollm2-135m",
                "messages": msgs,
                "max_tokens": 64,
                "temperature": 0,
                "response_format": fmt,
            },
        )
        r.raise_for_status()
        text = r.json()["choices"][0]["message"]["content"]
        try:
            answer = json.loads(text)
            jsonschema.validate(answer, PERSON_SCHEMA)
        except (ValueError, jsonschema.ValidationError):
            return False, False, 0.0
        want = json.loads(ref)
        fields = sum(answer.get(k) == v for k, v in want.items()) / len(want)
        return True, extract_json.exact_match(text, ref), fields

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, records))
    n = len(results)
    rec.numbers.update(
        {
            "structured output: requests (base model, json_schema)": n,
            "structured output: parse and validate": f"{sum(r[0] for r in results)}/{n}",
            "structured output: exact match": f"{100 * sum(r[1] for r in results) / n:.1f}%",
        }
    )
    print(
        f"structured output: base model, response_format json_schema, {n} requests from {min(8, n)} concurrent "
        "clients in "
        f"{time.perf_counter() - t0:.1f} s: {sum(r[0] for r in results)}/{n} parse and validate; exact match "
        f"{100 * sum(r[1] for r in results) / n:.1f}%, fields right {100 * sum(r[2] for r in results) / n:.1f}% "
        "(the untuned model fills the right shape; its values, e.g. capitalised jobs, still need the tuning)",
        flush=True,
    )


def grpc_stage(url: str, grpc_url: str, rec: StageResult) -> None:
    """The same server over gRPC (KServe v2 / Triton protocol) with NVIDIA's own client: one call and one token
    stream through the adapter, compared with the HTTP completion of the same prompt."""
    import queue

    import httpx
    import numpy as np
    import tritonclient.grpc as triton

    prompt, model = "The capital of France is", "smollm2-135m:extract-json@prod"
    want = httpx.post(
        url + "/v1/completions",
        timeout=600,
        json={"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0},
    ).json()["choices"][0]["text"]

    def inputs(stream: bool) -> list:
        arrays = {
            "text_input": (np.array([prompt.encode()], dtype=np.object_), "BYTES"),
            "max_tokens": (np.array([16], dtype=np.int32), "INT32"),
            "temperature": (np.array([0.0], dtype=np.float32), "FP32"),
            "stream": (np.array([stream]), "BOOL"),
        }
        out = []
        for name, (a, kind) in arrays.items():
            out.append(triton.InferInput(name, list(a.shape), kind))
            out[-1].set_data_from_numpy(a)
        return out

    client = triton.InferenceServerClient(grpc_url)
    text = client.infer(model, inputs(False)).as_numpy("text_output")[0].decode()
    pieces: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: pieces.put((result, error)))
    client.async_stream_infer(model, inputs(True))
    streamed = []
    while True:
        result, error = pieces.get(timeout=600)
        if error is not None:
            raise RuntimeError(f"gRPC stream failed: {error}")
        streamed.append(result.as_numpy("text_output")[0].decode())
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    client.close()
    rec.numbers["gRPC (tritonclient) text equals HTTP /v1/completions"] = text == want == "".join(streamed)
    rec.lines.append(f"gRPC ModelInfer, model {model}, prompt {prompt!r}: {text!r} ({len(streamed)} streamed parts)")
    print(
        f"gRPC (tritonclient, KServe v2 ModelInfer) at {grpc_url}, model {model}: {text!r}; streamed in "
        f"{len(streamed)} responses; same text as HTTP /v1/completions: {text == want == ''.join(streamed)}",
        flush=True,
    )


def merged_model(args: argparse.Namespace, adapter: Path) -> Path:
    """The tuned model with its adapter merged (`slimlm merge`), written once per run to OUT/merged and shared by the
    engine, merge, multi-model and GGUF stages."""
    merged = Path(args.out) / "merged"
    if getattr(args, "merged_done", False):
        return merged
    subprocess.run(
        [
            sys.executable,
            "-m",
            "slimlm.cli",
            "merge",
            "--model",
            args.model,
            "--adapter",
            str(adapter),
            "--out",
            str(merged),
            "--overwrite",
        ],  # the demo owns its --out: a re-run replaces it
        check=True,
        stdout=subprocess.DEVNULL,
    )
    args.merged_done = True
    print(f"merged the adapter into {merged}", flush=True)
    return merged


def engine_stage(args: argparse.Namespace, adapter: Path, rec: StageResult) -> None:
    """The engine's speculative decoding and prefix caching on the tuned model as `slimlm serve` runs it (merged,
    int8 weights): a 6-layer draft distilled from it guesses tokens, outputs compared with plain decoding."""
    out = Path(args.out)
    draft = out / "draft"
    print(
        "\n== engine: draft-model speculative decoding and prefix caching (bench/bench_engine_features.py) ==",
        flush=True,
    )
    slimlm_cli = [sys.executable, "-m", "slimlm.cli"]
    merged = merged_model(args, adapter)
    print(f"distilling a 6-layer draft from {merged} ({args.draft_steps} steps)", flush=True)
    subprocess.run(
        slimlm_cli
        + [
            "distill",
            "--teacher",
            str(merged),
            "--student-layers",
            "6",
            "--data",
            str(out / "task" / "train.jsonl"),
            "--out",
            str(draft),
            "--train.max_steps",
            str(args.draft_steps),
            "--train.batch_size",
            "8",
            "--dataset.max_seq_len",
            "256",
            "--train.lr",
            "1e-3",
            "--train.warmup_steps",
            "5",
            "--train.eval_every",
            "100000",
            "--overwrite",
            "-q",
        ],
        check=True,
    )
    cmd = [
        sys.executable,
        str(Path(__file__).resolve().parent.parent / "bench" / "bench_engine_features.py"),
        "--model",
        str(merged),
        "--dtype",
        "fp32",
        "--quantize",
        "int8",
        "--draft",
        str(draft / "model"),
        "--spec-k",
        "3",
        "--quick",
        "--json",
        str(out / "engine_features.json"),
    ]
    subprocess.run(cmd, check=True)
    result = json.loads((out / "engine_features.json").read_text())
    spec, prefix = result["speculative"], result["prefix"]
    r = spec["rounds"][0]
    rec.numbers.update(
        {
            "draft distillation steps": args.draft_steps,
            "plain decode tok/s (int8, batch 1)": round(r["off"], 1),
            "speculative decode tok/s (draft, k=3)": round(r["on"], 1),
            "draft acceptance": f"{100 * r['acceptance']:.0f}%",
            "speculative outputs identical to plain": spec["identical"],
            "prefix cache: TTFT p50 lower by": f"{prefix['median_ratio']:.1f}x",
            "prefix cache outputs identical": prefix["identical"],
        }
    )


def _wait_ready(url: str, proc, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"slimlm serve exited with status {proc.returncode}; see its log")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"slimlm serve was not ready after {timeout:.0f} s")


def quantize_stage(args: argparse.Namespace, adapter: Path, rec: StageResult) -> None:
    """The tuned model (LoRA merged, as deployed) on fp32, int8 and int4 weights: task exact match, perplexity, speed,
    size; then the int8 one saved as compressed-tensors and loaded, quantized, by HF transformers."""
    from slimlm.eval.corpus import builtin_corpus
    from slimlm.eval.perplexity import perplexity
    from slimlm.eval.speed import SpeedConfig, measure_speed
    from slimlm.eval.task_accuracy import chat_eval_set, generation_accuracy
    from slimlm.peft import merge_adapter
    from slimlm.quantize.schemes import quantize_model_, quantized_bytes

    print("\n== quantization: the tuned model (LoRA merged) on int8 and int4 weights ==", flush=True)
    test = chat_eval_set(Path(args.out) / "task" / "test.jsonl")[: args.quant_test]
    text = builtin_corpus("heldout")
    header = [
        "weights",
        f"extract_json exact match ({len(test)} test)",
        f"perplexity (held-out, {args.ppl_tokens:,} tokens)",
        "decode tok/s",
        "weights MiB",
    ]
    print("| " + " | ".join(header) + " |\n|---|---:|---:|---:|---:|")
    rows = []
    for scheme in (None, "int8", "int4"):
        llm = slimlm.load(args.model, dtype="fp32", adapter=adapter)
        merge_adapter(llm.model)
        if scheme:
            quantize_model_(llm.model, scheme)
        score = generation_accuracy(llm.model, llm.tokenizer, test, "extract_json", max_new_tokens=48)
        ppl = perplexity(llm.model, llm.tokenizer, text, max_tokens=args.ppl_tokens, progress=False)["ppl"]
        speed = measure_speed(llm.model, SpeedConfig(new_tokens=32, repeats=args.speed_repeats))
        rows.append(
            [
                f"{scheme or 'fp32'}{' g64' if scheme == 'int4' else ''}",
                f"{100 * score['exact_match']:.1f}%",
                round(ppl, 2),
                round(speed["decode_tokens_per_s"], 1),
                round(quantized_bytes(llm.model) / 2**20),
            ]
        )
        print("| " + " | ".join(str(c) for c in rows[-1]) + " |", flush=True)
        if scheme == "int8":
            compressed_tensors_check(args, llm, rec)
    rec.table("the tuned model (LoRA merged) on fp32, int8 and int4 weights", header, rows)
    rec.numbers["decode speed-up int8 vs fp32 (batch 1)"] = f"{rows[1][3] / rows[0][3]:.1f}x"
    chart = bar_chart(
        Path(args.out) / "plots" / "quantize_speed.png",
        "decode speed, batch 1 (quantize stage)",
        [r[0] for r in rows],
        [r[3] for r in rows],
        "tokens/s",
    )
    if chart is not None:
        rec.image("speed before/after quantization: decode tokens/s of the tuned model", chart)


def compressed_tensors_check(args: argparse.Namespace, llm, rec: StageResult) -> None:
    """Save the int8 model as compressed-tensors and load it in HF transformers, quantized: same next tokens."""
    from transformers import AutoModelForCausalLM

    from slimlm.checkpoint.quantized import save_quantized

    folder = save_quantized(
        llm.model, Path(args.out) / "int8-compressed-tensors", llm.tokenizer.hf, format="compressed-tensors"
    )
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    # what transformers holds before its first forward (it decompresses to fake-quant weights then)
    packed = {n: str(p.dtype).removeprefix("torch.") for n, p in hf.model.layers[0].self_attn.q_proj.named_parameters()}
    ids = torch.tensor([llm.tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        ours, theirs = llm.model(ids)[0], hf(ids).logits[0]
    same = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    drift = (ours - theirs).abs().max().item()
    rec.numbers.update(
        {
            "compressed-tensors in HF transformers: max |Δ logit| vs slimlm": f"{drift:.1e}",
            "compressed-tensors in HF transformers: same next token": f"{100 * same:.0f}%",
        }
    )
    print(
        f"  int8 saved as compressed-tensors ({folder}): transformers loads it quantized (q_proj holds {packed}); "
        f"max |Δ logit| vs slimlm {(ours - theirs).abs().max().item():.1e}, same next token at {100 * same:.0f}% "
        "of positions",
        flush=True,
    )


def compress_stage(args: argparse.Namespace, adapter: Path, rec: StageResult) -> None:
    """`slimlm compress` on the tuned model: remove 25 % of MLP channels, distil the tuned model back into the
    pruned one on the task's training data, quantize to int8; every stage measured in a ledger."""
    import yaml

    from slimlm.compress.chain import load_compress_recipe
    from slimlm.compress.ledger import ledger_markdown
    from slimlm.compress.run import compress

    out, task = Path(args.out), Path(args.out) / "task"
    print("\n== compression chain: prune 25 % of MLP channels -> distill from the tuned model -> int8 ==", flush=True)
    recipe = {
        "model": args.model,
        "adapter": str(adapter),
        "out": str(out / "compress"),
        "measure": {
            "ppl_tokens": args.ppl_tokens,
            "task": str(task / "test.jsonl"),
            "task_metric": "extract_json",
            "task_limit": args.quant_test,
            "max_new_tokens": 48,
        },
        "stages": [
            {"prune": {"structured": "mlp", "ratio": 0.25, "calib_samples": args.calib_samples}},
            {
                "distill": {
                    "data": str(task / "train.jsonl"),
                    "alpha": 0.5,
                    "temperature": 2.0,
                    "dataset": {"max_seq_len": 256},
                    "train": {"max_steps": args.compress_steps, "batch_size": 8, "lr": 2e-4, "warmup_steps": 4},
                }
            },
            {"quantize": {"scheme": "int8"}},
        ],
    }
    path = out / "compress_recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    print(f"recipe: {path} (the same run: slimlm compress {path})", flush=True)
    rows = compress(load_compress_recipe(path))
    print("\n" + ledger_markdown(rows))
    print(f"ledger: {out / 'compress' / 'ledger.json'}, ledger.md, ledger.png")
    header, cells = markdown_table(ledger_markdown(rows))
    rec.table(f"the compression ledger ({args.compress_steps} distillation steps)", header, cells)
    rec.image(
        "the compression ledger: each stage's perplexity, accuracy, size and speed", out / "compress" / "ledger.png"
    )


def markdown_table(text: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a Markdown table (its separator line dropped)."""
    lines = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines() if line.strip()]
    return lines[0], [r for r in lines[1:] if not all(set(c) <= set("-:") for c in r)]


def merge_stage(args: argparse.Namespace, adapter: Path, rec: StageResult) -> None:
    """`slimlm merge-models` (mergekit's recipe layout): the base plus half the tuned model's task vector, beside the
    base and the tuned model, on the task's exact match and held-out perplexity (a weight-space interpolation)."""
    import slimlm
    from slimlm.checkpoint import save_hf_folder
    from slimlm.eval.corpus import builtin_corpus
    from slimlm.eval.perplexity import perplexity
    from slimlm.eval.task_accuracy import chat_eval_set, generation_accuracy

    out = Path(args.out)
    print("\n== model merging: base + 0.5 x (tuned - base), slimlm merge-models (task_arithmetic) ==", flush=True)
    base, tuned, half = out / "base", merged_model(args, adapter), out / "half-task-vector"
    llm = slimlm.load(args.model, dtype="fp32")
    save_hf_folder(llm.model, base, tokenizer=llm.tokenizer)
    slimlm_cli = [sys.executable, "-m", "slimlm.cli"]
    recipe = out / "merge_recipe.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
        f"  - {{model: {tuned}, parameters: {{weight: 0.5}}}}\ndtype: float32\n"
    )
    subprocess.run(slimlm_cli + ["merge-models", str(recipe), "--out", str(half), "--overwrite"], check=True)
    test = chat_eval_set(out / "task" / "test.jsonl")[: args.quant_test]
    text = builtin_corpus("heldout")
    header = [
        "model",
        f"extract_json exact match ({len(test)} test)",
        f"perplexity (held-out, {args.ppl_tokens:,} tokens)",
    ]
    print("| " + " | ".join(header) + " |\n|---|---:|---:|")
    rows = []
    for name, folder in (("base", base), ("base + 0.5 task vector", half), ("tuned (adapter merged)", tuned)):
        m = slimlm.load(str(folder), dtype="fp32")
        score = generation_accuracy(m.model, m.tokenizer, test, "extract_json", max_new_tokens=48)
        ppl = perplexity(m.model, m.tokenizer, text, max_tokens=args.ppl_tokens, progress=False)["ppl"]
        print(f"| {name} | {100 * score['exact_match']:.1f}% | {ppl:.2f} |", flush=True)
        rows.append([name, f"{100 * score['exact_match']:.1f}%", round(ppl, 2)])
    rec.table("task arithmetic: base + 0.5 x (tuned - base)", header, rows)


def multimodel_stage(args: argparse.Namespace, rec: StageResult) -> None:
    """One server, three base models (the base, the tuned model and the half-task-vector merge), at most two resident:
    each loads on its first request and the least recently used idle one is unloaded (`--max-models 2`)."""
    import signal
    import socket

    import httpx

    out = Path(args.out)
    print("\n== serving several base models: loaded on first request, at most 2 resident (LRU) ==", flush=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "slimlm.cli",
        "serve",
        "--model",
        args.model,
        "--port",
        str(port),
        "--models",
        f"tuned={out / 'merged'}",
        f"half={out / 'half-task-vector'}",
        "--max-models",
        "2",
        "--max-batch",
        "4",
        "--max-seq-len",
        "512",
        "--max-loras",
        "0",
    ]
    print("$ slimlm " + " ".join(cmd[3:]), flush=True)
    log = open(out / "server-multimodel.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    question = [{"role": "user", "content": "Extract the person as JSON: Maria Lopez, 34, is a nurse in Lyon."}]
    rows = []
    try:
        _wait_ready(url, proc)
        print(
            "| request | seconds (load included) | answer | resident after | server RSS MiB |\n|---|---:|---|---|---:|"
        )
        for name in ("smollm2-135m", "tuned", "half", "smollm2-135m"):
            t0 = time.perf_counter()
            r = httpx.post(
                url + "/v1/chat/completions",
                timeout=600,
                json={"model": name, "messages": question, "max_tokens": 40, "temperature": 0},
            )
            r.raise_for_status()
            seconds = time.perf_counter() - t0
            answer = r.json()["choices"][0]["message"]["content"].replace("\n", " ")[:60]
            cards = httpx.get(url + "/v1/models").json()["data"]
            resident = ",".join(m["id"] for m in cards if m.get("loaded"))
            print(f"| {name} | {seconds:.1f} | {answer} | {resident} | {_rss_mib(proc.pid):.0f} |", flush=True)
            rows.append([name, round(seconds, 1), answer, resident, round(_rss_mib(proc.pid))])
        rec.table(
            f"requests in order (user: {question[0]['content']!r})",
            ["model field", "seconds (load included)", "answer", "resident after", "server RSS MiB"],
            rows,
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        log.close()


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def export_stage(args: argparse.Namespace, adapter: Path, rec: StageResult) -> None:
    """The tuned model fused (exact passes, speed before/after) and exported to ONNX int8, run by ONNX Runtime."""
    from slimlm.eval.speed import SpeedConfig, measure_speed
    from slimlm.eval.task_accuracy import chat_eval_set, generation_accuracy
    from slimlm.export.onnx import export_onnx
    from slimlm.export.ort import OrtModel
    from slimlm.fuse import fuse_model_
    from slimlm.peft import logit_drift, merge_adapter
    from slimlm.quantize.schemes import quantize_model_

    print("\n== optimize & export: fusion, then ONNX (int8) in ONNX Runtime ==", flush=True)
    test = chat_eval_set(Path(args.out) / "task" / "test.jsonl")[: args.quant_test]
    llm = slimlm.load(args.model, dtype="fp32", adapter=adapter)
    ids = torch.tensor([llm.tokenizer.encode(PROMPTS[0])])
    speed = SpeedConfig(new_tokens=32, repeats=args.speed_repeats)
    with torch.no_grad():
        before_logits, before = llm.model(ids), measure_speed(llm.model, speed)
        reports = fuse_model_(llm.model, "merge,norms,qkv,gate_up")
        after_logits, after = llm.model(ids), measure_speed(llm.model, speed)
    for name, r in reports.items():
        print(f"  {name}: {r.summary()}")
    drift = logit_drift(before_logits, after_logits)["max_logit_diff"]
    print(
        f"fused vs unfused: max |Δ logit| {drift:.1e}; prefill {before['prefill_tokens_per_s']:.0f} -> "
        f"{after['prefill_tokens_per_s']:.0f} tok/s, decode {before['decode_tokens_per_s']:.1f} -> "
        f"{after['decode_tokens_per_s']:.1f} tok/s (fp32, batch 1)",
        flush=True,
    )
    rec.numbers["fused vs unfused: max |Δ logit|"] = f"{drift:.1e}"
    rec.lines += [f"fusion {name}: {r.summary()}" for name, r in reports.items()]
    speeds = [("fp32, unfused", before), ("fp32, fused", after)]

    q = slimlm.load(args.model, dtype="fp32", adapter=adapter)
    merge_adapter(q.model)
    quantize_model_(q.model, "int8")
    folder = Path(args.out) / "onnx-int8"
    meta = export_onnx(q.model, q.tokenizer, folder)
    print(
        f"exported {folder}: {meta['onnx_bytes'] / 2**20:.0f} MiB, {meta['export_s']:.0f} s; ORT vs the same codes "
        f"in fp32 arithmetic: max |Δ logit| {meta['parity']['max_logit_diff']:.1e} (ORT's int8-compute kernels "
        "quantize activations per block; --exact keeps fp32 arithmetic)",
        flush=True,
    )
    rec.numbers.update(
        {
            "ONNX int8 MiB": round(meta["onnx_bytes"] / 2**20),
            "export s": round(meta["export_s"]),
            "ORT vs the same codes in fp32: max |Δ logit|": f"{meta['parity']['max_logit_diff']:.1e}",
        }
    )
    ort = OrtModel(folder)
    print("| runtime (int8 weights) | extract_json exact match | prefill tok/s | decode tok/s |\n|---|---:|---:|---:|")
    rows = []
    for name, model in (("PyTorch (slimlm kernels)", q.model), ("ONNX Runtime (MatMulNBits)", ort)):
        score = generation_accuracy(model, q.tokenizer, test, "extract_json", max_new_tokens=48)
        sp = measure_speed(model, speed)
        print(
            f"| {name} | {100 * score['exact_match']:.1f}% | {sp['prefill_tokens_per_s']:.0f} | "
            f"{sp['decode_tokens_per_s']:.1f} |",
            flush=True,
        )
        rows.append(
            [
                name,
                f"{100 * score['exact_match']:.1f}% of {len(test)}",
                round(sp["prefill_tokens_per_s"]),
                round(sp["decode_tokens_per_s"], 1),
            ]
        )
        speeds.append((f"int8, {name.split(' (')[0]}", sp))
    print(f"serve it: slimlm serve --backend onnxruntime --model {folder}")
    rec.table(
        "int8 weights in PyTorch and in ONNX Runtime",
        ["runtime", "extract_json exact match", "prefill tok/s", "decode tok/s"],
        rows,
    )
    rec.table(
        "speed before/after (batch 1, 32 new tokens)",
        ["model", "prefill tok/s", "decode tok/s"],
        [[n, round(s["prefill_tokens_per_s"]), round(s["decode_tokens_per_s"], 1)] for n, s in speeds],
    )
    chart = bar_chart(
        Path(args.out) / "plots" / "export_speed.png",
        "decode speed, batch 1 (export stage)",
        [n for n, _ in speeds],
        [s["decode_tokens_per_s"] for _, s in speeds],
        "tokens/s",
    )
    if chart is not None:
        rec.image("speed before/after: fusion (fp32), then int8 weights in PyTorch and ONNX Runtime", chart)


def gguf_stage(args: argparse.Namespace, adapter: Path, rec: StageResult) -> None:
    """The tuned model as GGUF (Q8_0, Q4_0) scored in llama.cpp beside slimlm (bench/gguf_task_parity.py), and the
    adapter alone as a GGUF LoRA for llama.cpp / Ollama."""
    import glob

    out, repo = Path(args.out), Path(__file__).resolve().parent.parent
    print("\n== GGUF for llama.cpp / Ollama: the tuned model exported and scored in llama.cpp ==", flush=True)
    slimlm_cli = [sys.executable, "-m", "slimlm.cli"]
    merged = merged_model(args, adapter)
    lora = out / "gguf" / "extract-json-lora.gguf"
    subprocess.run(
        slimlm_cli
        + ["export", "gguf-lora", "--model", args.model, "--adapter", str(adapter), "--out", str(lora), "--overwrite"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    print(f"LoRA adapter as GGUF LoRA: {lora} ({lora.stat().st_size / 2**20:.1f} MiB; llama.cpp: --lora {lora.name})")
    rec.numbers["GGUF LoRA adapter MiB"] = round(lora.stat().st_size / 2**20, 1)
    if not glob.glob(str(repo / "build/llama.cpp/*/llama.cpp/build/bin/libllama.so")) and not os.environ.get(
        "LLAMA_CPP_LIB_PATH"
    ):
        # the tuned model is still written as GGUF (what an Ollama user pulls); only llama.cpp's scoring needs the lib
        gguf = out / "gguf" / "model-q8_0.gguf"
        subprocess.run(
            slimlm_cli
            + ["export", "gguf", "--model", str(merged), "--type", "q8_0", "--out", str(gguf), "--overwrite"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        print(
            f"the tuned model as GGUF Q8_0: {gguf} ({gguf.stat().st_size / 2**20:.0f} MiB); llama.cpp's library is "
            "not built (`make llama-lib`, which `make demo-full` runs): the llama.cpp scoring is skipped"
        )
        rec.numbers["tuned model as GGUF Q8_0, MiB"] = round(gguf.stat().st_size / 2**20)
        rec.numbers["llama.cpp scoring"] = "skipped: llama.cpp's library is not built (`make llama-lib`)"
        return
    proc = subprocess.run(
        [
            sys.executable,
            str(repo / "bench" / "gguf_task_parity.py"),
            "--model",
            str(merged),
            "--test",
            str(out / "task" / "test.jsonl"),
            "--n",
            str(args.quant_test),
            "--types",
            "q8_0,q4_0",
            "--keep",
            str(out / "gguf"),
        ],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    print(proc.stdout, end="", flush=True)
    header, rows = markdown_table("\n".join(line for line in proc.stdout.splitlines() if line.startswith("|")))
    rec.table(
        f"the tuned model as GGUF, scored in llama.cpp beside slimlm ({args.quant_test} test records)", header, rows
    )


def deploy_stage(args: argparse.Namespace, rec: StageResult) -> None:
    """`slimlm deploy`: the Dockerfile, Kubernetes and KServe manifests for serving the model, validated offline
    against the Kubernetes schemas (nothing is built or applied: there is no Docker daemon or cluster here)."""
    import kubernetes_validate
    import yaml

    out = Path(args.out) / "deploy"
    print("\n== deploy: Dockerfile, Kubernetes (Deployment, Service, HPA) and KServe manifests ==", flush=True)
    for target in ("docker", "k8s", "kserve"):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "slimlm.cli",
                "deploy",
                target,
                "--model",
                args.model,
                "--out",
                str(out / target),
                "--overwrite",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    docs = [d for f in sorted((out / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.37.0", strict=True)
    print(
        f"wrote {out}/docker (Dockerfile, .dockerignore), {out}/k8s ({', '.join(d['kind'] for d in docs)}: "
        f"valid against the Kubernetes 1.37 schemas), {out}/kserve (InferenceService, minReplicas 0); "
        "no image was built and no cluster used",
        flush=True,
    )
    rec.numbers["Kubernetes objects valid against the 1.37 schemas"] = ", ".join(d["kind"] for d in docs)
    rec.lines += [str(p.relative_to(out)) for p in sorted(out.rglob("*")) if p.is_file()]


def ray_stage(args: argparse.Namespace, rec: StageResult) -> None:
    """`slimlm deploy ray`: Ray Serve's config file for the server, then the deployment itself on a local Ray
    instance with min_replicas 0 (scale to zero): the first request starts a replica and is answered."""
    try:
        import ray  # noqa: F401
    except ImportError:
        print("\n== Ray Serve: skipped (pip install 'slimlm[ray]') ==")
        rec.status, rec.note = "skipped", "ray is not installed (pip install 'slimlm[ray]')"
        return
    import socket

    from openai import OpenAI
    from ray import serve

    from slimlm.serve import ray_serve
    from slimlm.serve.state import ServeConfig

    out = Path(args.out) / "deploy"
    print("\n== Ray Serve: the server as a deployment that scales to zero ==", flush=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "slimlm.cli",
            "deploy",
            "ray",
            "--model",
            args.model,
            "--min-replicas",
            "0",
            "--max-replicas",
            "2",
            "--out",
            str(out / "ray"),
            "--overwrite",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    print(f"wrote {out / 'ray' / 'serve_config.yaml'} (`serve deploy` puts it on a Ray cluster)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray_serve.start_ray(None, num_cpus=2, temp_dir=f"/tmp/slimlm-ray-{os.getpid()}")
    try:
        config = ServeConfig(model=args.model, quantize="auto")
        config.engine.max_batch, config.engine.max_seq_len, config.engine.max_loras = 4, 512, 0
        url = ray_serve.run(
            config,
            ray_serve.RayServeConfig(min_replicas=0, max_replicas=2, num_cpus=1, port=port, downscale_delay_s=10),
        )
        print(f"deployed at {url}; replicas: {ray_serve.replica_counts() or 'none (scaled to zero)'}")
        t0 = time.perf_counter()
        client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=600)
        reply = client.chat.completions.create(
            model="smollm2-135m",
            max_tokens=24,
            temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
        print(
            f"first request from zero replicas answered in {time.perf_counter() - t0:.1f} s (a replica started and "
            f"loaded the model): {reply.choices[0].message.content!r}; replicas: {ray_serve.replica_counts()}"
        )
        rec.numbers.update(
            {
                "first request from zero replicas, s": round(time.perf_counter() - t0, 1),
                "replicas after": str(ray_serve.replica_counts()),
            }
        )
        rec.lines += ["user> What is the capital of France?", f"assistant> {reply.choices[0].message.content}"]
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()


def estimate_stage(args: argparse.Namespace, rec: StageResult) -> None:
    """What the fine-tuning stage's LoRA run (batch 8 x 256 tokens, fp32) needs, from the config alone."""
    from slimlm.memory import MemoryQuery, estimate_memory
    from slimlm.memory.cli import format_estimate, model_config

    print("\n== memory estimate: the LoRA fine-tuning run of this demo ==", flush=True)
    query = MemoryQuery(mode="finetune", method="lora", batch=8, seq=256)
    text = format_estimate(estimate_memory(model_config(args.model), query), args.model, query)
    print(text)
    rec.lines += text.splitlines()
    print("(the same: slimlm estimate --model smollm2-135m --mode finetune --method lora --batch 8 --seq 256)")


if __name__ == "__main__":
    main()
