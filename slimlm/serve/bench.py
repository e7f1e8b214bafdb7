"""`slimlm bench serve`: a streaming load generator for any OpenAI-compatible server, with vLLM's serving metrics.

It sends chat (or legacy completions) requests with `stream: true` through one httpx.AsyncClient, at most
`concurrency` in flight (and, with `request_rate`, Poisson arrivals), and times every request on the client side.
The definitions are those of vLLM's benchmarks/benchmark_serving.py (`vllm bench serve`):

  TTFT   send -> the first chunk that carries text
  ITL    gaps between successive text chunks (pooled over all requests)
  TPOT   (E2E - TTFT) / (output_tokens - 1), per request with more than one output token
  E2E    send -> end of the stream
  request throughput = completed requests / run time; output throughput = output tokens / run time

Output tokens come from the server's `usage` (we ask for it with `stream_options.include_usage`). A server that
streams no usage (llama-cpp-python) is counted from `finish_reason == "length"` (exactly max_tokens) or else from the
number of text chunks; the JSON says which source each request used. Failed requests are counted by HTTP status,
429 (server busy) separately, and never stop the run.

What it is not: it knows nothing of slimlm's engine or tokenizer — it speaks HTTP only, so it measures any server.
Synthetic prompts are therefore sized in words (common English words, about one token each); the server's usage
reports the exact prompt tokens. `system_prompt_tokens` (--system-prompt-tokens) puts the same system prompt before
every request's own prompt: a shared prefix, which a server with prefix caching need not prefill again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from slimlm.errors import InputError

# Common English words, each about one token in Llama-family vocabularies (with its leading space).
WORDS = (
    "the of and to in is was for that with as on by at from his her they this which an be are had have not but "
    "one all were when we there can more if no out so said what up its about into than them time only new some "
    "could these two may first then do any like my now over such our man me even most made after also did many "
    "before must through back years where much your way well down should because each just those people how too "
    "little state good very make world still own see men work long get here between both life being under never "
    "day same another know while last might us great old year off come since against go came right used take "
    "three house water light river city road small large early home school story night place hand eyes "
    "family"
).split()

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass
class BenchConfig:
    url: str = "http://127.0.0.1:8000"  # the server's base URL (a trailing /v1 is fine)
    model: str | None = None  # the base model's name; None = the first id of GET /v1/models
    endpoint: str = "chat"  # chat | completions
    concurrency: int = 4  # requests in flight at most
    requests: int = 32  # measured requests
    prompt_tokens: int = 128  # synthetic prompt length in words (~tokens)
    system_prompt_tokens: int = 0  # > 0: every request starts with the same system prompt of this many words
    max_tokens: int = 64
    dataset: str | None = None  # JSONL prompts instead of synthetic ones (see load_dataset)
    adapters: list[str] = field(default_factory=list)  # requests cycle through models BASE:a, BASE:b, ...
    api_key: str | None = None
    ignore_eos: bool = False  # vLLM's extension: every request runs to max_tokens
    temperature: float = 0.0
    seed: int = 0  # synthetic prompts and arrival times
    request_rate: float = math.inf  # requests/s (Poisson arrivals); inf = all at once, bounded by concurrency
    warmup: int = 0  # requests sent (and not measured) before the run
    timeout_s: float = 600.0  # per request
    extra_body: dict = field(default_factory=dict)  # merged into every request body (server-specific fields)

    def validate(self) -> None:
        bad = [
            f"--{k.replace('_', '-')} must be >= 1, got {getattr(self, k)}"
            for k in ("concurrency", "requests", "prompt_tokens", "max_tokens")
            if getattr(self, k) < 1
        ]
        if self.endpoint not in ENDPOINTS:
            bad.append(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        if not self.request_rate > 0:
            bad.append(f"--request-rate must be > 0 (inf = no pacing), got {self.request_rate}")
        if self.system_prompt_tokens < 0:
            bad.append(f"--system-prompt-tokens must be >= 0, got {self.system_prompt_tokens}")
        if self.warmup < 0 or self.timeout_s <= 0:
            bad.append("--warmup must be >= 0 and --timeout > 0")
        if not isinstance(self.extra_body, dict):
            bad.append("--extra-body must be a JSON object")
        if not self.url.startswith(("http://", "https://")):
            bad.append(f"--url must start with http:// or https://, got {self.url!r}")
        if bad:
            raise InputError("invalid bench config: " + "; ".join(bad))

    def base_url(self) -> str:
        return self.url.rstrip("/").removesuffix("/v1")


@dataclass
class RequestResult:
    """One request as the client saw it; times in seconds from sending it."""

    model: str
    ok: bool = False
    status: int | None = None  # HTTP status; None when no response came (connection error, timeout)
    error: str = ""
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None  # from usage; None when the server sends none
    tokens_from: str = ""  # usage | length | chunks
    chunks: int = 0  # chunks that carried text
    finish_reason: str | None = None
    text: str = ""
    _usage_tokens: int | None = field(default=None, repr=False)
    _last: float = field(default=0.0, repr=False)


# ---- prompts and request bodies ----


def synthetic_prompts(n: int, words: int, seed: int) -> list[str]:
    """`n` prompts of `words` words drawn from WORDS, the same for the same seed."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


SYSTEM_SEED = 1_000_003  # the shared system prompt is the same for every run, seed and server


def system_prompt(words: int) -> str:
    """The shared system prompt of `words` words (~tokens): the same text for every request, seed and run."""
    return synthetic_prompts(1, words, SYSTEM_SEED)[0] if words > 0 else ""


def load_dataset(path: str | Path) -> list[dict]:
    """JSONL, one prompt a line: a JSON string, {"prompt": str} or {"messages": [...]}, optionally "max_tokens"."""
    items = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"--dataset {path}:{i}: not JSON ({e.msg})") from None
        item = {"prompt": item} if isinstance(item, str) else item
        if not isinstance(item, dict) or not ({"prompt", "messages"} & item.keys()):
            raise InputError(f"--dataset {path}:{i}: expected a string or an object with 'prompt' or 'messages'")
        items.append(item)
    if not items:
        raise InputError(f"--dataset {path} holds no prompts")
    return items


def request_models(base: str, adapters: list[str]) -> list[str]:
    """The `model` field of successive requests: BASE, or BASE:a, BASE:b, ... cycled."""
    return [a if ":" in a else f"{base}:{a}" for a in adapters] or [base]


def request_bodies(cfg: BenchConfig, base: str, n: int, seed: int) -> list[dict]:
    """`n` streaming request bodies: prompts from the dataset (cycled) or synthetic, models cycled; with
    `system_prompt_tokens`, each starts with the same system prompt (chat: a system message before the request's own
    messages unless they hold one; completions: the text and a blank line before the prompt)."""
    items = (
        load_dataset(cfg.dataset)
        if cfg.dataset
        else [{"prompt": p} for p in synthetic_prompts(n, cfg.prompt_tokens, seed)]
    )
    models = request_models(base, cfg.adapters)
    system = system_prompt(cfg.system_prompt_tokens)
    bodies = []
    for i in range(n):
        item = items[i % len(items)]
        body = {
            "model": models[i % len(models)],
            "max_tokens": item.get("max_tokens", cfg.max_tokens),
            "temperature": cfg.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if cfg.endpoint == "chat":
            messages = item.get("messages") or [{"role": "user", "content": item["prompt"]}]
            if system and not any(m.get("role") == "system" for m in messages):
                messages = [{"role": "system", "content": system}, *messages]
            body["messages"] = messages
        elif "prompt" in item:
            body["prompt"] = f"{system}\n\n{item['prompt']}" if system else item["prompt"]
        else:
            raise InputError("--endpoint completions needs 'prompt' in every dataset line, not 'messages'")
        if cfg.ignore_eos:
            body["ignore_eos"] = True
        bodies.append({**body, **cfg.extra_body})
    return bodies


# ---- one request ----


async def send_one(client: httpx.AsyncClient, path: str, body: dict) -> RequestResult:
    """POST one streaming request and time its chunks; never raises for HTTP or stream errors."""
    res, chat = RequestResult(model=body["model"]), path.endswith("/chat/completions")
    t0, done = time.perf_counter(), False
    try:
        async with client.stream("POST", path, json=body) as resp:
            res.status = resp.status_code
            if resp.status_code != 200:
                res.error = _error_message(await resp.aread())
                return res
            async for line in resp.aiter_lines():
                now = time.perf_counter() - t0
                if not line.startswith("data:"):
                    continue  # blank separators, ": ping" comments
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = _error_message(data.encode())
                    return res
                _on_chunk(res, chunk, now, chat)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}".rstrip(": ")
        return res
    res.e2e = time.perf_counter() - t0
    if not done and res.finish_reason is None:
        res.error = "the stream ended without [DONE] or a finish_reason"
        return res
    _count_tokens(res, body["max_tokens"])
    res.ok = True
    return res


def _on_chunk(res: RequestResult, chunk: dict, t: float, chat: bool) -> None:
    if chunk.get("usage"):
        res._usage_tokens = chunk["usage"].get("completion_tokens")
        res.prompt_tokens = chunk["usage"].get("prompt_tokens")
    for choice in chunk.get("choices") or []:
        text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
        if text:  # the role-only first chat chunk and the finish chunk carry no text
            if res.ttft is None:
                res.ttft = t
            else:
                res.itl.append(t - res._last)
            res._last, res.chunks, res.text = t, res.chunks + 1, res.text + text
        res.finish_reason = choice.get("finish_reason") or res.finish_reason


def _count_tokens(res: RequestResult, max_tokens: int) -> None:
    if res._usage_tokens is not None:
        res.output_tokens, res.tokens_from = res._usage_tokens, "usage"
    elif res.finish_reason == "length":
        res.output_tokens, res.tokens_from = max_tokens, "length"
    else:
        res.output_tokens, res.tokens_from = res.chunks, "chunks"


def _error_message(raw: bytes) -> str:
    try:
        err = json.loads(raw)
        err = err.get("error", err) if isinstance(err, dict) else err
        msg = err.get("message") or err.get("detail") or err if isinstance(err, dict) else err
        return str(msg)[:300]
    except (json.JSONDecodeError, UnicodeDecodeError):
        return raw[:300].decode(errors="replace")


# ---- the run ----


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Send times in seconds: all 0 for rate inf, else a Poisson process (exponential gaps) at `rate` per second."""
    if math.isinf(rate):
        return [0.0] * n
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def _send_all(client: httpx.AsyncClient, cfg: BenchConfig, bodies: list[dict]) -> tuple[list, float]:
    sem, path = asyncio.Semaphore(cfg.concurrency), ENDPOINTS[cfg.endpoint]

    async def one(body: dict, at: float) -> RequestResult:
        await asyncio.sleep(at)
        async with sem:
            return await send_one(client, path, body)

    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(one(b, t) for b, t in zip(bodies, arrival_times(len(bodies), cfg.request_rate, cfg.seed)))
    )
    return list(results), time.perf_counter() - t0


async def first_model(client: httpx.AsyncClient) -> str:
    """The first model id of GET /v1/models (for a slimlm server: its base model)."""
    r = await client.get("/v1/models")
    if r.status_code != 200 or not r.json().get("data"):
        raise InputError(f"GET /v1/models answered {r.status_code}: {_error_message(r.content)}; pass --model NAME")
    return r.json()["data"][0]["id"]


async def run_bench_async(cfg: BenchConfig, transport: httpx.AsyncBaseTransport | None = None) -> dict:
    """Warm up, run the measured requests and return the summary (see summarize)."""
    cfg.validate()
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    async with httpx.AsyncClient(
        base_url=cfg.base_url(),
        headers=headers,
        limits=limits,
        transport=transport,
        timeout=httpx.Timeout(cfg.timeout_s, connect=10.0),
    ) as client:
        base = cfg.model or await first_model(client)
        if cfg.warmup:
            await _send_all(client, cfg, request_bodies(cfg, base, cfg.warmup, cfg.seed + 1))
        results, duration = await _send_all(client, cfg, request_bodies(cfg, base, cfg.requests, cfg.seed))
    return summarize(results, duration, cfg, base)


def run_bench(cfg: BenchConfig) -> dict:
    """Synchronous entry point: the summary dict of one benchmark run.

    The client runs on uvloop where it is installed: it shares the CPU with the server it measures, so the less CPU
    it takes per streamed token, the less it disturbs the measurement (the same for every server)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run_bench_async(cfg))
    return uvloop.run(run_bench_async(cfg))


def wait_until_ready(url: str, timeout_s: float = 300.0, api_key: str | None = None) -> None:
    """Poll GET /v1/models until it answers 200 (a loading slimlm server answers 503); TimeoutError after timeout_s."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url.rstrip("/").removesuffix("/v1") + "/v1/models", headers=headers, timeout=5)
            if r.status_code == 200:
                return
            last = f"{r.status_code}: {_error_message(r.content)}"
        except httpx.TransportError as e:
            last = type(e).__name__
        time.sleep(0.25)
    raise TimeoutError(f"{url} was not ready after {timeout_s:.0f} s (last: {last})")


# ---- metrics ----


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation (numpy's default, as vLLM reports)."""
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def stats_ms(xs: list[float]) -> dict | None:
    """mean / median (p50) / p99 / std / min / max in milliseconds; None for no samples."""
    if not xs:
        return None
    ms = [x * 1000 for x in xs]
    return {
        "mean": statistics.fmean(ms),
        "median": percentile(ms, 50),
        "p99": percentile(ms, 99),
        "std": statistics.pstdev(ms),
        "min": min(ms),
        "max": max(ms),
        "n": len(ms),
    }


def summarize(results: list[RequestResult], duration: float, cfg: BenchConfig, base: str) -> dict:
    """vLLM's serving metrics over the completed requests, failures by status, and every request's record."""
    ok = [r for r in results if r.ok]
    failed = Counter(str(r.status) if r.status is not None else "no_response" for r in results if not r.ok)
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok if r.prompt_tokens is not None)
    timed = [r for r in ok if r.ttft is not None]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in timed if r.output_tokens > 1]
    return {
        "config": {
            k: (v if not isinstance(v, float) or math.isfinite(v) else "inf")
            for k, v in asdict(cfg).items()
            if k != "api_key"
        },
        "model": base,
        "completed": len(ok),
        "failed": sum(failed.values()),
        "failed_429": failed.get("429", 0),
        "failed_by_status": dict(failed),
        "errors": sorted({r.error for r in results if not r.ok})[:10],
        "duration_s": duration,
        "total_input_tokens": in_tokens if any(r.prompt_tokens is not None for r in ok) else None,
        "total_output_tokens": out_tokens,
        "output_tokens_from": dict(Counter(r.tokens_from for r in ok)),
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": stats_ms([r.ttft for r in timed]),
        "tpot_ms": stats_ms(tpot),
        "itl_ms": stats_ms([g for r in ok for g in r.itl]),
        "e2e_ms": stats_ms([r.e2e for r in ok]),
        "requests_per_model": dict(Counter(r.model for r in results)),
        "requests": [
            {
                "model": r.model,
                "ok": r.ok,
                "status": r.status,
                "error": r.error or None,
                "ttft_s": r.ttft,
                "e2e_s": r.e2e,
                "output_tokens": r.output_tokens,
                "prompt_tokens": r.prompt_tokens,
                "tokens_from": r.tokens_from,
                "chunks": r.chunks,
                "finish_reason": r.finish_reason,
                "itl_s": r.itl,
            }
            for r in results
        ],
    }


def format_table(s: dict) -> str:
    """The summary as vLLM prints it: one line per figure, TTFT / TPOT / ITL / E2E sections in ms."""

    def line(label: str, value) -> str:
        v = "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)
        return f"{label:<40}{v:>12}"

    c = s["config"]
    out = [
        f"{' Serving Benchmark Result ':=^52}",
        line("Model:", s["model"]),
        line("Endpoint / concurrency:", f"{c['endpoint']} / {c['concurrency']}"),
        line("Successful requests:", s["completed"]),
        line("Failed requests:", s["failed"]),
        line("  of which 429 (server busy):", s["failed_429"]),
        line("Benchmark duration (s):", s["duration_s"]),
        line("Total input tokens:", s["total_input_tokens"]),
        line("Total generated tokens:", s["total_output_tokens"]),
        line("Request throughput (req/s):", s["request_throughput"]),
        line("Output token throughput (tok/s):", s["output_throughput"]),
        line("Total token throughput (tok/s):", s["total_token_throughput"]),
    ]
    sections = (
        ("ttft_ms", "Time to First Token", "TTFT"),
        ("tpot_ms", "Time per Output Token (excl. 1st token)", "TPOT"),
        ("itl_ms", "Inter-token Latency", "ITL"),
        ("e2e_ms", "End-to-end Latency", "E2E"),
    )
    for key, title, name in sections:
        st = s[key] or {}
        out += [f"{title:-^52}"] + [
            line(f"{lbl} {name} (ms):", st.get(k))
            for k, lbl in (("mean", "Mean"), ("median", "Median"), ("p99", "P99"))
        ]
    if s["failed"]:
        out.append(f"{'Failures':-^52}")
        out += [line(f"HTTP {code}:", n) for code, n in sorted(s["failed_by_status"].items())]
        out += [f"  {e}" for e in s["errors"][:3]]
    out.append("=" * 52)
    return "\n".join(out)


# ---- command line ----


def add_bench_serve_args(p: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    p.add_argument("--url", default=d.url, help="the server's base URL (default: %(default)s)")
    p.add_argument("--model", default=None, help="base model name (default: the first id of GET /v1/models)")
    p.add_argument("--endpoint", default=d.endpoint, choices=list(ENDPOINTS))
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="requests in flight at most")
    p.add_argument("--requests", type=int, default=d.requests, help="measured requests")
    p.add_argument(
        "--prompt-tokens",
        type=int,
        default=d.prompt_tokens,
        help="synthetic prompt length in words (~tokens; the server's usage reports exact counts)",
    )
    p.add_argument(
        "--system-prompt-tokens",
        type=int,
        default=d.system_prompt_tokens,
        help="every request starts with the same system prompt of this many words (~tokens; tests a "
        "server's prefix caching); 0 = none",
    )
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument(
        "--dataset",
        default=None,
        help="JSONL of prompts (a string, {prompt} or {messages} a line) instead of synthetic ones",
    )
    p.add_argument("--adapters", default="", help="comma list a,b,c: requests cycle through models BASE:a, BASE:b, ...")
    p.add_argument("--api-key", default=None)
    p.add_argument(
        "--ignore-eos", action="store_true", help="send ignore_eos (vLLM, slimlm): every request runs to --max-tokens"
    )
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--request-rate",
        type=float,
        default=d.request_rate,
        help="requests/s as a Poisson process (default inf: all at once, bounded by --concurrency)",
    )
    p.add_argument("--warmup", type=int, default=d.warmup, help="unmeasured requests sent first")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds per request")
    p.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    p.add_argument(
        "--wait", type=float, default=0.0, help="first wait up to this many seconds for the server to be ready"
    )
    p.add_argument("--json", default=None, metavar="OUT", help="write the summary (and every request's record) here")


def bench_config(args: argparse.Namespace) -> BenchConfig:
    try:
        extra = json.loads(args.extra_body) if args.extra_body else {}
    except json.JSONDecodeError as e:
        raise InputError(f"--extra-body is not JSON: {e.msg}") from None
    cfg = BenchConfig(
        url=args.url,
        model=args.model,
        endpoint=args.endpoint,
        concurrency=args.concurrency,
        requests=args.requests,
        prompt_tokens=args.prompt_tokens,
        system_prompt_tokens=args.system_prompt_tokens,
        max_tokens=args.max_tokens,
        dataset=args.dataset,
        adapters=[a.strip() for a in args.adapters.split(",") if a.strip()],
        api_key=args.api_key,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        seed=args.seed,
        request_rate=args.request_rate,
        warmup=args.warmup,
        timeout_s=args.timeout,
        extra_body=extra,
    )
    cfg.validate()
    return cfg


def cmd_bench_serve(args: argparse.Namespace) -> int:
    cfg = bench_config(args)
    try:
        if args.wait > 0:
            wait_until_ready(cfg.url, args.wait, cfg.api_key)
        summary = run_bench(cfg)
    except (TimeoutError, httpx.TransportError) as e:  # only reaching /v1/models can raise; requests never do
        raise InputError(
            f"{cfg.url}: {str(e) or type(e).__name__}; is the server running? (--wait S waits for it to load)"
        ) from None
    print(format_table(summary))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["completed"] else 1


def add_bench_commands(sub) -> None:
    """Register `bench serve` under a `bench` command group on the subparsers `sub`."""
    b = sub.add_parser("bench", help="benchmarks: `bench serve` loads an OpenAI-compatible server")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    s = bsub.add_parser("serve", help="streaming load test of an OpenAI-compatible server (vLLM's TTFT/TPOT/ITL)")
    add_bench_serve_args(s)
    s.set_defaults(func=cmd_bench_serve)
