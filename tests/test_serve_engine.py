"""serve/engine.py + serve/cache.py: continuous batching gives every request what it would get alone."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import random_lora

import slimlm
from slimlm.generate import SamplingParams
from slimlm.serve.cache import SlotKVCache
from slimlm.serve.engine import AdapterRef, Engine, EngineConfig, QueueFull, Request
from slimlm.serve.sampling import RequestSampling

GREEDY = RequestSampling(temperature=0.0)


@pytest.fixture
def llm(tiny_llama):
    return slimlm.load(str(tiny_llama[0]), dtype="fp32")


def prompt(llm, i: int) -> list[int]:
    return llm.tokenizer.prompt_ids(f"tell me story {i} " + "the cat sat " * (i % 4), chat=True)


def collect(req: Request) -> dict:
    out = {"ids": [], "text": "", "reason": None, "n": 0}

    def emit(o):
        out["ids"] += o.token_ids
        out["text"] += o.text
        if o.finish_reason:
            out["reason"], out["n"], out["error"] = o.finish_reason, o.completion_tokens, o.error
    req.emit = emit
    return out


def run(engine: Engine, max_steps: int = 1000) -> int:
    steps = 0
    while engine.has_work() and steps < max_steps:
        engine.step()
        steps += 1
    return steps


def test_slot_cache_matches_full_forward(llm):
    m = llm.model
    cache = SlotKVCache.for_model(m, 3, 40)
    seqs = {0: torch.randint(0, 300, (13,)), 2: torch.randint(0, 300, (7,))}
    with torch.no_grad():
        for slot, ids in seqs.items():  # prefill in chunks of 5
            for a in range(0, len(ids), 5):
                pos = torch.arange(a, min(a + 5, len(ids)))[None]
                m(ids[a: a + 5][None], cache=cache.batch(1, pos, slot), cache_pos=pos)
        pos = torch.tensor([[13], [cache.scratch], [7]])  # slot 1 idle
        out = m(torch.tensor([[5], [0], [9]]), cache=cache.batch(3, pos), cache_pos=pos)[:, -1]
        for row, (slot, tok) in enumerate([(0, 5), (2, 9)]):
            ref = m(torch.cat([seqs[slot], torch.tensor([tok])])[None])[0, -1]
            torch.testing.assert_close(out[2 * row], ref, atol=1e-5, rtol=1e-5)


def test_staggered_requests_match_generating_alone(llm):
    """Requests arriving while others decode, with chunked prefill, give the tokens each gets alone."""
    engine = Engine(llm.model, llm.tokenizer, EngineConfig(max_batch=3, max_seq_len=96, prefill_chunk=4, max_loras=0))
    prompts = [prompt(llm, i) for i in range(5)]
    results = []
    for i, p in enumerate(prompts):  # one new request every two steps; 5 requests on 3 slots
        req = Request(p, max_tokens=6 + i, sampling=GREEDY, ignore_eos=True)
        results.append(collect(req))
        engine.submit(req)
        engine.step()
        engine.step()
    run(engine)
    for i, (p, res) in enumerate(zip(prompts, results)):
        ref = llm.complete([p], SamplingParams(max_new_tokens=6 + i, ignore_eos=True))[0]
        assert res["ids"] == ref.token_ids, i
        assert res["reason"] == "length" and res["n"] == 6 + i
    assert engine.cache.usage() == 0 and not engine.running


def test_stop_token_and_stop_string(llm):
    engine = Engine(llm.model, llm.tokenizer, EngineConfig(max_batch=2, max_seq_len=96, max_loras=0))
    p = prompt(llm, 1)
    free = llm.complete([p], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    stop = free.text[3:6]
    req = Request(p, 12, GREEDY, stop=[stop], ignore_eos=True)
    res = collect(req)
    engine.submit(req)
    run(engine)
    assert res["reason"] == "stop" and res["text"] == free.text[: free.text.find(stop)]


def test_cancel_frees_the_slot_next_step(llm):
    engine = Engine(llm.model, llm.tokenizer, EngineConfig(max_batch=1, max_seq_len=96, max_loras=0))
    a, b = (Request(prompt(llm, i), 50, GREEDY, ignore_eos=True) for i in range(2))
    ra, rb = collect(a), collect(b)
    engine.submit(a)
    engine.submit(b)
    engine.step()
    assert a.slot == 0 and b.slot is None  # one slot: b waits
    engine.cancel(a)
    engine.step()
    assert ra["reason"] == "abort" and b.slot == 0
    run(engine)
    assert rb["reason"] == "length"


def test_limits_refused_at_submit(llm):
    engine = Engine(llm.model, llm.tokenizer, EngineConfig(max_batch=1, max_seq_len=32, max_queue=2, max_loras=0))
    with pytest.raises(ValueError, match="exceeds the server's context of 32"):
        engine.submit(Request(prompt(llm, 0), 40))
    engine.submit(Request([1, 2, 3], 4))
    engine.submit(Request([1, 2, 3], 4))
    with pytest.raises(QueueFull, match="max_queue=2"):
        engine.submit(Request([1, 2, 3], 4))


def test_seeded_sampling_independent_of_batch(llm):
    def sample_with(others: int) -> list[int]:
        engine = Engine(llm.model, llm.tokenizer, EngineConfig(max_batch=4, max_seq_len=96, max_loras=0))
        reqs = [Request(prompt(llm, 2), 10, RequestSampling(temperature=1.0, top_p=0.9, seed=7), ignore_eos=True)]
        reqs += [Request(prompt(llm, 3 + i), 10, RequestSampling(temperature=1.0), ignore_eos=True)
                 for i in range(others)]
        res = [collect(r) for r in reqs]
        for r in reversed(reqs):  # the seeded request lands in a different slot each time
            engine.submit(r)
        run(engine)
        return res[0]["ids"]

    assert sample_with(0) == sample_with(3)


def test_rows_with_different_adapters_match_each_alone(tiny_llama, tmp_path):
    """One batch: adapter a, base, adapter b (another rank); each row equals that adapter loaded on its own."""
    folders = {name: random_lora(tiny_llama[0], tmp_path / name, seed, r) for name, r, seed in (("a", 4, 1), ("b", 8, 2))}
    served = slimlm.load(str(tiny_llama[0]), dtype="fp32")
    engine = Engine(served.model, served.tokenizer, EngineConfig(max_batch=4, max_seq_len=96, max_loras=2,
                                                                 max_lora_rank=8))
    plan = ["a", None, "b", "a"]
    reqs = [Request(prompt(served, i), 8, GREEDY, ignore_eos=True,
                    adapter=None if n is None else AdapterRef((n, 1), folders[n], n)) for i, n in enumerate(plan)]
    res = [collect(r) for r in reqs]
    for r in reqs:
        engine.submit(r)
    run(engine)
    for i, n in enumerate(plan):
        alone = slimlm.load(str(tiny_llama[0]), dtype="fp32", adapter=folders[n] if n else None)
        ref = alone.complete([reqs[i].prompt_ids], SamplingParams(max_new_tokens=8, ignore_eos=True))[0]
        assert res[i]["ids"] == ref.token_ids, (i, n)
    assert engine.lru.pins(("a", 1)) == 0 and engine.lru.pins(("b", 1)) == 0


def test_bad_adapter_fails_only_its_request(llm, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    engine = Engine(llm.model, llm.tokenizer, EngineConfig(max_batch=2, max_seq_len=96, max_loras=1))
    broken = Request(prompt(llm, 0), 4, GREEDY, adapter=AdapterRef(("bad", 1), bad, "bad"))
    fine = Request(prompt(llm, 1), 4, GREEDY, ignore_eos=True)
    rb, rf = collect(broken), collect(fine)
    engine.submit(broken)
    engine.submit(fine)
    run(engine)
    assert rb["reason"] == "error" and "adapter bad" in rb["error"]
    assert rf["reason"] == "length"
