"""Lazy multi-model serving under a slot limit: three bases on one `slimlm serve --max-models 2`.

Starts a real server (a subprocess, so that its RSS is its own) serving SmolLM2-135M three times under the names
a, b, c (the `smollm2-135m` alias's cached file; --quantize auto = int8 on a CPU), sends requests to a, b, c, a, b, c
in turn and records after each: the status, the resident bases (GET /v1/models), the server's RSS (VmRSS) and the
load time of the base it loaded (slimlm:model_load_seconds). Then it streams from one base while another loads and
compares the stream's gaps between tokens during the load with those outside it and with a control stream during
which nothing loads (on a shared 2-core machine the control's own spikes are the noise floor).

    .venv/bin/python bench/bench_serve_multimodel.py [--model PATH] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx

CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("slimlm:model_"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def resident(url: str) -> list[str]:
    return sorted(c["id"] for c in httpx.get(url + "/v1/models").json()["data"] if c.get("loaded"))


def resident_mib(url: str) -> float:
    """The pool's own count: weights + KV caches of the resident bases (the /v1/models cards' resident_bytes)."""
    return sum(c.get("resident_bytes", 0) for c in httpx.get(url + "/v1/models").json()["data"]) / 2**20


def percentile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def chat(url: str, model: str, max_tokens: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = httpx.post(
        url + "/v1/chat/completions",
        json={"model": model, "messages": CHAT, "max_tokens": max_tokens, "temperature": 0},
        timeout=300,
    )
    return r.status_code, time.perf_counter() - t0


def stream_gaps(url: str, model: str, n: int, times: list, started: threading.Event) -> None:
    body = {"model": model, "messages": CHAT, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
                started.set()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model path (default: the smollm2-135m alias's cached file)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--stream-tokens", type=int, default=160)
    args = p.parse_args()
    if args.model is None:
        from slimlm.checkpoint import ALIASES

        args.model = str(ALIASES["smollm2-135m"]())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "slimlm.cli",
        "serve",
        "--model",
        args.model,
        "--served-name",
        "a",
        "--models",
        f"b={args.model}",
        f"c={args.model}",
        "--max-models",
        "2",
        "--max-batch",
        "4",
        "--max-seq-len",
        "512",
        "--port",
        str(port),
    ]
    print("server:", " ".join(cmd[1:]))
    log = open("/tmp/bench_serve_multimodel.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:
                raise SystemExit(f"the server exited ({server.returncode}); see /tmp/bench_serve_multimodel.log")
            time.sleep(0.2)
        print(f"ready: RSS {rss_mib(server.pid):.0f} MiB, resident {resident(url)}")
        print(
            f"{'request':>8} {'status':>6} {'e2e s':>7} {'load s':>7} {'resident':>10} {'models MiB':>10} "
            f"{'RSS MiB':>8}"
        )
        seen = metrics(url)
        for model in ("a", "b", "c", "a", "b", "c"):
            status, e2e = chat(url, model, args.max_tokens)
            now = metrics(url)
            key = f'slimlm:model_load_seconds_sum{{model_name="{model}"}}'
            load = now.get(key, 0.0) - seen.get(key, 0.0)
            seen = now
            print(
                f"{model:>8} {status:>6} {e2e:7.2f} {load:7.2f} {','.join(resident(url)):>10} "
                f"{resident_mib(url):10.0f} {rss_mib(server.pid):8.0f}"
            )
        # Control: the same stream on c with nothing loading (the noise floor of a shared machine).
        control, started = [], threading.Event()
        stream_gaps(url, "c", args.stream_tokens, control, started)
        control = [b - a for a, b in zip(control, control[1:])]
        # A stream on c (resident) while a loads (it unloads b, the idle least recently used one).
        assert resident(url) == ["b", "c"], resident(url)
        times, started = [], threading.Event()
        t = threading.Thread(target=stream_gaps, args=(url, "c", args.stream_tokens, times, started))
        t.start()
        started.wait(120)
        time.sleep(1.0)
        t0 = time.perf_counter()
        r = httpx.post(url + "/tokenize", json={"model": "a", "prompt": "x"}, timeout=300)  # loads a, no compute
        t1 = time.perf_counter()
        alive = t.is_alive()
        t.join()
        pairs = list(zip(times, times[1:]))
        during = [b - a for a, b in pairs if a < t1 and b > t0]
        outside = [b - a for a, b in pairs if not (a < t1 and b > t0)]  # the noise floor of a shared machine
        print(
            f"stream on c while a loads ({r.status_code}, {t1 - t0:.2f} s; stream still running after the load: "
            f"{alive}); resident after: {resident(url)}, RSS {rss_mib(server.pid):.0f} MiB"
        )
        worst = sorted(((b - a, a - t0) for a, b in pairs), reverse=True)[:4]
        print(
            "  largest gaps (ms, starting at s after the load began):",
            [(round(g * 1e3), round(at, 2)) for g, at in worst],
            f"load ended at {t1 - t0:.2f} s",
        )
        for label, gaps in (("during the load", during), ("outside it", outside), ("control, no load", control)):
            print(
                f"  gaps {label:>16}: n {len(gaps):3d}  median {statistics.median(gaps) * 1e3:6.1f} ms  "
                f"p90 {percentile(gaps, 0.9) * 1e3:6.1f} ms  max {max(gaps) * 1e3:7.1f} ms"
            )
        after, started = [], threading.Event()
        stream_gaps(url, "c", args.stream_tokens, after, started)
        after = [b - a for a, b in zip(after, after[1:])]
        print(
            f"  gaps {'control, after':>16}: n {len(after):3d}  median {statistics.median(after) * 1e3:6.1f} ms  "
            f"p90 {percentile(after, 0.9) * 1e3:6.1f} ms  max {max(after) * 1e3:7.1f} ms"
        )
        m = metrics(url)
        print(
            "loads:",
            int(sum(v for k, v in m.items() if k.startswith("slimlm:model_loads_total"))),
            "unloads:",
            int(sum(v for k, v in m.items() if k.startswith("slimlm:model_unloads_total"))),
        )
    finally:
        server.terminate()
        server.wait(60)
        log.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
