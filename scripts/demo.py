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

Run by `make demo`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

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
    parser.add_argument("--out", default="runs/demo", help="where the fine-tuning stage writes its data and results")
    parser.add_argument("--steps", type=int, default=60, help="LoRA optimizer steps (batch 8)")
    parser.add_argument("--test", type=int, default=100, help="held-out test records to score")
    parser.add_argument("--skip-chat", action="store_true", help="skip the chat stage")
    parser.add_argument("--skip-finetune", action="store_true",
                        help="reuse the adapter of an earlier run in --out (for the serving stage)")
    parser.add_argument("--serve-requests", type=int, default=32, help="requests the serving stage sends")
    parser.add_argument("--quant-test", type=int, default=40, help="test records scored per quantized model")
    parser.add_argument("--skip-serve", action="store_true", help="skip the serving stage")
    parser.add_argument("--skip-quantize", action="store_true", help="skip the quantization stage")
    parser.add_argument("--compress-steps", type=int, default=40, help="distillation steps of the compression chain")
    parser.add_argument("--draft-steps", type=int, default=60, help="distillation steps of the speculative draft")
    parser.add_argument("--skip-compress", action="store_true", help="skip the compression chain")
    parser.add_argument("--skip-merge", action="store_true", help="skip the model-merging stage")
    args = parser.parse_args()
    torch.manual_seed(0)

    if not args.skip_chat:
        chat_stage(args)
    adapter = Path(args.out) / "lora" / "adapter" if args.skip_finetune else finetune_stage(args)
    if not args.skip_finetune:
        distributed_stage(args)
    if not args.skip_serve:
        serve_stage(args, adapter)
        engine_stage(args, adapter)
    if not args.skip_quantize:
        quantize_stage(args, adapter)
    if not args.skip_compress:
        compress_stage(args, adapter)
    if not args.skip_merge:
        merge_stage(args, adapter)
        if not args.skip_serve:
            multimodel_stage(args)
    export_stage(args, adapter)


def chat_stage(args: argparse.Namespace) -> None:
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


def finetune_stage(args: argparse.Namespace) -> None:
    """LoRA on extract_json: the base model's exact match, a few minutes of CPU training, the tuned exact match."""
    from slimlm.checkpoint import load_model
    from slimlm.tasks import extract_json
    from slimlm.tokenizer import Tokenizer
    from slimlm.train.evaluate import chat_eval_set, generation_accuracy
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
    print(f"base model exact match on {len(test)} test records: {100 * base_score['exact_match']:.1f}% "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    del base

    cfg = FinetuneConfig(model=args.model, method="lora", data=str(splits["train"]), eval_data=str(splits["val"]),
                         out=str(out / "lora"), task="extract_json", eval_generate=50, eval_max_new_tokens=48)
    cfg.lora.r, cfg.lora.alpha = 16, 32.0
    cfg.dataset.max_seq_len = 256
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.lr, cfg.train.warmup_steps = args.steps, 8, 1e-3, 5
    cfg.train.eval_every = max(args.steps // 3, 1)
    res = finetune(cfg)

    llm = slimlm.load(args.model, dtype="fp32", adapter=res.output)
    t0 = time.perf_counter()
    tuned_score = generation_accuracy(llm.model, llm.tokenizer, test, "extract_json", max_new_tokens=48)
    answer = llm.generate(test[0][0], max_new_tokens=48, chat=True)
    print(f"tuned model exact match on {len(test)} test records: {100 * tuned_score['exact_match']:.1f}% "
          f"({time.perf_counter() - t0:.0f} s)\nexample: {answer}")
    t = res.train
    print("\n| model | exact match (test) | training time | tokens/s | trainable | adapter |")
    print("|---|---:|---:|---:|---:|---|")
    print(f"| base SmolLM2-135M-Instruct | {100 * base_score['exact_match']:.1f}% | - | - | - | - |")
    print(f"| + LoRA r=16 all-linear | {100 * tuned_score['exact_match']:.1f}% | {t.elapsed_s:.0f} s | "
          f"{t.tokens_per_s:.0f} | {100 * res.trainable / res.total:.2f}% | {res.output} |")
    summary = {"base_exact_match": base_score["exact_match"], "tuned_exact_match": tuned_score["exact_match"],
               "test_records": len(test), "train_s": t.elapsed_s, "steps": t.steps, "tokens_per_s": t.tokens_per_s}
    (out / "demo_finetune.json").write_text(json.dumps(summary, indent=2))
    print(f"training curve: {res.out / 'training.png'}")
    return res.output


def distributed_stage(args: argparse.Namespace) -> None:
    """The same LoRA run on 1 process and on 2 (torchrun, DDP and FSDP2) at the same global batch: the per-step
    losses agree (on 2 cores this shows correctness, not speed)."""
    out = Path(args.out) / "distributed"
    print("\n== fine-tuning on 2 processes: slimlm finetune --nproc 2 (torchrun; DDP and FSDP2) ==", flush=True)
    common = ["--model", args.model, "--method", "lora", "--data", str(Path(args.out) / "task" / "train.jsonl"),
              "--dataset.max_seq_len", "256", "--train.batch_size", "8", "--train.max_steps", "4",
              "--train.lr", "1e-3", "--train.warmup_steps", "1", "--train.tensorboard", "false", "--overwrite", "-q"]
    losses = {}
    for name, extra in (("1 process", []), ("2 processes, DDP", ["--nproc", "2"]),
                        ("2 processes, FSDP2", ["--nproc", "2", "--train.strategy", "fsdp"])):
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
    for name, (values, wall) in losses.items():
        diff = max(abs(a - b) for a, b in zip(values, ref))
        print(f"| {name} | {', '.join(f'{v:.5f}' for v in values)} | {diff:.1e} | {wall:.0f} |", flush=True)


def serve_stage(args: argparse.Namespace, adapter: Path) -> None:
    """Push the adapter to a registry, start `slimlm serve`, send base and adapter requests concurrently."""
    import signal
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from slimlm.serve.registry import Registry
    from slimlm.tasks import extract_json
    from slimlm.train.evaluate import chat_eval_set

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
    cmd = [sys.executable, "-m", "slimlm.cli", "serve", "--model", args.model, "--dtype", "fp32", "--port", str(port),
           "--registry", str(out / "registry"), "--max-batch", "8", "--max-seq-len", "512",
           "--grpc-port", str(grpc_port)]
    print("$ slimlm " + " ".join(cmd[3:]), flush=True)
    log = open(out / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        models = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        print(f"ready; GET /v1/models: {models}")
        records = chat_eval_set(out / "task" / "test.jsonl")[: args.serve_requests // 2]
        jobs = [(name, msgs, ref) for msgs, ref in records for name in ("smollm2-135m", "smollm2-135m:extract-json@prod")]

        def ask(job):
            name, msgs, ref = job
            r = httpx.post(url + "/v1/chat/completions", timeout=600, json={
                "model": name, "messages": msgs, "max_tokens": 48, "temperature": 0})
            r.raise_for_status()
            body = r.json()
            return name, extract_json.exact_match(body["choices"][0]["message"]["content"], ref), \
                body["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(ask, jobs))
        wall = time.perf_counter() - t0
        tokens = sum(n for _, _, n in results)
        print(f"{len(jobs)} concurrent requests (16 in flight, base and adapter rows mixed in each batch) in "
              f"{wall:.1f} s: {len(jobs) / wall:.2f} req/s, {tokens / wall:.0f} output tok/s")
        print("| model field | exact match |\n|---|---:|")
        for name in ("smollm2-135m", "smollm2-135m:extract-json@prod"):
            hits = [ok for n, ok, _ in results if n == name]
            print(f"| {name} | {100 * sum(hits) / len(hits):.1f}% of {len(hits)} |")
        structured_stage(url, records)
        grpc_stage(url, f"127.0.0.1:{grpc_port}")
        metrics = httpx.get(url + "/metrics").text.splitlines()
        print("GET /metrics (excerpt):")
        for line in metrics:
            if line.startswith(("vllm:time_to_first_token_seconds_sum", "vllm:time_to_first_token_seconds_count",
                                "vllm:generation_tokens_total", "vllm:request_success_total")):
                print("  " + line)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        log.close()
    print(f"SIGTERM: drained and exited with status {code}; request log (JSON lines): {out / 'server.log'}")


# The extract_json answer as a JSON schema: the untuned base model, constrained by it, writes the right shape.
PERSON_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "maxLength": 40}, "job": {"type": "string", "maxLength": 40}},
    "required": ["name", "age", "city", "job"], "additionalProperties": False}


def structured_stage(url: str, records: list) -> None:
    """The base model with `response_format: json_schema` from 8 concurrent clients: every answer parses and
    validates, and exact match rises with no training (the tuned adapter is the other way to get there)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import jsonschema

    from slimlm.tasks import extract_json

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}

    def ask(record):
        msgs, ref = record
        r = httpx.post(url + "/v1/chat/completions", timeout=600, json={
            "model": "smollm2-135m", "messages": msgs, "max_tokens": 64, "temperature": 0, "response_format": fmt})
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
    print(f"structured output: base model, response_format json_schema, {n} requests from 8 concurrent clients in "
          f"{time.perf_counter() - t0:.1f} s: {sum(r[0] for r in results)}/{n} parse and validate; exact match "
          f"{100 * sum(r[1] for r in results) / n:.1f}%, fields right {100 * sum(r[2] for r in results) / n:.1f}% "
          "(the untuned model fills the right shape; its values, e.g. capitalised jobs, still need the tuning)",
          flush=True)


def grpc_stage(url: str, grpc_url: str) -> None:
    """The same server over gRPC (KServe v2 / Triton protocol) with NVIDIA's own client: one call and one token
    stream through the adapter, compared with the HTTP completion of the same prompt."""
    import queue

    import httpx
    import numpy as np
    import tritonclient.grpc as triton

    prompt, model = "The capital of France is", "smollm2-135m:extract-json@prod"
    want = httpx.post(url + "/v1/completions", timeout=600, json={
        "model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0}).json()["choices"][0]["text"]

    def inputs(stream: bool) -> list:
        arrays = {"text_input": (np.array([prompt.encode()], dtype=np.object_), "BYTES"),
                  "max_tokens": (np.array([16], dtype=np.int32), "INT32"),
                  "temperature": (np.array([0.0], dtype=np.float32), "FP32"), "stream": (np.array([stream]), "BOOL")}
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
    print(f"gRPC (tritonclient, KServe v2 ModelInfer) at {grpc_url}, model {model}: {text!r}; streamed in "
          f"{len(streamed)} responses; same text as HTTP /v1/completions: {text == want == ''.join(streamed)}",
          flush=True)


def engine_stage(args: argparse.Namespace, adapter: Path) -> None:
    """The engine's speculative decoding and prefix caching on the tuned model as `slimlm serve` runs it (merged,
    int8 weights): a 6-layer draft distilled from it guesses tokens, outputs compared with plain decoding."""
    out = Path(args.out)
    merged, draft = out / "merged", out / "draft"
    print("\n== engine: draft-model speculative decoding and prefix caching (bench/bench_engine_features.py) ==",
          flush=True)
    slimlm_cli = [sys.executable, "-m", "slimlm.cli"]
    subprocess.run(slimlm_cli + ["merge", "--model", args.model, "--adapter", str(adapter), "--out", str(merged),
                                 "--overwrite"],  # the demo owns its --out: a re-run replaces it
                   check=True, stdout=subprocess.DEVNULL)
    print(f"merged the adapter into {merged}; distilling a 6-layer draft from it ({args.draft_steps} steps)",
          flush=True)
    subprocess.run(slimlm_cli + ["distill", "--teacher", str(merged), "--student-layers", "6", "--data",
                                 str(out / "task" / "train.jsonl"), "--out", str(draft), "--train.max_steps",
                                 str(args.draft_steps), "--train.batch_size", "8", "--dataset.max_seq_len", "256",
                                 "--train.lr", "1e-3", "--train.warmup_steps", "5", "--train.eval_every", "100000",
                                 "--overwrite", "-q"], check=True)
    cmd = [sys.executable, str(Path(__file__).resolve().parent.parent / "bench" / "bench_engine_features.py"),
           "--model", str(merged), "--dtype", "fp32", "--quantize", "int8", "--draft", str(draft / "model"),
           "--spec-k", "3", "--quick"]
    subprocess.run(cmd, check=True)


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


def quantize_stage(args: argparse.Namespace, adapter: Path) -> None:
    """The tuned model (LoRA merged, as deployed) on fp32, int8 and int4 weights: task exact match, perplexity, speed,
    size; then the int8 one saved as compressed-tensors and loaded, quantized, by HF transformers."""
    from slimlm.eval.corpus import builtin_corpus
    from slimlm.eval.perplexity import perplexity
    from slimlm.eval.speed import SpeedConfig, measure_speed
    from slimlm.peft import merge_adapter
    from slimlm.quantize.model import quantize_model_, quantized_bytes
    from slimlm.train.evaluate import chat_eval_set, generation_accuracy

    print("\n== quantization: the tuned model (LoRA merged) on int8 and int4 weights ==", flush=True)
    test = chat_eval_set(Path(args.out) / "task" / "test.jsonl")[: args.quant_test]
    text = builtin_corpus("heldout")
    print(f"| weights | extract_json exact match ({len(test)} test) | perplexity (held-out, 4,096 tokens) "
          "| decode tok/s | weights MiB |\n|---|---:|---:|---:|---:|")
    for scheme in (None, "int8", "int4"):
        llm = slimlm.load(args.model, dtype="fp32", adapter=adapter)
        merge_adapter(llm.model)
        if scheme:
            quantize_model_(llm.model, scheme)
        score = generation_accuracy(llm.model, llm.tokenizer, test, "extract_json", max_new_tokens=48)
        ppl = perplexity(llm.model, llm.tokenizer, text, max_tokens=4096, progress=False)["ppl"]
        speed = measure_speed(llm.model, SpeedConfig(new_tokens=32, repeats=3))
        print(f"| {scheme or 'fp32'}{' g64' if scheme == 'int4' else ''} | {100 * score['exact_match']:.1f}% | "
              f"{ppl:.2f} | {speed['decode_tokens_per_s']:.1f} | {quantized_bytes(llm.model) / 2**20:,.0f} |",
              flush=True)
        if scheme == "int8":
            compressed_tensors_check(args, llm)


def compressed_tensors_check(args: argparse.Namespace, llm) -> None:
    """Save the int8 model as compressed-tensors and load it in HF transformers, quantized: same next tokens."""
    from transformers import AutoModelForCausalLM

    from slimlm.quantize.model import save_quantized

    folder = save_quantized(llm.model, Path(args.out) / "int8-compressed-tensors", llm.tokenizer.hf,
                            format="compressed-tensors")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    # what transformers holds before its first forward (it decompresses to fake-quant weights then)
    packed = {n: str(p.dtype).removeprefix("torch.") for n, p in hf.model.layers[0].self_attn.q_proj.named_parameters()}
    ids = torch.tensor([llm.tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        ours, theirs = llm.model(ids)[0], hf(ids).logits[0]
    same = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    print(f"  int8 saved as compressed-tensors ({folder}): transformers loads it quantized (q_proj holds {packed}); "
          f"max |Δ logit| vs slimlm {(ours - theirs).abs().max().item():.1e}, same next token at {100 * same:.0f}% "
          "of positions", flush=True)


def compress_stage(args: argparse.Namespace, adapter: Path) -> None:
    """`slimlm compress` on the tuned model: remove 25 % of MLP channels, distil the tuned model back into the
    pruned one on the task's training data, quantize to int8; every stage measured in a ledger."""
    import yaml

    from slimlm.compress.ledger import ledger_markdown
    from slimlm.compress.recipe import load_compress_recipe
    from slimlm.compress.run import compress

    out, task = Path(args.out), Path(args.out) / "task"
    print("\n== compression chain: prune 25 % of MLP channels -> distill from the tuned model -> int8 ==",
          flush=True)
    recipe = {
        "model": args.model, "adapter": str(adapter), "out": str(out / "compress"),
        "measure": {"ppl_tokens": 4096, "task": str(task / "test.jsonl"), "task_metric": "extract_json",
                    "task_limit": args.quant_test, "max_new_tokens": 48},
        "stages": [
            {"prune": {"structured": "mlp", "ratio": 0.25}},
            {"distill": {"data": str(task / "train.jsonl"), "alpha": 0.5, "temperature": 2.0,
                         "dataset": {"max_seq_len": 256},
                         "train": {"max_steps": args.compress_steps, "batch_size": 8, "lr": 2e-4,
                                   "warmup_steps": 4}}},
            {"quantize": {"scheme": "int8"}},
        ],
    }
    path = out / "compress_recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    print(f"recipe: {path} (the same run: slimlm compress {path})", flush=True)
    rows = compress(load_compress_recipe(path))
    print("\n" + ledger_markdown(rows))
    print(f"ledger: {out / 'compress' / 'ledger.json'}, ledger.md, ledger.png")


def merge_stage(args: argparse.Namespace, adapter: Path) -> None:
    """`slimlm merge-models` (mergekit's recipe layout): the base plus half the tuned model's task vector, beside the
    base and the tuned model, on the task's exact match and held-out perplexity (a weight-space interpolation)."""
    import slimlm
    from slimlm.checkpoint import save_hf_folder
    from slimlm.eval.corpus import builtin_corpus
    from slimlm.eval.perplexity import perplexity
    from slimlm.train.evaluate import chat_eval_set, generation_accuracy

    out = Path(args.out)
    print("\n== model merging: base + 0.5 x (tuned - base), slimlm merge-models (task_arithmetic) ==", flush=True)
    base, tuned, half = out / "base", out / "tuned-merged", out / "half-task-vector"
    llm = slimlm.load(args.model, dtype="fp32")
    save_hf_folder(llm.model, base, tokenizer=llm.tokenizer)
    slimlm_cli = [sys.executable, "-m", "slimlm.cli"]
    subprocess.run(slimlm_cli + ["merge", "--model", args.model, "--adapter", str(adapter), "--out", str(tuned),
                                 "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    recipe = out / "merge_recipe.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                      f"  - {{model: {tuned}, parameters: {{weight: 0.5}}}}\ndtype: float32\n")
    subprocess.run(slimlm_cli + ["merge-models", str(recipe), "--out", str(half), "--overwrite"], check=True)
    test = chat_eval_set(out / "task" / "test.jsonl")[: args.quant_test]
    text = builtin_corpus("heldout")
    print(f"| model | extract_json exact match ({len(test)} test) | perplexity (held-out, 4,096 tokens) |\n"
          "|---|---:|---:|")
    for name, folder in (("base", base), ("base + 0.5 task vector", half), ("tuned (adapter merged)", tuned)):
        m = slimlm.load(str(folder), dtype="fp32")
        score = generation_accuracy(m.model, m.tokenizer, test, "extract_json", max_new_tokens=48)
        ppl = perplexity(m.model, m.tokenizer, text, max_tokens=4096, progress=False)["ppl"]
        print(f"| {name} | {100 * score['exact_match']:.1f}% | {ppl:.2f} |", flush=True)


def multimodel_stage(args: argparse.Namespace) -> None:
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
    cmd = [sys.executable, "-m", "slimlm.cli", "serve", "--model", args.model, "--port", str(port),
           "--models", f"tuned={out / 'tuned-merged'}", f"half={out / 'half-task-vector'}", "--max-models", "2",
           "--max-batch", "4", "--max-seq-len", "512", "--max-loras", "0"]
    print("$ slimlm " + " ".join(cmd[3:]), flush=True)
    log = open(out / "server-multimodel.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    question = [{"role": "user", "content": "Extract the person as JSON: Maria Lopez, 34, is a nurse in Lyon."}]
    try:
        _wait_ready(url, proc)
        print("| request | seconds (load included) | answer | resident after | server RSS MiB |\n|---|---:|---|---|---:|")
        for name in ("smollm2-135m", "tuned", "half", "smollm2-135m"):
            t0 = time.perf_counter()
            r = httpx.post(url + "/v1/chat/completions", timeout=600, json={
                "model": name, "messages": question, "max_tokens": 40, "temperature": 0})
            r.raise_for_status()
            seconds = time.perf_counter() - t0
            answer = r.json()["choices"][0]["message"]["content"].replace("\n", " ")[:60]
            cards = httpx.get(url + "/v1/models").json()["data"]
            resident = ",".join(m["id"] for m in cards if m.get("loaded"))
            print(f"| {name} | {seconds:.1f} | {answer} | {resident} | {_rss_mib(proc.pid):.0f} |", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        log.close()


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def export_stage(args: argparse.Namespace, adapter: Path) -> None:
    """The tuned model fused (exact passes, speed before/after) and exported to ONNX int8, run by ONNX Runtime."""
    from slimlm.eval.speed import SpeedConfig, measure_speed
    from slimlm.export.onnx import export_onnx
    from slimlm.export.ort import OrtModel
    from slimlm.fuse import fuse_model_
    from slimlm.peft import logit_drift, merge_adapter
    from slimlm.quantize.model import quantize_model_
    from slimlm.train.evaluate import chat_eval_set, generation_accuracy

    print("\n== optimize & export: fusion, then ONNX (int8) in ONNX Runtime ==", flush=True)
    test = chat_eval_set(Path(args.out) / "task" / "test.jsonl")[: args.quant_test]
    llm = slimlm.load(args.model, dtype="fp32", adapter=adapter)
    ids = torch.tensor([llm.tokenizer.encode(PROMPTS[0])])
    speed = SpeedConfig(new_tokens=32, repeats=3)
    with torch.no_grad():
        before_logits, before = llm.model(ids), measure_speed(llm.model, speed)
        reports = fuse_model_(llm.model, "merge,norms,qkv,gate_up")
        after_logits, after = llm.model(ids), measure_speed(llm.model, speed)
    for name, r in reports.items():
        print(f"  {name}: {r.summary()}")
    drift = logit_drift(before_logits, after_logits)["max_logit_diff"]
    print(f"fused vs unfused: max |Δ logit| {drift:.1e}; prefill {before['prefill_tokens_per_s']:.0f} -> "
          f"{after['prefill_tokens_per_s']:.0f} tok/s, decode {before['decode_tokens_per_s']:.1f} -> "
          f"{after['decode_tokens_per_s']:.1f} tok/s (fp32, batch 1)", flush=True)

    q = slimlm.load(args.model, dtype="fp32", adapter=adapter)
    merge_adapter(q.model)
    quantize_model_(q.model, "int8")
    folder = Path(args.out) / "onnx-int8"
    meta = export_onnx(q.model, q.tokenizer, folder)
    print(f"exported {folder}: {meta['onnx_bytes'] / 2**20:.0f} MiB, {meta['export_s']:.0f} s; ORT vs the same codes "
          f"in fp32 arithmetic: max |Δ logit| {meta['parity']['max_logit_diff']:.1e} (ORT's int8-compute kernels "
          "quantize activations per block; --exact keeps fp32 arithmetic)", flush=True)
    ort = OrtModel(folder)
    print("| runtime (int8 weights) | extract_json exact match | prefill tok/s | decode tok/s |\n|---|---:|---:|---:|")
    for name, model in (("PyTorch (slimlm kernels)", q.model), ("ONNX Runtime (MatMulNBits)", ort)):
        score = generation_accuracy(model, q.tokenizer, test, "extract_json", max_new_tokens=48)
        sp = measure_speed(model, speed)
        print(f"| {name} | {100 * score['exact_match']:.1f}% | {sp['prefill_tokens_per_s']:.0f} | "
              f"{sp['decode_tokens_per_s']:.1f} |", flush=True)
    print(f"serve it: slimlm serve --backend onnxruntime --model {folder}")
    gguf_stage(args, adapter)
    deploy_stage(args)
    ray_stage(args)
    estimate_stage(args)


def gguf_stage(args: argparse.Namespace, adapter: Path) -> None:
    """The tuned model as GGUF (Q8_0, Q4_0) scored in llama.cpp beside slimlm (bench/gguf_task_parity.py), and the
    adapter alone as a GGUF LoRA for llama.cpp / Ollama."""
    import glob

    out, repo = Path(args.out), Path(__file__).resolve().parent.parent
    print("\n== GGUF for llama.cpp / Ollama: the tuned model exported and scored in llama.cpp ==", flush=True)
    slimlm_cli = [sys.executable, "-m", "slimlm.cli"]
    subprocess.run(slimlm_cli + ["merge", "--model", args.model, "--adapter", str(adapter), "--out",
                                 str(out / "merged"), "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    lora = out / "gguf" / "extract-json-lora.gguf"
    subprocess.run(slimlm_cli + ["export", "gguf-lora", "--model", args.model, "--adapter", str(adapter), "--out",
                                 str(lora), "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    print(f"LoRA adapter as GGUF LoRA: {lora} ({lora.stat().st_size / 2**20:.1f} MiB; llama.cpp: --lora {lora.name})")
    if not glob.glob(str(repo / "build/llama.cpp/*/llama.cpp/build/bin/libllama.so")) and \
            not os.environ.get("LLAMA_CPP_LIB_PATH"):
        print("llama.cpp's library is not built (`make llama-lib`): the llama.cpp scoring is skipped")
        return
    subprocess.run([sys.executable, str(repo / "bench" / "gguf_task_parity.py"), "--model", str(out / "merged"),
                    "--test", str(out / "task" / "test.jsonl"), "--n", str(args.quant_test), "--types", "q8_0,q4_0",
                    "--keep", str(out / "gguf")], check=True)


def deploy_stage(args: argparse.Namespace) -> None:
    """`slimlm deploy`: the Dockerfile, Kubernetes and KServe manifests for serving the model, validated offline
    against the Kubernetes schemas (nothing is built or applied: there is no Docker daemon or cluster here)."""
    import kubernetes_validate
    import yaml

    out = Path(args.out) / "deploy"
    print("\n== deploy: Dockerfile, Kubernetes (Deployment, Service, HPA) and KServe manifests ==", flush=True)
    for target in ("docker", "k8s", "kserve"):
        subprocess.run([sys.executable, "-m", "slimlm.cli", "deploy", target, "--model", args.model, "--out",
                        str(out / target), "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    docs = [d for f in sorted((out / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.37.0", strict=True)
    print(f"wrote {out}/docker (Dockerfile, .dockerignore), {out}/k8s ({', '.join(d['kind'] for d in docs)}: "
          f"valid against the Kubernetes 1.37 schemas), {out}/kserve (InferenceService, minReplicas 0); "
          "no image was built and no cluster used", flush=True)


def ray_stage(args: argparse.Namespace) -> None:
    """`slimlm deploy ray`: Ray Serve's config file for the server, then the deployment itself on a local Ray
    instance with min_replicas 0 (scale to zero): the first request starts a replica and is answered."""
    try:
        import ray  # noqa: F401
    except ImportError:
        print("\n== Ray Serve: skipped (pip install 'slimlm[ray]') ==")
        return
    import socket

    from openai import OpenAI
    from ray import serve

    from slimlm.serve import ray_serve
    from slimlm.serve.state import ServeConfig

    out = Path(args.out) / "deploy"
    print("\n== Ray Serve: the server as a deployment that scales to zero ==", flush=True)
    subprocess.run([sys.executable, "-m", "slimlm.cli", "deploy", "ray", "--model", args.model, "--min-replicas", "0",
                    "--max-replicas", "2", "--out", str(out / "ray"), "--overwrite"], check=True,
                   stdout=subprocess.DEVNULL)
    print(f"wrote {out / 'ray' / 'serve_config.yaml'} (`serve deploy` puts it on a Ray cluster)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray_serve.start_ray(None, num_cpus=2, temp_dir=f"/tmp/slimlm-ray-{os.getpid()}")
    try:
        config = ServeConfig(model=args.model, quantize="auto")
        config.engine.max_batch, config.engine.max_seq_len, config.engine.max_loras = 4, 512, 0
        url = ray_serve.run(config, ray_serve.RayServeConfig(min_replicas=0, max_replicas=2, num_cpus=1, port=port,
                                                             downscale_delay_s=10))
        print(f"deployed at {url}; replicas: {ray_serve.replica_counts() or 'none (scaled to zero)'}")
        t0 = time.perf_counter()
        client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=600)
        reply = client.chat.completions.create(model="smollm2-135m", max_tokens=24, temperature=0,
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
        print(f"first request from zero replicas answered in {time.perf_counter() - t0:.1f} s (a replica started and "
              f"loaded the model): {reply.choices[0].message.content!r}; replicas: {ray_serve.replica_counts()}")
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()


def estimate_stage(args: argparse.Namespace) -> None:
    """What the fine-tuning stage's LoRA run (batch 8 x 256 tokens, fp32) needs, from the config alone."""
    from slimlm.memory import MemoryQuery, estimate_memory
    from slimlm.memory.cli import format_estimate, model_config

    print("\n== memory estimate: the LoRA fine-tuning run of this demo ==", flush=True)
    query = MemoryQuery(mode="finetune", method="lora", batch=8, seq=256)
    print(format_estimate(estimate_memory(model_config(args.model), query), args.model, query))
    print("(the same: slimlm estimate --model smollm2-135m --mode finetune --method lora --batch 8 --seq 256)")


if __name__ == "__main__":
    main()
