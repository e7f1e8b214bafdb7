"""Offline batch jobs in OpenAI's batch file format, run through the same engine and API code as the server.

Input, one request per line: {"custom_id": "a1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}.
Output, one line per input line in input order: {"id", "custom_id", "response": {"status_code", "request_id",
"body"}, "error": null}. The whole file is checked before the model loads (every bad line is reported with its
number), requests go to the in-process ASGI app (no socket), and the output is written atomically.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from slimlm.errors import InputError
from slimlm.jsonl import read_lines

URLS = ("/v1/chat/completions", "/v1/completions")


@dataclass
class BatchSummary:
    total: int
    succeeded: int
    failed: int
    seconds: float
    output: Path

    def __str__(self) -> str:
        return (
            f"{self.succeeded}/{self.total} requests succeeded ({self.failed} failed) in {self.seconds:.1f} s "
            f"-> {self.output}"
        )


def read_batch_file(path: str | Path) -> list[dict]:
    """Parse and check every line; raises ValueError naming each bad line (one line of text for one bad line)."""
    lines, errors, seen = [], [], set()
    for line in read_lines(path):  # blank lines skipped; bad bytes and bad JSON come back as line.error
        problems = [line.error] if line.error is not None else _line_problems(line.value, seen)
        errors += [f"line {line.number}: {p}" for p in problems]
        if not problems:
            seen.add(line.value["custom_id"])
            lines.append(line.value)
    if len(errors) == 1:
        raise InputError(f"{path}: {errors[0]}")
    if errors:
        raise InputError(f"{path}: {len(errors)} bad line(s):\n  " + "\n  ".join(errors[:20]))
    if not lines:
        raise InputError(f"{path} holds no requests")
    return lines


def _line_problems(item, seen: set) -> list[str]:
    if not isinstance(item, dict):
        return ["each line must be a JSON object"]
    out = []
    cid = item.get("custom_id")
    if not isinstance(cid, str) or not cid:
        out.append("custom_id must be a non-empty string")
    elif cid in seen:
        out.append(f"custom_id {cid!r} is used twice")
    if item.get("method", "POST") != "POST":
        out.append("method must be POST")
    if item.get("url") not in URLS:
        out.append(f"url must be one of {', '.join(URLS)}, got {item.get('url')!r}")
    if not isinstance(item.get("body"), dict):
        out.append("body must be a JSON object (the request body)")
    return out


def run_batch(config, input_path: str | Path, output_path: str | Path, progress: bool = True) -> BatchSummary:
    """Run every request of input_path through a freshly loaded engine; write results to output_path."""
    from slimlm.serve.state import ServerState

    items = read_batch_file(input_path)
    state = ServerState(config)
    t0 = time.perf_counter()
    state.load()
    try:
        results = asyncio.run(_run_all(state, items, progress))
    finally:
        state.engine.stop()
    out = Path(output_path)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
    os.replace(tmp, out)
    ok = sum(r["response"]["status_code"] == 200 for r in results)
    return BatchSummary(len(results), ok, len(results) - ok, time.perf_counter() - t0, out)


async def _run_all(state, items: list[dict], progress: bool) -> list[dict]:
    import httpx
    from tqdm import tqdm

    from slimlm.serve.api import create_app

    app = create_app(state)
    # Keep the engine's batch full and its queue short: more in flight would only wait in the queue (or get 429).
    limit = asyncio.Semaphore(max(1, min(2 * state.config.engine.max_batch, state.config.engine.max_queue)))
    bar = tqdm(total=len(items), desc="batch", unit="req", disable=not progress)
    headers = {"Authorization": f"Bearer {state.api_keys[0]}"} if state.api_keys else {}

    async def one(client: httpx.AsyncClient, item: dict) -> dict:
        async with limit:
            body = {**item["body"], "stream": False}
            r = await client.post(item["url"], json=body, headers=headers)
        bar.update(1)
        return {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": item["custom_id"],
            "response": {"status_code": r.status_code, "request_id": r.headers.get("x-request-id"), "body": r.json()},
            "error": None,
        }

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://batch", timeout=None) as client:
        results = await asyncio.gather(*(one(client, it) for it in items))
    bar.close()
    return list(results)
