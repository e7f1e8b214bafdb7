"""The server as the tools people already run expect it (issue 16): OpenAI's 404 for an unknown model, batched and
echoed completions (lm-evaluation-harness's loglikelihood: echo + logprobs + max_tokens 0), vLLM's /tokenize,
/detokenize and /version, API keys from flags and the environment, and JSON log lines."""

from __future__ import annotations

import httpx
import pytest
import serve_helpers
import torch
from serve_helpers import running_server
from serve_helpers import tiny_config as config

import slimlm


@pytest.fixture(scope="module")
def server(tiny_llama):
    with running_server(config(tiny_llama[0])) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return slimlm.load(str(tiny_llama[0]), dtype="fp32")


def post(url, path, body, **kw):
    return serve_helpers.post(url, path, body, timeout=60, **kw)


def test_unknown_model_is_openai_404(server):
    url, _ = server
    r = post(url, "/v1/completions", {"model": "nope", "prompt": "hi"})
    assert r.status_code == 404
    assert r.json()["error"]["message"].startswith("The model `nope` does not exist")
    assert {k: v for k, v in r.json()["error"].items() if k != "message"} == {
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


def test_echo_logprobs_without_generation_score_the_prompt(server, reference):
    """lm-evaluation-harness's loglikelihood request: the prompt's token logprobs from the model's own forward."""
    url, _ = server
    ids = reference.tokenizer.encode("the cat sat on the mat")
    r = post(
        url,
        "/v1/completions",
        {"model": "tiny", "prompt": [ids], "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    want = reference.model(torch.tensor([ids]))[0, :-1].float().log_softmax(-1)  # [T-1, V]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    got = torch.tensor(lp["token_logprobs"][1:])
    assert torch.allclose(got, want.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0], atol=1e-4)
    tops = [max(d.values()) for d in lp["top_logprobs"][1:]]
    assert torch.allclose(torch.tensor(tops), want.max(-1).values, atol=1e-4)
    assert len(lp["tokens"]) == len(ids) and choice["text"] == reference.tokenizer.decode(ids, False)
    assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 0


def test_echo_logprobs_use_the_requested_adapter(tiny_llama, tmp_path):
    from serve_helpers import random_lora

    adapter = random_lora(tiny_llama[0], tmp_path / "fox", seed=1)
    ref = slimlm.load(str(tiny_llama[0]), dtype="fp32", adapter=adapter)
    ids = ref.tokenizer.encode("a red fox jumps")
    want = ref.model(torch.tensor([ids]))[0, :-1].float().log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])
    with running_server(config(tiny_llama[0], adapters=[f"fox={adapter}"])) as (url, _):
        body = {"prompt": [ids, ids], "max_tokens": 0, "echo": True, "logprobs": 0}
        fox, base = (post(url, "/v1/completions", {"model": m, **body}).json() for m in ("tiny:fox", "tiny"))
    assert torch.allclose(torch.tensor(fox["choices"][1]["logprobs"]["token_logprobs"][1:]), want[:, 0], atol=1e-4)
    assert fox["choices"][0]["logprobs"] == fox["choices"][1]["logprobs"] != base["choices"][0]["logprobs"]


def test_echo_prepends_the_prompt_and_its_logprobs(server):
    url, _ = server
    base = {"model": "tiny", "prompt": "the cat sat", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    plain = post(url, "/v1/completions", {**base, "logprobs": 2}).json()["choices"][0]
    echo = post(url, "/v1/completions", {**base, "logprobs": 2, "echo": True}).json()["choices"][0]
    assert echo["text"] == "the cat sat" + plain["text"]
    n = len(echo["logprobs"]["tokens"]) - 4  # the prompt's tokens, then the 4 generated
    assert echo["logprobs"]["token_logprobs"][n:] == plain["logprobs"]["token_logprobs"]
    assert echo["logprobs"]["token_logprobs"][0] is None and n > 1
    assert post(url, "/v1/completions", {**base, "echo": True}).json()["choices"][0]["logprobs"] is None


def test_streamed_echo_sends_the_prompt_first(server):
    from serve_helpers import sse_events

    url, _ = server
    body = {
        "model": "tiny",
        "prompt": "the cat sat",
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
        "echo": True,
        "logprobs": 1,
    }
    whole = post(url, "/v1/completions", body).json()["choices"][0]
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        events = sse_events(r)[:-1]
    assert events[0]["choices"][0]["text"] == "the cat sat"
    assert "".join(e["choices"][0]["text"] for e in events) == whole["text"]
    lps = [x for e in events for x in e["choices"][0]["logprobs"]["token_logprobs"]]
    assert lps == whole["logprobs"]["token_logprobs"] and lps[0] is None
    offsets = [x for e in events for x in e["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == whole["logprobs"]["text_offset"]


def test_a_list_of_prompts_gets_one_choice_each_in_order(server):
    url, _ = server
    prompts = ["the cat", "a red fox jumps", "once upon"]
    base = {"model": "tiny", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    alone = [post(url, "/v1/completions", {**base, "prompt": p}).json() for p in prompts]
    r = post(url, "/v1/completions", {**base, "prompt": prompts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == [a["choices"][0]["text"] for a in alone]
    assert body["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
    assert body["usage"]["completion_tokens"] == 15


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 0, "echo": True}, "max_tokens"),  # scoring needs logprobs
        ({"prompt": ["a", "b"], "stream": True}, "stream"),
        ({"prompt": "hi", "stream": True, "echo": True, "logprobs": 1, "max_tokens": 0}, "stream"),
        ({"prompt": [[1, 2], [3, 999999]]}, "prompt"),
        ({"prompt": []}, "prompt"),
    ],
)
def test_unsupported_combinations_are_400(server, body, param):
    url, _ = server
    r = post(url, "/v1/completions", {"model": "tiny", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_tokenize_detokenize_version(server, reference):
    url, state = server
    tok = reference.tokenizer
    r = post(url, "/tokenize", {"model": "tiny", "prompt": "the cat sat"})
    assert r.status_code == 200, r.text
    assert r.json() == {
        "count": len(tok.encode("the cat sat")),
        "max_model_len": state.engine.max_seq_len,
        "tokens": tok.encode("the cat sat"),
    }
    raw = post(url, "/tokenize", {"prompt": "the cat sat", "add_special_tokens": False}).json()["tokens"]
    assert raw == tok.encode("the cat sat", add_special_tokens=False)
    chat = [{"role": "user", "content": "hello"}]
    r = post(url, "/tokenize", {"model": "tiny", "messages": chat})
    assert r.json()["tokens"] == tok.apply_chat_template(chat, add_generation_prompt=True)
    r = post(url, "/tokenize", {"model": "tiny", "messages": chat, "add_generation_prompt": False})
    assert r.json()["tokens"] == tok.apply_chat_template(chat, add_generation_prompt=False)
    r = post(url, "/detokenize", {"model": "tiny", "tokens": raw})
    assert r.status_code == 200 and r.json() == {"prompt": tok.decode(raw, False)}
    assert httpx.get(url + "/version").json() == {"version": slimlm.__version__}
    assert post(url, "/tokenize", {"model": "nope", "prompt": "x"}).status_code == 404
    assert post(url, "/tokenize", {"model": "tiny"}).json()["error"]["param"] == "prompt"
    assert post(url, "/detokenize", {"tokens": [10**7]}).json()["error"]["param"] == "tokens"


def test_api_keys_from_flag_environment_and_file(tiny_llama, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("from-file\n")
    with running_server(config(tiny_llama[0], api_key_file=str(keys), api_keys=["flag-1", "flag-2"])) as (url, _):
        for key, status in (("from-file", 200), ("flag-1", 200), ("flag-2", 200), ("other", 401), (None, 401)):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            assert post(url, "/tokenize", {"prompt": "hi"}, headers=headers).status_code == status, key
            assert httpx.get(url + "/version", headers=headers).status_code == status, key
        assert httpx.get(url + "/health").status_code == 200
    from slimlm.cli import build_parser
    from slimlm.serve.cli import api_keys

    args = build_parser().parse_args(["serve", "--api-key", "a", "--api-key", "b"])
    assert api_keys(args) == ["a", "b"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLIMLM_API_KEY", "env-key")
        assert api_keys(args) == ["a", "b", "env-key"]


def test_admin_key_must_differ_from_flag_keys(tiny_llama, tmp_path):
    from slimlm.serve.state import ServerState

    admin = tmp_path / "admin"
    admin.write_text("k\n")
    with pytest.raises(ValueError, match="needs --admin-key-file"):
        config(tiny_llama[0], allow_runtime_lora=True, lora_roots=[str(tmp_path)], api_keys=["k"]).validate()
    with pytest.raises(ValueError, match="share a key"):
        ServerState(
            config(
                tiny_llama[0],
                allow_runtime_lora=True,
                lora_roots=[str(tmp_path)],
                api_keys=["k"],
                admin_key_file=str(admin),
            )
        )


def test_every_stderr_line_is_json_with_a_serving_line(tiny_llama, tmp_path):
    """`slimlm serve` as a process: its start-up, uvicorn's, the request and the shutdown lines are all JSON objects
    with time / level / logger; the "serving" line says where and what."""
    import json
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    from serve_helpers import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    err = open(tmp_path / "stderr.log", "w")
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
            "64",
            "--api-key",
            "k1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=err,
        env={**os.environ, "SLIMLM_API_KEY": "k2", "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 90
        while '"event": "serving"' not in (tmp_path / "stderr.log").read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "stderr.log").read_text()
            time.sleep(0.1)
        for key in ("k1", "k2"):
            r = httpx.post(
                url + "/v1/completions",
                json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
            )
            assert r.status_code == 200, r.text
        assert httpx.get(url + "/version", timeout=5).status_code == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        err.close()
    lines = (tmp_path / "stderr.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line: one JSON object
    stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
    for rec in records:
        assert stamp.match(rec["time"]) and rec["level"] in ("INFO", "WARNING", "ERROR") and rec["logger"], rec
    serving = [r for r in records if r.get("event") == "serving"]
    assert len(serving) == 1 and serving[0]["url"] == url and serving[0]["models"] == ["tiny"]
    assert any(r.get("event") == "engine" for r in records)
    assert any(r["logger"].startswith("uvicorn") for r in records)  # uvicorn's own lines, as JSON
    done = [r for r in records if r.get("path") == "/v1/completions"]
    assert len(done) == 2 and all(r["status"] == 200 and r["logger"] == "slimlm.serve.requests" for r in done)
