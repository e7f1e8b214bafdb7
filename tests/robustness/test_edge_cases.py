"""Hostile request bodies the schema fuzzer does not generate, sent as raw bytes to a live server.

Each input must get the status written next to it — a 4xx with OpenAI's error body, or a 200 where the input is
valid — never a 5xx or a hang, and the server must answer /health and hold no request afterwards. The decisions,
following OpenAI and vLLM:
- NaN / Infinity (Python's JSON parser reads them): 400, no sampling field may be non-finite.
- bodies over --max-body-bytes (10 MB): 413, whether the size is announced (Content-Length) or not (chunked).
- stop strings: at most 16 of at most 256 characters (OpenAI allows 4; each one is searched for after every token
  on the engine thread): 10k of them is a 400, 16 a 200.
- JSON nested 100k deep: 400 (the parser's recursion limit is a parse error, not a crash); 50 deep in an unknown
  field: 200 (unknown fields are ignored).
- invalid UTF-8 and lone surrogates (raw or as a \\ud800 escape): 400, before the tokenizer sees them.
- max_tokens 0: 400 (OpenAI and vLLM: "must be at least 1") except with echo + logprobs (scoring the prompt); 2^63
  and -1: 400.
- logprobs: top_logprobs 0..20 (20 is a 200 with 20 alternatives per token), 21 / -1 / without logprobs=true: 400;
  completions' logprobs 0..20 likewise.
- messages: [] / a message without role / an unknown role / null content: 400; empty content: 200.
- a chat template that raises (`raise_exception`): 400 with the template's message.
"""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from serve_helpers import running_server

from .http_checks import SERVED, openai_error_problem, serve_config, wait_idle

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server(tiny_llama):
    with running_server(serve_config(tiny_llama[0], max_queue=64)) as (url, state):
        yield url, state


@pytest.fixture(autouse=True)
def alive_after(request):
    """After every test here: the server answers /health and holds no request."""
    yield
    if "server" not in request.fixturenames:
        return
    url, state = request.getfixturevalue("server")
    wait_idle(state)
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    assert not state.engine.running and not state.engine.waiting


def chat(**fields) -> bytes:
    return json.dumps({"model": SERVED, "messages": USER, "max_tokens": 4, **fields}).encode()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# class -> [(what, path, raw body, expected status)]
CASES = {
    "NaN / Infinity in JSON": [
        ("temperature NaN", CHAT, chat()[:-1] + b', "temperature": NaN}', 400),
        ("top_p Infinity", CHAT, chat()[:-1] + b', "top_p": Infinity}', 400),
        ("repetition_penalty Infinity", CHAT, chat()[:-1] + b', "repetition_penalty": Infinity}', 400),
        ("presence_penalty -Infinity", CHAT, chat()[:-1] + b', "presence_penalty": -Infinity}', 400),
        (
            "max_tokens NaN",
            CHAT,
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": NaN}',
            400,
        ),
        ("min_p NaN (completions)", COMPLETIONS, b'{"model": "tiny", "prompt": "the cat", "min_p": NaN}', 400),
    ],
    "denormal sampling values": [  # found by the soak fuzzer: NaN/-inf logprobs once made the JSON response a 500
        (
            "repetition_penalty 5e-324 + logprobs (completions)",
            COMPLETIONS,
            json.dumps(
                {
                    "model": SERVED,
                    "prompt": [49, 66, 212],
                    "max_tokens": 4,
                    "logprobs": 1,
                    "top_p": 5e-324,
                    "repetition_penalty": 5e-324,
                    "temperature": 0.0,
                    "stop": "0",
                    "min_tokens": 1,
                }
            ).encode(),
            200,
        ),
        (
            "repetition_penalty 5e-324 + top_logprobs (chat)",
            CHAT,
            chat(logprobs=True, top_logprobs=5, repetition_penalty=5e-324, top_p=5e-324, temperature=0.0, min_tokens=1),
            200,
        ),
    ],
    "10k stop strings": [
        ("10k stop strings", CHAT, chat(stop=[f"s{i}" for i in range(10_000)]), 400),
        ("17 stop strings", CHAT, chat(stop=[f"s{i}" for i in range(17)]), 400),
        ("16 stop strings", CHAT, chat(stop=[f"s{i}" for i in range(16)]), 200),
        ("one 100k-character stop string", CHAT, chat(stop="x" * 100_000), 400),
        ("an empty stop string", CHAT, chat(stop=""), 400),
        ("an empty stop list", CHAT, chat(stop=[]), 200),
    ],
    "deeply nested JSON": [
        ("100k-deep array body", CHAT, nested(100_000).encode(), 400),
        ("100k-deep unknown field", CHAT, chat()[:-1] + b', "x": ' + nested(100_000).encode() + b"}", 400),
        (
            "100k-deep content",
            CHAT,
            json.dumps({"model": SERVED, "messages": "M"}).replace('"M"', nested(100_000)).encode(),
            400,
        ),
        ("50-deep unknown field (ignored)", CHAT, chat()[:-1] + b', "x": ' + nested(50).encode() + b"}", 200),
    ],
    "invalid UTF-8 and lone surrogates": [
        (
            "invalid UTF-8 in content",
            CHAT,
            chat(messages=[{"role": "user", "content": "@@"}]).replace(b"@@", b"\xff\xfe\xc3("),
            400,
        ),
        (
            "raw UTF-8-encoded surrogate",
            CHAT,
            chat(messages=[{"role": "user", "content": "@@"}]).replace(b"@@", b"\xed\xa0\x80"),
            400,
        ),
        ("lone surrogate escape in content", CHAT, chat(messages=[{"role": "user", "content": "\ud800"}]), 400),
        (
            "lone surrogate escape in prompt",
            COMPLETIONS,
            json.dumps({"model": SERVED, "prompt": "a \udfff b", "max_tokens": 2}).encode(),
            400,
        ),
        ("lone surrogate in a stop string", CHAT, chat(stop=["\ud83d"]), 400),
        ("lone surrogate in model", CHAT, chat(model="tiny\ud800"), 400),
        (
            "a valid surrogate pair (emoji) as escapes",
            CHAT,
            chat(messages=[{"role": "user", "content": "\U0001f600"}]),
            200,
        ),
        (
            "Latin-1 body",
            CHAT,
            chat(messages=[{"role": "user", "content": "@@"}]).replace(b"@@", "café".encode("latin-1")),
            400,
        ),
    ],
    "max_tokens extremes": [
        ("max_tokens 0", CHAT, chat(max_tokens=0), 400),
        ("max_tokens -1", CHAT, chat(max_tokens=-1), 400),
        ("max_tokens 2^63", CHAT, chat(max_tokens=2**63), 400),
        ("max_tokens 2^64 + 1", CHAT, chat(max_tokens=2**64 + 1), 400),
        ("max_completion_tokens 2^63", CHAT, chat(max_completion_tokens=2**63), 400),
        ("max_tokens 1e400 (a float that overflows)", CHAT, chat()[:-1] + b', "max_tokens": 1e400}', 400),
        ("max_tokens 1", CHAT, chat(max_tokens=1), 200),
        (
            "max_tokens 0 (completions)",
            COMPLETIONS,
            json.dumps({"model": SERVED, "prompt": "hi", "max_tokens": 0}).encode(),
            400,
        ),
        (
            "max_tokens 0 with echo and logprobs (scoring)",
            COMPLETIONS,
            json.dumps({"model": SERVED, "prompt": "hi", "max_tokens": 0, "echo": True, "logprobs": 0}).encode(),
            200,
        ),
        (
            "max_tokens 2^63 (completions)",
            COMPLETIONS,
            json.dumps({"model": SERVED, "prompt": "hi", "max_tokens": 2**63}).encode(),
            400,
        ),
        ("min_tokens 2^63", CHAT, chat(min_tokens=2**63), 400),
        ("seed 2^64", CHAT, chat(seed=2**64), 400),
        ("seed 2^64 - 1", CHAT, chat(seed=2**64 - 1, temperature=1.0), 200),
        ("top_k 2^62", CHAT, chat(top_k=2**62, temperature=1.0), 200),
        ("top_p 1e-300", CHAT, chat(top_p=1e-300, temperature=1.0), 200),
        ("temperature 1e-300", CHAT, chat(temperature=1e-300), 200),
    ],
    "logprobs extremes": [
        ("top_logprobs 20", CHAT, chat(logprobs=True, top_logprobs=20), 200),
        ("top_logprobs 21", CHAT, chat(logprobs=True, top_logprobs=21), 400),
        ("top_logprobs -1", CHAT, chat(logprobs=True, top_logprobs=-1), 400),
        ("top_logprobs 2^63", CHAT, chat(logprobs=True, top_logprobs=2**63), 400),
        ("top_logprobs without logprobs", CHAT, chat(top_logprobs=5), 400),
        ("logprobs not a bool", CHAT, chat(logprobs="maybe"), 400),  # "yes"/"true" pass, as in vLLM (pydantic)
        (
            "completions logprobs 0",
            COMPLETIONS,
            json.dumps({"model": SERVED, "prompt": "hi", "max_tokens": 2, "logprobs": 0}).encode(),
            200,
        ),
        (
            "completions logprobs 20",
            COMPLETIONS,
            json.dumps({"model": SERVED, "prompt": "hi", "max_tokens": 2, "logprobs": 20}).encode(),
            200,
        ),
        (
            "completions logprobs 21",
            COMPLETIONS,
            json.dumps({"model": SERVED, "prompt": "hi", "max_tokens": 2, "logprobs": 21}).encode(),
            400,
        ),
        (
            "completions logprobs -1",
            COMPLETIONS,
            json.dumps({"model": SERVED, "prompt": "hi", "max_tokens": 2, "logprobs": -1}).encode(),
            400,
        ),
    ],
    "empty, role-less and unknown-role messages": [
        ("messages []", CHAT, chat(messages=[]), 400),
        ("messages missing", CHAT, json.dumps({"model": SERVED}).encode(), 400),
        ("messages null", CHAT, chat(messages=None), 400),
        ("a message without role", CHAT, chat(messages=[{"content": "hi"}]), 400),
        ("a message without content", CHAT, chat(messages=[{"role": "user"}]), 400),
        ("content null", CHAT, chat(messages=[{"role": "user", "content": None}]), 400),
        ("an empty message {}", CHAT, chat(messages=[{}]), 400),
        ("a message that is a string", CHAT, chat(messages=["hi"]), 400),
        ("unknown role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400),
        ("role not a string", CHAT, chat(messages=[{"role": 7, "content": "hi"}]), 400),
        (
            "an image content part",
            CHAT,
            chat(
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
            ),
            400,
        ),
        (
            "a text part whose text is a number",
            CHAT,
            chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
            400,
        ),
        ("empty content", CHAT, chat(messages=[{"role": "user", "content": ""}]), 200),
        ("empty content-part list", CHAT, chat(messages=[{"role": "user", "content": []}]), 200),
        (
            "text content parts",
            CHAT,
            chat(
                messages=[
                    {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}
                ]
            ),
            200,
        ),
    ],
    "malformed bodies": [
        ("empty body", CHAT, b"", 400),
        ("JSON null", CHAT, b"null", 400),
        ("a JSON array", CHAT, b"[]", 400),
        ("a JSON string", CHAT, b'"hello"', 400),
        ("truncated JSON", CHAT, chat()[:-7], 400),
        ("a NUL byte", CHAT, b"\x00", 400),
        ("prompt []", COMPLETIONS, json.dumps({"model": SERVED, "prompt": []}).encode(), 400),
        ("prompt ''", COMPLETIONS, json.dumps({"model": SERVED, "prompt": ""}).encode(), 400),
        ("prompt token -1", COMPLETIONS, json.dumps({"model": SERVED, "prompt": [-1]}).encode(), 400),
        ("prompt token 2^63", COMPLETIONS, json.dumps({"model": SERVED, "prompt": [2**63]}).encode(), 400),
        ("prompt of lists (batch)", COMPLETIONS, json.dumps({"model": SERVED, "prompt": [[1, 2]]}).encode(), 200),
        (
            "prompt batch, text and ids mixed",
            COMPLETIONS,
            json.dumps({"model": SERVED, "prompt": [[1, 2], "hi"]}).encode(),
            400,
        ),
        ("prompt batch with an empty list", COMPLETIONS, json.dumps({"model": SERVED, "prompt": [[]]}).encode(), 400),
        ("n 2^63", CHAT, chat(n=2**63), 400),
        ("stream_options a string", CHAT, chat(stream=True, stream_options="yes"), 400),
    ],
}


@pytest.mark.parametrize("kind", list(CASES))
def test_edge_cases(server, record, kind):
    url, _ = server
    failures = []
    with httpx.Client(timeout=30) as client:
        for what, path, body, expect in CASES[kind]:
            try:
                r = client.post(url + path, content=body, headers={"Content-Type": "application/json"})
            except httpx.HTTPError as e:  # a hang (timeout) or a dropped connection
                failures.append(f"{what}: {type(e).__name__}: {e}")
                continue
            problem = openai_error_problem(r) if r.status_code >= 400 else None
            if r.status_code != expect or problem:
                failures.append(f"{what}: expected {expect}, got {r.status_code} {problem or r.text[:300]}")
    record(kind=f"edge: {kind}", tried=len(CASES[kind]), failures=len(failures))
    assert not failures, "\n".join(failures)


def test_ten_megabyte_bodies(server, record):
    """Over --max-body-bytes: 413 in the OpenAI body whether Content-Length announces it or the body is chunked."""
    url, _ = server
    big = chat(messages=[{"role": "user", "content": "a" * (10 << 20)}])

    def chunks():
        for i in range(0, len(big), 1 << 16):
            yield big[i : i + 1 << 16]

    failures = []
    with httpx.Client(timeout=60) as client:
        for what, kw in (("Content-Length", {"content": big}), ("chunked", {"content": chunks()})):
            try:
                r = client.post(url + CHAT, headers={"Content-Type": "application/json"}, **kw)
            except httpx.HTTPError as e:
                failures.append(f"{what}: {type(e).__name__}: {e}")
                continue
            if r.status_code != 413 or openai_error_problem(r):
                failures.append(f"{what}: expected 413, got {r.status_code} {r.text[:200]}")
    record(kind="edge: 10 MB bodies", tried=2, failures=len(failures))
    assert not failures, "\n".join(failures)


def test_unknown_routes_and_methods_get_openai_errors(server):
    url, _ = server
    for method, path, status in (("GET", "/v1/nope", 404), ("GET", CHAT, 405), ("DELETE", "/health", 405)):
        r = httpx.request(method, url + path, timeout=10)
        assert r.status_code == status and openai_error_problem(r) is None, (method, path, r.text)


RAISING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_chat_template_that_raises(tiny_llama, tmp_path, record):
    """A model whose own chat template rejects a message (Gemma's refuses a system role): 400 with its message."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama[0], folder)
    (folder / "chat_template.jinja").write_text(RAISING_TEMPLATE)
    with running_server(serve_config(folder)) as (url, state):
        bad = {"model": SERVED, "max_tokens": 2, "messages": [{"role": "system", "content": "be brief"}, *USER]}
        r = httpx.post(url + CHAT, json=bad, timeout=30)
        ok = httpx.post(url + CHAT, json={"model": SERVED, "max_tokens": 2, "messages": USER}, timeout=30)
        alive = httpx.get(url + "/health", timeout=10).status_code == 200
    refused = (
        r.status_code == 400
        and openai_error_problem(r) is None
        and "System role not supported" in r.json()["error"]["message"]
    )
    failures = (not refused) + (ok.status_code != 200) + (not alive)
    record(kind="edge: chat template that raises", tried=2, failures=int(failures))
    assert r.status_code == 400, r.text
    assert "System role not supported" in r.json()["error"]["message"] and r.json()["error"]["param"] == "messages"
    assert ok.status_code == 200 and alive
