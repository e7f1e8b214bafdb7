"""What the robustness tests of the HTTP server share: a tiny server's config and the checks on its answers."""

from __future__ import annotations

import json
import time

from slimlm.engine.core import EngineConfig
from slimlm.serve.state import ServeConfig

SERVED = "tiny"


def serve_config(folder, **engine) -> ServeConfig:
    """A tiny model with small limits (8 new tokens, 128-token context) so that every generated request is fast."""
    engine_config = EngineConfig(
        **{"max_batch": 4, "max_seq_len": 128, "max_loras": 1, "max_lora_rank": 8, "max_queue": 64, **engine}
    )
    return ServeConfig(model=str(folder), served_name=SERVED, dtype="fp32", max_tokens_limit=8, engine=engine_config)


def openai_error_problem(response) -> str | None:
    """Why a 4xx response's body is not OpenAI's error shape (None when it is)."""
    try:
        body = response.json()
    except (ValueError, json.JSONDecodeError):
        return f"{response.status_code} with a body that is not JSON: {response.text[:200]!r}"
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
        return f"{response.status_code} without an OpenAI error body: {body!r:.300}"
    if not isinstance(err["message"], str) or not err["message"] or not isinstance(err["type"], str):
        return f"{response.status_code} with an empty or mistyped error message/type: {err!r:.300}"
    return None


def response_problem(response) -> str | None:
    """The property every response must have: no 5xx, and every error in the OpenAI body."""
    if response.status_code >= 500:
        return f"{response.status_code}: {response.text[:300]!r}"
    if response.status_code >= 400:
        return openai_error_problem(response)
    return None


def wait_idle(state, timeout: float = 30.0) -> None:
    """Wait until the engine holds no request (cancelled ones are freed at the next step)."""
    deadline = time.monotonic() + timeout
    while (state.engine.running or state.engine.waiting) and time.monotonic() < deadline:
        time.sleep(0.05)
