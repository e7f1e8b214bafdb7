"""serve/api.py over a real loopback server: OpenAI shapes, streaming, errors, auth, overload, cancel, adapters."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import torch
from serve_helpers import post, random_lora, running_server, sse_events
from serve_helpers import tiny_config as config

import slimlm
from slimlm.engine.core import EngineConfig
from slimlm.generate import SamplingParams
from slimlm.serve.state import ServeConfig, ServerState

CHAT = [{"role": "user", "content": "tell me a story about the red fox"}]


@pytest.fixture(scope="module")
def server(tiny_llama):
    with running_server(config(tiny_llama[0])) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return slimlm.load(str(tiny_llama[0]), dtype="fp32")


def test_chat_matches_generate_and_has_openai_shape(server, reference):
    url, _ = server
    r = post(
        url,
        "/v1/chat/completions",
        {"model": "tiny", "messages": CHAT, "max_tokens": 12, "temperature": 0, "ignore_eos": True},
        headers={"X-Request-Id": "abc-1"},
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-1"
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    ref = reference.complete([CHAT], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert choice["message"]["content"] == ref.text
    assert body["usage"] == {
        "prompt_tokens": ref.prompt_tokens,
        "completion_tokens": 12,
        "total_tokens": ref.prompt_tokens + 12,
    }


def test_stream_equals_blocking_and_ends_with_done(server):
    url, _ = server
    req = {"model": "tiny", "messages": CHAT, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    whole = post(url, "/v1/chat/completions", req).json()["choices"][0]["message"]["content"]
    with httpx.stream(
        "POST",
        url + "/v1/chat/completions",
        timeout=30,
        json={**req, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2])
    assert text == whole
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 10


def test_completions_with_logprobs(server, reference):
    url, _ = server
    r = post(
        url,
        "/v1/completions",
        {
            "model": "tiny",
            "prompt": "the cat sat on",
            "max_tokens": 5,
            "temperature": 0,
            "logprobs": 3,
            "ignore_eos": True,
        },
    )
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == 5 and all(len(t) == 3 for t in lp["top_logprobs"])
    ids = reference.tokenizer.encode("the cat sat on")
    logits = reference.model(torch.tensor([ids]))[0, -1].float()
    assert lp["token_logprobs"][0] == pytest.approx(logits.log_softmax(-1).max().item(), abs=1e-4)  # greedy = top-1
    assert choice["text"] == reference.generate(ids, max_new_tokens=5, ignore_eos=True)


@pytest.mark.parametrize(
    "body,status,param",
    [
        ({"model": "nope", "prompt": "hi"}, 404, "model"),  # OpenAI: 404 invalid_request_error model_not_found
        ({"model": "other:x", "prompt": "hi"}, 404, "model"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": 65}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "the cat " * 80, "max_tokens": 16}, 400, "prompt"),
        ({"model": "tiny", "prompt": "the cat " * 30, "max_tokens": 64}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "hi", "temperature": 5}, 400, "temperature"),
        ({"model": "tiny", "prompt": "hi", "n": 2}, 400, "n"),
        ({"model": "tiny", "prompt": [1, 999999]}, 400, "prompt"),
        ({"prompt": "hi"}, 400, "model"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, param):
    url, _ = server
    r = post(url, "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


def test_malformed_json_and_oversized_body(server):
    url, state = server
    r = httpx.post(
        url + "/v1/chat/completions",
        content=b'{"model": "tiny", "messages": [',
        timeout=10,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    big = {"model": "tiny", "prompt": "x" * (state.config.max_body_bytes + 10)}
    r = post(url, "/v1/completions", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_models_health_ready_metrics(server):
    url, _ = server
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/ready").status_code == 200
    assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["tiny"]
    post(url, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 3})
    text = httpx.get(url + "/metrics").text
    for name in (
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:generation_tokens_total",
        "vllm:prompt_tokens_total",
    ):
        assert name in text, name
    assert 'model_name="tiny"' in text


def test_not_ready_until_loaded(tiny_llama):
    with running_server(config(tiny_llama[0]), load=False) as (url, state):
        assert httpx.get(url + "/health").status_code == 200
        r = httpx.get(url + "/ready")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert post(url, "/v1/completions", {"model": "tiny", "prompt": "hi"}).status_code == 503
        state.load()
        assert httpx.get(url + "/ready").status_code == 200


def test_api_keys(tiny_llama, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("k1\nk2\n")
    with running_server(config(tiny_llama[0], api_key_file=str(keys))) as (url, _):
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        assert post(url, "/v1/completions", body).status_code == 401
        r = post(url, "/v1/completions", body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert post(url, "/v1/completions", body, headers={"Authorization": "Bearer k2"}).status_code == 200
        assert httpx.get(url + "/health").status_code == 200  # probes need no key


def test_api_keys_under_a_mounted_prefix(tiny_llama, tmp_path):
    # Behind a proxy that mounts the app at /prefix (ASGI root_path, as Ray Serve's route_prefix does), the path the
    # app sees starts with the prefix: the key check must still apply to /prefix/v1/...
    from slimlm.serve.api import create_app

    state = ServerState(config(tiny_llama[0], api_keys=["k1"]))
    state.load()
    try:
        app = create_app(state)

        async def mounted(scope, receive, send):
            if scope["type"] == "http":
                scope = {**scope, "root_path": "/prefix", "path": "/prefix" + scope["path"]}
            await app(scope, receive, send)

        async def ask(headers):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=mounted), base_url="http://t") as c:
                return await c.post(
                    "/v1/completions", headers=headers, json={"model": "tiny", "prompt": "hi", "max_tokens": 2}
                )

        assert asyncio.run(ask({})).status_code == 401
        assert asyncio.run(ask({"Authorization": "Bearer k1"})).status_code == 200
    finally:
        state.close()


def test_full_queue_gets_429_with_retry_after(tiny_llama):
    engine = EngineConfig(max_batch=1, max_queue=1, max_seq_len=120, max_loras=0)
    with running_server(config(tiny_llama[0], engine=engine)) as (url, _):
        body = {"model": "tiny", "prompt": "the cat", "max_tokens": 60, "ignore_eos": True}
        results = []
        threads = [
            threading.Thread(target=lambda: results.append(post(url, "/v1/completions", body))) for _ in range(5)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert codes.count(200) >= 2 and 429 in codes, codes
        busy = next(r for r in results if r.status_code == 429)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "queue_full"


def test_client_disconnect_frees_the_slot(server):
    url, state = server
    body = {"model": "tiny", "prompt": "the cat", "max_tokens": 64, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        next(lines)
        assert len(state.engine.running) == 1
    deadline = time.monotonic() + 5
    while state.engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not state.engine.running and state.engine.cache.usage() == 0
    assert 'finished_reason="abort"' in httpx.get(url + "/metrics").text


def _lora(tiny_llama, folder, seed: int, r: int = 4):
    return random_lora(tiny_llama[0], folder, seed, r)


def _greedy(url, model, n=8):
    r = post(
        url,
        "/v1/chat/completions",
        {"model": model, "messages": CHAT, "max_tokens": n, "temperature": 0, "ignore_eos": True},
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_static_adapters_per_request(tiny_llama, tmp_path):
    a = _lora(tiny_llama, tmp_path / "a", seed=1)
    with running_server(config(tiny_llama[0], adapters=[f"fox={a}"])) as (url, _):
        ids = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert ids == ["tiny", "tiny:fox"]
        ref = slimlm.load(str(tiny_llama[0]), dtype="fp32", adapter=a)
        want = ref.complete([CHAT], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].text
        assert _greedy(url, "tiny:fox") == want and _greedy(url, "fox") == want
        assert _greedy(url, "tiny") != want


def test_registry_versions_alias_rollback_without_restart(tiny_llama, tmp_path):
    from slimlm.serve.registry import Registry

    reg = Registry(tmp_path / "reg")
    reg.push("ad", _lora(tiny_llama, tmp_path / "v1", seed=1))
    with running_server(config(tiny_llama[0], registry=str(tmp_path / "reg"))) as (url, _):
        v1 = _greedy(url, "tiny:ad")
        reg.push("ad", _lora(tiny_llama, tmp_path / "v2", seed=2, r=8))
        v2 = _greedy(url, "tiny:ad")
        assert v2 != v1 and _greedy(url, "tiny:ad@1") == v1 and _greedy(url, "ad@2") == v2
        reg.alias("ad@1", "prod")
        assert _greedy(url, "tiny:ad@prod") == v1
        reg.rollback("ad")
        assert _greedy(url, "tiny:ad") == v1
        assert any(m["id"] == "tiny:ad@2" for m in httpx.get(url + "/v1/models").json()["data"])
        r = post(url, "/v1/completions", {"model": "tiny:ad@9", "prompt": "hi"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_corrupt_and_oversized_adapters_refused(tiny_llama, tmp_path):
    from slimlm.serve.registry import Registry

    reg = Registry(tmp_path / "reg")
    entry = reg.push("big", _lora(tiny_llama, tmp_path / "big", seed=3, r=16))  # max_lora_rank is 8
    bad = reg.push("bad", _lora(tiny_llama, tmp_path / "bad", seed=4))
    with open(bad.path / "adapter_model.safetensors", "r+b") as f:  # flip bytes in the stored copy
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    with running_server(config(tiny_llama[0], registry=str(tmp_path / "reg"))) as (url, _):
        r = post(url, "/v1/completions", {"model": "tiny:big", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 400 and "max_rank" in r.json()["error"]["message"], r.text
        r = post(url, "/v1/completions", {"model": "tiny:bad", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 400 and "corrupt" in r.json()["error"]["message"], r.text
        assert post(url, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2}).status_code == 200
    assert entry.version == 1


def test_batch_job(tiny_llama, tmp_path, reference):
    from slimlm.serve.batch import read_batch_file, run_batch

    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "tiny",
                "messages": [{"role": "user", "content": f"story {i}"}],
                "max_tokens": 6,
                "temperature": 0,
                "ignore_eos": True,
            },
        }
        for i in range(5)
    ]
    lines.append(
        {"custom_id": "bad-model", "method": "POST", "url": "/v1/completions", "body": {"model": "nope", "prompt": "x"}}
    )
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = run_batch(config(tiny_llama[0]), src, tmp_path / "out.jsonl", progress=False)
    assert (summary.total, summary.succeeded, summary.failed) == (6, 5, 1)
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in out] == [x["custom_id"] for x in lines]
    want = reference.complete(
        [[{"role": "user", "content": "story 3"}]], SamplingParams(max_new_tokens=6, ignore_eos=True)
    )[0].text
    assert out[3]["response"]["body"]["choices"][0]["message"]["content"] == want
    assert out[5]["response"]["status_code"] == 404
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"custom_id": "a", "url": "/v1/chat/completions", "body": {}}\nnot json\n'
        '{"custom_id": "a", "url": "/v1/embeddings", "body": {}}\n'
    )
    with pytest.raises(ValueError, match=r"line 2: invalid JSON.*\n.*line 3: custom_id 'a' is used twice"):
        read_batch_file(bad)


def test_load_and_unload_adapter_at_run_time(tiny_llama, tmp_path):
    a = _lora(tiny_llama, tmp_path / "a", seed=5)
    with running_server(config(tiny_llama[0], allow_runtime_lora=True, lora_roots=[str(tmp_path)])) as (url, state):
        assert post(url, "/v1/completions", {"model": "tiny:late", "prompt": "hi"}).status_code == 404
        r = post(url, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": str(a)})
        assert r.status_code == 200, r.text
        ref = slimlm.load(str(tiny_llama[0]), dtype="fp32", adapter=a)
        want = ref.complete([CHAT], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].text
        assert _greedy(url, "tiny:late") == want
        assert state.engine.lru.loaded() == [("static", "late")]
        assert post(url, "/v1/unload_lora_adapter", {"lora_name": "late"}).status_code == 200
        assert post(url, "/v1/completions", {"model": "tiny:late", "prompt": "hi"}).status_code == 404
        deadline = time.monotonic() + 5
        while state.engine.lru.loaded() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state.engine.lru.loaded() == []  # its slot is free again
        r = post(url, "/v1/load_lora_adapter", {"lora_name": "../x", "lora_path": str(a)})
        assert r.status_code == 400


def test_official_openai_client(server, reference):
    """The `openai` package, unchanged, against our server: blocking, streaming with usage, and its error types."""
    openai = pytest.importorskip("openai")
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    want = reference.complete([CHAT], SamplingParams(max_new_tokens=9, ignore_eos=True))[0].text
    r = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=9, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].message.content == want and r.usage.completion_tokens == 9
    stream = client.chat.completions.create(
        model="tiny",
        messages=CHAT,
        max_tokens=9,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens
    c = client.completions.create(model="tiny", prompt="the cat", max_tokens=4, temperature=0)
    assert c.choices[0].finish_reason in ("stop", "length") and c.object == "text_completion"
    assert [m.id for m in client.models.list()] == ["tiny"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="missing", prompt="x")
    assert e.value.code == "model_not_found"


def test_quantize_auto_is_int8_weight_only_on_cpu_only():
    from slimlm.serve.state import resolve_auto_quantize

    assert resolve_auto_quantize(ServeConfig(quantize="auto")) == ("int8", "fp32")
    assert resolve_auto_quantize(ServeConfig(quantize="auto", device="cuda")) == (None, "auto")
    assert resolve_auto_quantize(ServeConfig(quantize="auto", dtype="bf16")) == (None, "bf16")
    assert resolve_auto_quantize(ServeConfig(quantize=None, dtype="fp32")) == (None, "fp32")
    assert resolve_auto_quantize(ServeConfig(quantize="int4")) == ("int4", "auto")
    from slimlm.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.quantize == "auto"
