"""A real slimlm server on loopback, run in a thread, for the serving tests."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import httpx
import uvicorn

from slimlm.engine.core import EngineConfig
from slimlm.serve.api import create_app
from slimlm.serve.state import ServeConfig, ServerState


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(config: ServeConfig, load: bool = True):
    """Yield (base_url, state) for a uvicorn server on 127.0.0.1 serving `config`; stops it afterwards."""
    state = ServerState(config)
    if load:
        state.load()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/health", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.05)
    try:
        yield url, state
    finally:
        server.should_exit = True
        thread.join(10)
        state.close()


def random_lora(model: str, folder, seed: int, r: int = 4, std: float = 0.3):
    """A LoRA adapter (all linear layers) with seeded random A and B saved to folder: a distinct model per seed."""
    import torch

    import slimlm
    from slimlm.peft import apply_peft, make_config, save_adapter

    m = slimlm.load(str(model), dtype="fp32")
    apply_peft(m.model, "lora", make_config("lora", {"r": r, "alpha": 2 * r}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.model.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=g))
    return save_adapter(m.model, folder)


def post(url: str, path: str, body: dict, timeout: float = 30, **kw) -> httpx.Response:
    """POST `body` as JSON to the server at `url`."""
    return httpx.post(url + path, json=body, timeout=timeout, **kw)


def sse_events(response: httpx.Response) -> list:
    """The JSON bodies of an SSE stream, with the final "[DONE]" kept as the string."""
    import json

    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def tiny_config(folder, **kw) -> ServeConfig:
    """The serving tests' tiny-model server: 4 slots, 120-token context, 2 LoRA slots, max_tokens up to 64."""
    # An fp32 KV cache, so that logprobs can be checked against the model's own forward to round-off (the CPU
    # default, fp16, moves them by ~1e-3: tests/test_engine.py::test_slot_cache_matches_full_forward).
    engine = kw.pop(
        "engine", EngineConfig(max_batch=4, max_seq_len=120, max_loras=2, max_lora_rank=8, kv_cache_dtype="fp32")
    )
    return ServeConfig(model=str(folder), served_name="tiny", dtype="fp32", max_tokens_limit=64, engine=engine, **kw)
