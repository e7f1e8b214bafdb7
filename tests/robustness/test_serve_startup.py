"""`slimlm serve` start-up failures (issue 15) end with one clear line — exit 2 for bad input (a KV cache that does
not fit, runtime LoRA without a root), exit 1 for a runtime failure (a busy port, issue 19) — never a C++ `terminate`
(exit 134) or a traceback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
from serve_helpers import free_port


def serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "slimlm.cli", "serve", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def one_error_line(p: subprocess.CompletedProcess, status: int = 2) -> str:
    assert p.returncode == status, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and "terminate" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("slimlm serve: error: "), p.stderr
    return lines[-1]


def test_busy_port_is_one_line_and_exit_1(tiny_llama):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        p = serve("--model", str(tiny_llama[0]), "--port", str(port))
    line = one_error_line(p, status=1)  # a runtime failure: the user fixes it outside the command
    assert line == f"slimlm serve: error: port {port} on 127.0.0.1 is in use; pick another --port"
    assert '"event": "engine"' not in p.stderr  # refused before the model loaded


def test_cache_that_does_not_fit_is_one_line_and_exit_2(tiny_llama, tmp_path):
    p = serve(
        "--model",
        str(tiny_llama[0]),
        "--port",
        str(free_port()),
        "--max-batch",
        "100000000",
        "--max-seq-len",
        "64",
        "--no-prefix-cache",
        "--allow-runtime-lora",
        "--lora-root",
        str(tmp_path),
    )
    line = one_error_line(p)
    assert "cannot allocate the KV cache on cpu: 1638400000000 bytes" in line and "--max-batch" in line, line
    assert "ANY client" in p.stderr  # runtime LoRA without an admin key: the start-up warning


def test_sigterm_right_after_start_exits_cleanly(tiny_llama):
    """A signal while the model may still be loading: the load finishes, the engine stops, no C++ terminate."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "slimlm.cli", "serve", "--model", str(tiny_llama[0]), "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (0, -signal.SIGTERM), (proc.returncode, err)  # not 134 (abort)
    assert "terminate" not in err and "Traceback" not in err, err


def test_runtime_lora_without_root_is_refused(tiny_llama, tmp_path):
    p = serve("--model", str(tiny_llama[0]), "--port", str(free_port()), "--allow-runtime-lora", timeout=60)
    assert "--allow-runtime-lora needs at least one --lora-root" in one_error_line(p)
