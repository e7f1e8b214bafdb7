"""serve/bench.py: the load generator against a real slimlm server on loopback, and against canned SSE streams."""

from __future__ import annotations

import argparse
import asyncio
import json

import httpx
import pytest
from serve_helpers import free_port, random_lora, running_server

from slimlm.engine.core import EngineConfig
from slimlm.serve.bench import BenchConfig, add_bench_commands, percentile, run_bench, run_bench_async
from slimlm.serve.state import ServeConfig


def serve_config(folder, engine: EngineConfig | None = None, **kw) -> ServeConfig:
    engine = engine or EngineConfig(max_batch=4, max_seq_len=120, max_loras=2, max_lora_rank=8)
    return ServeConfig(model=str(folder), served_name="tiny", dtype="fp32", max_tokens_limit=64, engine=engine, **kw)


@pytest.fixture(scope="module")
def server(tiny_llama):
    with running_server(serve_config(tiny_llama[0])) as (url, state):
        yield url, state


def check_ordered(stats: dict) -> None:
    assert stats["min"] <= stats["median"] <= stats["p99"] <= stats["max"]
    assert stats["min"] <= stats["mean"] <= stats["max"]


def test_bench_against_slimlm_server(server):
    url, _ = server
    s = run_bench(
        BenchConfig(url=url, concurrency=3, requests=6, prompt_tokens=8, max_tokens=6, ignore_eos=True, warmup=1)
    )
    assert s["model"] == "tiny" and s["completed"] == 6 and s["failed"] == 0
    assert s["total_output_tokens"] == 36 and s["output_tokens_from"] == {"usage": 6}
    reqs = s["requests"]
    for r in reqs:
        assert r["ok"] and r["status"] == 200 and r["finish_reason"] == "length" and r["output_tokens"] == 6
        assert 0 < r["ttft_s"] <= r["e2e_s"] and r["prompt_tokens"] > 8
        assert len(r["itl_s"]) == r["chunks"] - 1 and 1 <= r["chunks"] <= 6  # a partial UTF-8 char waits for its rest
    assert s["total_input_tokens"] == sum(r["prompt_tokens"] for r in reqs)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        check_ordered(s[key])
    assert s["ttft_ms"]["n"] == s["e2e_ms"]["n"] == 6 and s["ttft_ms"]["max"] <= s["e2e_ms"]["max"]
    assert s["itl_ms"]["n"] == sum(r["chunks"] - 1 for r in reqs)
    assert s["output_throughput"] == pytest.approx(36 / s["duration_s"])
    assert s["request_throughput"] == pytest.approx(6 / s["duration_s"])


def test_completions_endpoint_and_same_prompts_for_same_seed(server):
    url, _ = server
    cfg = dict(
        url=url + "/v1",
        endpoint="completions",
        concurrency=2,
        requests=2,
        prompt_tokens=5,
        max_tokens=4,
        ignore_eos=True,
    )
    a, b = run_bench(BenchConfig(**cfg)), run_bench(BenchConfig(**cfg))
    assert a["completed"] == 2 and a["total_output_tokens"] == 8
    assert [r["prompt_tokens"] for r in a["requests"]] == [r["prompt_tokens"] for r in b["requests"]]


def test_overloaded_server_429s_are_counted_not_fatal(tiny_llama):
    engine = EngineConfig(max_batch=1, max_queue=1, max_seq_len=120, max_loras=0)
    with running_server(serve_config(tiny_llama[0], engine=engine)) as (url, _):
        s = run_bench(BenchConfig(url=url, concurrency=6, requests=6, prompt_tokens=8, max_tokens=40, ignore_eos=True))
    assert s["completed"] + s["failed"] == 6 and s["completed"] >= 2
    assert s["failed_429"] >= 1 and s["failed_by_status"] == {"429": s["failed"]}
    assert s["total_output_tokens"] == 40 * s["completed"]
    assert all(r["status"] == 429 and "busy" in r["error"] for r in s["requests"] if not r["ok"])


def test_cli_cycles_adapters_and_writes_json(tiny_llama, tmp_path, capsys):
    fox = random_lora(tiny_llama[0], tmp_path / "fox", seed=1)
    parser = argparse.ArgumentParser()
    add_bench_commands(parser.add_subparsers(dest="command"))
    with running_server(serve_config(tiny_llama[0], adapters=[f"fox={fox}"])) as (url, _):
        args = parser.parse_args(
            [
                "bench",
                "serve",
                "--url",
                url,
                "--adapters",
                "tiny,fox,nope",
                "--requests",
                "6",
                "--concurrency",
                "2",
                "--prompt-tokens",
                "6",
                "--max-tokens",
                "3",
                "--ignore-eos",
                "--wait",
                "10",
                "--json",
                str(tmp_path / "out.json"),
            ]
        )
        assert args.func(args) == 0
    s = json.loads((tmp_path / "out.json").read_text())
    assert s["requests_per_model"] == {"tiny:tiny": 2, "tiny:fox": 2, "tiny:nope": 2}
    assert s["completed"] == 4 and s["failed_by_status"] == {"404": 2} and s["failed_429"] == 0
    assert all(("does not exist" in r["error"]) == (r["model"] == "tiny:nope") for r in s["requests"] if r["error"])
    table = capsys.readouterr().out
    assert "Successful requests:" in table and "Median TTFT (ms):" in table and "HTTP 404:" in table


def _sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def test_servers_without_usage_are_counted_from_finish_reason_or_chunks(tmp_path):
    """llama-cpp-python streams no usage: 'length' means max_tokens exactly, otherwise the text chunks count."""

    def piece(text, finish=None):
        return {"choices": [{"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}]}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "peer"}]})
        body = json.loads(request.content)
        assert body["stream"] and body["min_tokens"] == 5 and body["model"] == "peer"
        if body["messages"][0]["content"] == "stop early":  # a role-only chunk, a ping comment, then 2 tokens
            return httpx.Response(
                200, content=_sse(piece("")) + b": ping\n\n" + _sse(piece("a"), piece("b", "stop"), b"[DONE]")
            )
        return httpx.Response(200, content=_sse(piece("x"), piece("y"), piece(None, "length"), b"[DONE]"))

    mock = httpx.MockTransport(handler)
    cfg = BenchConfig(url="http://peer", requests=2, max_tokens=5, concurrency=1, extra_body={"min_tokens": 5})
    s = asyncio.run(run_bench_async(cfg, transport=mock))
    assert s["model"] == "peer" and s["completed"] == 2 and s["total_input_tokens"] is None
    assert s["output_tokens_from"] == {"length": 2} and s["total_output_tokens"] == 10

    (tmp_path / "p.jsonl").write_text('"stop early"\n\n{"prompt": "stop early"}\n')
    cfg.dataset = str(tmp_path / "p.jsonl")
    s = asyncio.run(run_bench_async(cfg, transport=mock))
    assert s["output_tokens_from"] == {"chunks": 2} and s["total_output_tokens"] == 4
    assert all(r["chunks"] == 2 and r["finish_reason"] == "stop" and len(r["itl_s"]) == 1 for r in s["requests"])


def test_stream_errors_and_dead_servers_are_failures():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=_sse({"error": {"message": "engine blew up"}}))

    s = asyncio.run(
        run_bench_async(
            BenchConfig(url="http://x", model="m", requests=2, concurrency=2), transport=httpx.MockTransport(handler)
        )
    )
    assert s["completed"] == 0 and s["failed_by_status"] == {"200": 2} and s["errors"] == ["engine blew up"]
    assert s["ttft_ms"] is None and s["request_throughput"] == 0

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    s = asyncio.run(
        run_bench_async(
            BenchConfig(url="http://x", model="m", requests=3, concurrency=1), transport=httpx.MockTransport(refuse)
        )
    )
    assert s["failed_by_status"] == {"no_response": 3} and "ConnectError" in s["errors"][0]


def test_percentile_matches_numpy_linear():
    import numpy as np

    xs = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    for q in (0, 25, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(np.percentile(xs, q))


def test_invalid_config_names_every_flag():
    with pytest.raises(ValueError, match=r"--concurrency must be >= 1.*--max-tokens must be >= 1.*--endpoint"):
        BenchConfig(concurrency=0, max_tokens=0, endpoint="embeddings").validate()
    parser = argparse.ArgumentParser()
    add_bench_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "serve", "--extra-body", "{oops"])
    with pytest.raises(ValueError, match="--extra-body is not JSON"):
        args.func(args)
    args = parser.parse_args(["bench", "serve", "--url", f"http://127.0.0.1:{free_port()}"])
    with pytest.raises(ValueError, match="is the server running"):
        args.func(args)


def test_shared_system_prompt_is_the_same_in_every_body():
    from slimlm.serve.bench import request_bodies, system_prompt

    cfg = BenchConfig(model="m", requests=3, prompt_tokens=4, system_prompt_tokens=30)
    bodies = request_bodies(cfg, "m", 3, seed=0)
    system = system_prompt(30)
    assert len(system.split()) == 30 and system == system_prompt(30)
    assert all(
        b["messages"][0] == {"role": "system", "content": system} and b["messages"][1]["role"] == "user" for b in bodies
    )
    assert len({b["messages"][1]["content"] for b in bodies}) == 3  # the user prompts still differ
    assert (
        request_bodies(BenchConfig(system_prompt_tokens=30, seed=7), "m", 1, seed=7)[0]["messages"][0]["content"]
        == system
    )  # the same system prompt for any seed
    done = request_bodies(BenchConfig(endpoint="completions", prompt_tokens=4, system_prompt_tokens=30), "m", 1, 0)
    assert done[0]["prompt"].startswith(system + "\n\n")
    assert "messages" not in done[0] and request_bodies(BenchConfig(), "m", 1, 0)[0]["messages"][0]["role"] == "user"
    with pytest.raises(ValueError, match="--system-prompt-tokens must be >= 0"):
        BenchConfig(system_prompt_tokens=-1).validate()
