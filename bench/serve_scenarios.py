"""Serving scenarios on SmolLM2-135M with a real `slimlm serve` process: multi-LoRA, overload, disconnects.

multi-lora  16 concurrent greedy requests spread over 4 LoRA adapters (r=16, all linear layers, seeded random
            weights) vs the same 16 requests on the base model: aggregate output tokens/s and the ratio; then
            every request again alone, and each batched answer compared with its alone answer.
overload    4x more concurrent clients than the server admits (--max-batch + --max-queue): how many got 429
            and how fast, whether every admitted request completed with its full token count, any 5xx, and the
            server's peak RSS before and after.
disconnect  50 streaming clients that drop after their first chunk; then /metrics must show no running or
            waiting request and an empty KV cache.

  .venv/bin/python bench/serve_scenarios.py --json bench/results/serve_scenarios.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

MODEL = "smollm2-135m"
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how rain forms.",
    "Describe a busy market.",
    "Give advice to a new gardener.",
    "What makes a good friend?",
    "Tell me about the moon.",
    "Describe your ideal weekend.",
    "How do bees make honey?",
]


def make_adapters(out: Path, n: int = 4) -> list[Path]:
    """n LoRA adapters (r=16, all-linear) with seeded random weights: different models, same shape as trained ones."""
    import torch

    import slimlm
    from slimlm.peft import apply_peft, make_config, save_adapter

    folders = []
    for i in range(n):
        folder = out / f"lora{i}"
        if not (folder / "adapter_model.safetensors").exists():
            m = slimlm.load(MODEL, dtype="fp32")
            apply_peft(m.model, "lora", make_config("lora", {"r": 16, "alpha": 32}))
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in m.model.parameters():
                    if p.requires_grad:
                        p.add_(0.02 * torch.randn(p.shape, generator=g))
            save_adapter(m.model, folder)
        folders.append(folder)
    return folders


class Server:
    """`slimlm serve` as a subprocess on a free loopback port."""

    def __init__(self, *flags: str, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        cmd = [
            sys.executable,
            "-m",
            "slimlm.cli",
            "serve",
            "--model",
            MODEL,
            "--dtype",
            "fp32",
            "--port",
            str(self.port),
            *flags,
        ]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError("server not ready")

    def rss_mib(self) -> tuple[float, float]:
        """(current, peak) resident set of the server process, MiB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        get = lambda key: int(next(x for x in status.splitlines() if x.startswith(key)).split()[1]) / 1024  # noqa
        return get("VmRSS:"), get("VmHWM:")

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        self.log.close()


async def chat(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    r = await client.post(
        url + "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    out = {"status": r.status_code, "s": time.perf_counter() - t0}
    if r.status_code == 200:
        body = r.json()
        out.update(text=body["choices"][0]["message"]["content"], tokens=body["usage"]["completion_tokens"])
    return out


async def run_all(url: str, jobs: list[tuple[str, str]], max_tokens: int) -> tuple[list[dict], float]:
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(chat(client, url, m, p, max_tokens) for m, p in jobs))
        return list(res), time.perf_counter() - t0


def multi_lora(args, work: Path) -> dict:
    adapters = make_adapters(work)
    flags = [
        "--adapters",
        *[f"a{i}={f}" for i, f in enumerate(adapters)],
        "--max-batch",
        "16",
        "--max-loras",
        "4",
        "--max-lora-rank",
        "16",
    ]
    n = 16
    base_jobs = [(MODEL, PROMPTS[i % len(PROMPTS)]) for i in range(n)]
    lora_jobs = [(f"{MODEL}:a{i % 4}", PROMPTS[i % len(PROMPTS)]) for i in range(n)]
    with Server(*flags, log=work / "multi_lora.log") as srv:
        asyncio.run(run_all(srv.url, base_jobs[:2], 8))  # warm-up
        base, base_s = asyncio.run(run_all(srv.url, base_jobs, args.max_tokens))
        lora, lora_s = asyncio.run(run_all(srv.url, lora_jobs, args.max_tokens))
        alone = [asyncio.run(run_all(srv.url, [job], args.max_tokens))[0][0] for job in lora_jobs]
    tok = lambda rs: sum(r.get("tokens", 0) for r in rs)  # noqa: E731
    same = sum(a.get("text") == b.get("text") for a, b in zip(lora, alone))
    return {
        "requests": n,
        "max_tokens": args.max_tokens,
        "base_tok_s": tok(base) / base_s,
        "lora_tok_s": tok(lora) / lora_s,
        "lora_vs_base": (tok(lora) / lora_s) / (tok(base) / base_s),
        "identical_to_alone": same,
        "all_ok": all(r["status"] == 200 for r in base + lora + alone),
    }


def overload(args, work: Path) -> dict:
    batch, queue = 4, 4
    clients = 4 * (batch + queue)
    with Server("--max-batch", str(batch), "--max-queue", str(queue), log=work / "overload.log") as srv:
        before = srv.rss_mib()
        jobs = [(MODEL, PROMPTS[i % len(PROMPTS)]) for i in range(clients)]
        res, wall = asyncio.run(run_all(srv.url, jobs, 64))
        after = srv.rss_mib()
    ok = [r for r in res if r["status"] == 200]
    busy = [r for r in res if r["status"] == 429]
    return {
        "clients": clients,
        "admitted_capacity": batch + queue,
        "ok": len(ok),
        "429": len(busy),
        "5xx": sum(r["status"] >= 500 for r in res),
        "other": len(res) - len(ok) - len(busy),
        "ok_full_length": all(r["tokens"] == 64 for r in ok),
        "max_429_latency_s": max((r["s"] for r in busy), default=None),
        "max_ok_latency_s": max(r["s"] for r in ok),
        "wall_s": wall,
        "rss_mib_before": before[0],
        "rss_mib_after": after[0],
        "peak_rss_mib": after[1],
    }


async def drop_after_first_chunk(client: httpx.AsyncClient, url: str, prompt: str) -> bool:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 256,
        "ignore_eos": True,
        "stream": True,
    }
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return False
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                return True  # leaving the block closes the connection mid-stream
    return False


def disconnect(args, work: Path) -> dict:
    n = 50
    with Server("--max-batch", "16", "--max-queue", "64", log=work / "disconnect.log") as srv:

        async def go():
            async with httpx.AsyncClient(timeout=600) as client:
                return await asyncio.gather(
                    *(drop_after_first_chunk(client, srv.url, PROMPTS[i % 8]) for i in range(n))
                )

        started = asyncio.run(go())
        time.sleep(2.0)  # the engine notices within a step; give the last ones time to be reaped
        metrics = httpx.get(srv.url + "/metrics").text
    gauges = {
        k: float(line.split()[-1])
        for line in metrics.splitlines()
        for k in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
        if line.startswith(k + "{")
    }
    aborted = sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("vllm:request_success_total") and 'finished_reason="abort"' in line
    )
    return {"clients": n, "got_first_chunk": sum(started), **gauges, "aborted": aborted}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", default="multi-lora,overload,disconnect")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--work", default="runs/serve_scenarios")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    fns = {"multi-lora": multi_lora, "overload": overload, "disconnect": disconnect}
    results = {}
    for name in args.scenarios.split(","):
        results[name] = fns[name](args, work)
        print(f"{name}: {json.dumps(results[name], indent=1)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
