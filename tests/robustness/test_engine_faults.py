"""Engine faults (issue 15): one request's failure in sampling, detokenization or its logits (NaN) ends that request
alone with an error while the rest of the batch completes unchanged; a request past --request-timeout frees its
slot; a KV cache that does not fit names its size and the knobs."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch
from serve_helpers import running_server, sse_events

import slimlm
from slimlm.engine import core
from slimlm.engine.core import CacheAllocationError, Engine, EngineConfig, Request
from slimlm.engine.sampling import SamplingParams
from slimlm.serve.state import ServeConfig

from .conftest import trials

VICTIM = "victim"


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return slimlm.load(str(tiny_llama[0]), dtype="fp32")


def engine_for(llm, **kw) -> Engine:
    return Engine(
        llm.model, llm.tokenizer, EngineConfig(max_batch=4, max_seq_len=64, max_loras=0, prefix_cache=False, **kw)
    )


def batch(llm, victim: int = 1) -> list[Request]:
    """Three greedy requests decoded together; the one at index `victim` is the victim."""
    prompts = ["the cat sat on the mat", "tell me a story about the red fox", "what is the capital of France"]
    return [
        Request(
            llm.tokenizer.encode(p),
            SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True),
            request_id=VICTIM if i == victim else f"r{i}",
        )
        for i, p in enumerate(prompts)
    ]


def finals(engine: Engine, reqs: list[Request]) -> dict:
    """request id -> its last Output."""
    out = {}
    for req, o in engine.generate(reqs):
        if o.finish_reason is not None:
            out[req.request_id] = o
    return out


@pytest.fixture(scope="module")
def reference(llm):
    """reference(fused) -> each request's output ids in the batch run without a fault (the fused CPU step and the
    torch forward round differently, so each has its own)."""
    done = {}

    def get(fused: bool = True) -> list:
        if fused not in done:
            reqs = batch(llm, victim=-1)  # no victim: the faults injected by the test running now spare it
            finals(engine_for(llm, fused_decode=fused), reqs)
            done[fused] = [r.output_ids for r in reqs]
        return done[fused]

    return get


def only_victim_failed(engine: Engine, reqs: list[Request], reference, error: str) -> bool:
    """Run the batch: the victim ends with `error`, every other request as without the fault, every slot free."""
    got = finals(engine, reqs)
    want = reference(engine.config.fused_decode)
    victim = (
        got[VICTIM].finish_reason == "error" and got[VICTIM].error_type == "internal" and error in got[VICTIM].error
    )
    others = all(
        got[r.request_id].finish_reason == "length" and r.output_ids == want[i]
        for i, r in enumerate(reqs)
        if r.request_id != VICTIM
    )
    return victim and others and not engine.running and not engine.waiting and len(engine.cache.free) == 4


def check_only_victim_failed(engine: Engine, reqs: list[Request], reference, error: str) -> None:
    assert only_victim_failed(engine, reqs, reference, error), [(r.request_id, r.finish_reason) for r in reqs]


def poison_decoder(monkeypatch, after: int = 3) -> None:
    """The victim's detokenizer raises on its `after`-th token (as a buggy tokenizer or stop matcher would)."""
    check = Engine._check

    def patched(self, req):
        check(self, req)
        if req.request_id == VICTIM:
            push, seen = req.decoder.push, []

            def bad_push(tok):
                seen.append(tok)
                if len(seen) >= after:
                    raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected fault")
                return push(tok)

            req.decoder.push = bad_push

    monkeypatch.setattr(Engine, "_check", patched)


def test_detokenizer_fault_fails_only_its_request(llm, reference, monkeypatch):
    poison_decoder(monkeypatch)
    check_only_victim_failed(engine_for(llm), batch(llm), reference, "internal error")


def poison_sampling(monkeypatch, after: int = 0) -> None:
    """Sampling raises for any batch holding the victim once it has `after` tokens (as a logits processor that
    breaks on one request would)."""
    sample, check, victim = core.sample_batch, Engine._check, []

    def patched(logits, params, *a, **kw):
        if victim and victim[0].n_generated >= after and any(p is victim[0].params for p in params):
            raise RuntimeError("injected sampling fault")
        return sample(logits, params, *a, **kw)

    def remember(self, req):
        check(self, req)
        if req.request_id == VICTIM:
            victim[:] = [req]

    monkeypatch.setattr(core, "sample_batch", patched)
    monkeypatch.setattr(Engine, "_check", remember)


def test_sampling_fault_fails_only_its_request(llm, reference, monkeypatch):
    poison_sampling(monkeypatch)
    check_only_victim_failed(engine_for(llm), batch(llm), reference, "internal error")


def poison_logits(engine: Engine, monkeypatch, after: int = 0) -> None:
    """Every logits row the victim gets once it has `after` tokens is NaN (a model that overflows on its input)."""

    def victim_slot():
        return next((s for s, r in engine.running.items() if r.request_id == VICTIM and r.n_generated >= after), -1)

    if engine.fused is not None:

        class PoisonedFused:  # the fused step, with the victim's logits rows NaN
            def __getattr__(self, name):
                return getattr(fused, name)

            def __call__(self, tokens, slots, *a, logits_rows=None, **kw):
                out = fused(tokens, slots, *a, logits_rows=logits_rows, **kw)  # [rows, V]
                row_slots = slots if logits_rows is None else slots[logits_rows]
                out[row_slots == victim_slot()] = float("nan")
                return out

        fused = engine.fused
        monkeypatch.setattr(engine, "fused", PoisonedFused())
    forward = engine._forward

    def patched_forward(tokens, positions, row_offset, reqs, *a, **kw):
        out = forward(tokens, positions, row_offset, reqs, *a, **kw)  # [B, T, V], row i = slot row_offset + i
        i = victim_slot() - row_offset
        if 0 <= i < out.shape[0]:
            out[i] = float("nan")
        return out

    monkeypatch.setattr(engine, "_forward", patched_forward)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch"])
def test_nan_logits_end_only_that_request(llm, reference, monkeypatch, fused):
    engine = engine_for(llm, fused_decode=fused)
    if fused and engine.fused is None:
        pytest.skip("the fused CPU decode step is not available here")
    poison_logits(engine, monkeypatch)
    reqs = batch(llm)
    check_only_victim_failed(engine, reqs, reference, "NaN/Inf logits")
    assert reqs[1].output_ids == []  # nothing sampled from the NaN row: no garbage token reached the client


def test_random_faults_fail_only_their_request(llm, reference, record):
    """Faults of each kind, in a random request at a random token: every time, that request alone fails."""
    import random

    rng, tried, failures = random.Random(0), trials(3, 60), 0
    for i in range(tried):
        kind, victim, after = ("decoder", "nan", "sample")[i % 3], rng.randrange(3), rng.randrange(1, 9)
        fused = rng.random() < 0.5
        with pytest.MonkeyPatch.context() as mp:
            engine = engine_for(llm, fused_decode=fused)
            reqs = batch(llm, victim)
            if kind == "decoder":
                poison_decoder(mp, after)
            elif kind == "nan":
                poison_logits(engine, mp, after - 1)
            else:
                poison_sampling(mp, after - 1)
            error = "NaN/Inf" if kind == "nan" else "internal error"
            failures += not only_victim_failed(engine, reqs, reference, error)
    record(kind="engine fault in one request (detokenizer, NaN logits, sampler)", tried=tried, failures=failures)
    assert failures == 0


def test_nan_check_catches_inf_but_not_masked_stop_tokens(llm, reference, monkeypatch):
    """min_tokens masks stop tokens to -inf after the check: a request using it is not mistaken for a NaN row."""
    reqs = batch(llm)
    for r in reqs:
        r.params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True, min_new_tokens=5)
    got = finals(engine_for(llm), reqs)
    assert all(o.finish_reason == "length" for o in got.values())


def test_cache_oom_names_the_size_and_the_knobs(llm, monkeypatch):
    with pytest.raises(
        CacheAllocationError,
        match=r"cannot allocate the KV cache on cpu: \d+ bytes .*--max-batch "
        r"or --max-seq-len.*--kv-cache-dtype fp16",
    ):
        Engine(
            llm.model, llm.tokenizer, EngineConfig(max_batch=10**8, max_seq_len=64, max_loras=0, kv_cache_dtype="fp32")
        )
    import slimlm.engine.cache as cache

    def oom(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(cache.torch, "zeros", oom)
    with pytest.raises(CacheAllocationError, match=r"4 slots x 64 tokens.*OutOfMemoryError: CUDA out of memory"):
        engine_for(llm)


# ---- over HTTP: the error reaches the client as an OpenAI error ----


def serve_config(model, **engine) -> ServeConfig:
    cfg = EngineConfig(max_batch=4, max_seq_len=120, max_loras=0, prefix_cache=False, **engine)
    return ServeConfig(
        model=str(model), served_name="tiny", dtype="fp32", quantize=None, max_tokens_limit=100, engine=cfg
    )


def post(url, body, rid=None):
    return httpx.post(url + "/v1/completions", json=body, timeout=30, headers={"X-Request-Id": rid} if rid else {})


def test_request_fault_is_a_500_for_that_request_only(tiny_llama, monkeypatch):
    poison_decoder(monkeypatch)
    with running_server(serve_config(tiny_llama[0])) as (url, state):
        body = {"model": "tiny", "prompt": "the cat", "max_tokens": 40, "ignore_eos": True, "temperature": 0}
        others = []
        threads = [threading.Thread(target=lambda: others.append(post(url, body))) for _ in range(2)]
        for t in threads:
            t.start()
        r = post(url, body, rid=VICTIM)
        for t in threads:
            t.join()
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error", r.text
        assert [o.status_code for o in others] == [200, 200]
        assert all(o.json()["usage"]["completion_tokens"] == 40 for o in others)
        with httpx.stream(
            "POST", url + "/v1/completions", json={**body, "stream": True}, timeout=30, headers={"X-Request-Id": VICTIM}
        ) as s:
            events = sse_events(s)
        assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "server_error"
        assert not state.engine.running


def slow_steps(state, seconds: float, monkeypatch) -> None:
    decode = state.engine._decode
    monkeypatch.setattr(state.engine, "_decode", lambda reqs: (time.sleep(seconds), decode(reqs))[1])


def test_request_timeout_frees_the_slot(tiny_llama, monkeypatch):
    with running_server(serve_config(tiny_llama[0], request_timeout_s=0.4)) as (url, state):
        slow_steps(state, 0.05, monkeypatch)  # 100 tokens would take 5 s
        body = {"model": "tiny", "prompt": "the cat", "max_tokens": 100, "ignore_eos": True}
        t0 = time.monotonic()
        r = post(url, body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
        assert "request timeout (0.4 s)" in r.json()["error"]["message"] and time.monotonic() - t0 < 3
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=30) as s:
            events = sse_events(s)
        assert s.status_code == 200 and events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "request_timeout" and any("choices" in e for e in events[:-2])
        assert not state.engine.running and not state.engine.waiting
        assert len(state.engine.cache.free) == 4
        r = post(url, {**body, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_request_timeout_flag_and_validation():
    from slimlm.cli import build_parser
    from slimlm.serve.cli import serve_config as from_args

    args = build_parser().parse_args(["serve", "--model", "m", "--request-timeout", "7.5"])
    assert from_args(args).engine.request_timeout_s == 7.5
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert from_args(args).engine.request_timeout_s == 600
    with pytest.raises(ValueError, match="request_timeout_s must be >= 0"):
        EngineConfig(request_timeout_s=-1).validate()
