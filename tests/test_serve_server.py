"""`slimlm serve` as a process: SIGTERM drains (running requests finish, new ones get 503), then it exits 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
from serve_helpers import free_port


def test_sigterm_drains_then_exits(tiny_llama, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "slimlm.cli",
            "serve",
            "--model",
            str(tiny_llama[0]),
            "--served-name",
            "tiny",
            "--dtype",
            "fp32",
            "--port",
            str(port),
            "--max-seq-len",
            "128",
            "--drain-timeout",
            "20",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        body = {"model": "tiny", "prompt": "the cat", "max_tokens": 110, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            while httpx.get(url + "/ready", timeout=5).status_code != 503:  # the handler runs asynchronously
                time.sleep(0.01)
            refused = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi"}, timeout=5)
            rest = [line for line in lines if line.startswith("data: ")]
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        assert rest[-1] == "data: [DONE]"
        finish = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in rest[:-1]]
        assert finish[-1] == "length"  # the running request was allowed to finish
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    lines = (tmp_path / "server.log").read_text().splitlines()
    records = [json.loads(x) for x in lines if x.startswith("{")]
    done = [r for r in records if r.get("path") == "/v1/completions" and r.get("status") == 200]
    assert done and done[0]["completion_tokens"] == 110 and done[0]["finish_reason"] == "length"
