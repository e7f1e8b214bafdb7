"""engine/core.py + engine/cache.py: continuous batching gives every request what it would get alone."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import random_lora

import slimlm
from slimlm.engine.cache import SlotKVCache
from slimlm.engine.core import AdapterRef, Engine, EngineConfig, QueueFull, Request
from slimlm.engine.sampling import SamplingParams
from slimlm.generate import generate_tokens


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


def reference_ids(llm, ids: list[int], n: int) -> list[int]:
    """Greedy tokens from generate.py's plain static-cache loop: an independent reference for the engine."""
    steps = list(generate_tokens(llm.model, [ids], greedy(n, ignore_eos=True), (), llm.tokenizer.pad_id))
    return [t[0] for t in steps]


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


# An fp32 cache reproduces the full forward to round-off; the CPU default (fp16) rounds each key and value to 11
# significant bits, which moves these logits by ~1e-3.
@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-5), ("fp16", 5e-3)])
def test_slot_cache_matches_full_forward(llm, dtype, tol):
    m = llm.model
    cache = SlotKVCache.for_model(m, 3, 40, dtype)
    assert cache.k[0].dtype == {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    seqs = {0: torch.randint(0, 300, (13,)), 2: torch.randint(0, 300, (7,))}
    with torch.no_grad():
        for slot, ids in seqs.items():  # prefill in chunks of 5
            for a in range(0, len(ids), 5):
                pos = torch.arange(a, min(a + 5, len(ids)))[None]
                m(ids[a : a + 5][None], cache=cache.batch(pos, slot), cache_pos=pos)
        pos = torch.tensor([[13], [0], [7]])
        idle = torch.tensor([False, True, False])  # slot 1 has no work
        before = [t.clone() for t in cache.k]
        batch = cache.batch(pos, 0, idle)
        assert batch.filled_len(pos) == 14  # attends over the longest row, not the whole slot
        out = m(torch.tensor([[5], [0], [9]]), cache=batch, cache_pos=pos)[:, -1]
        assert all(torch.equal(a[1], b[1]) for a, b in zip(before, cache.k))  # the idle row wrote nothing
        for row, (slot, tok) in enumerate([(0, 5), (2, 9)]):
            ref = m(torch.cat([seqs[slot], torch.tensor([tok])])[None])[0, -1]
            torch.testing.assert_close(out[2 * row], ref, atol=tol, rtol=tol)


def test_staggered_requests_match_generating_alone(llm):
    """Requests arriving while others decode, with chunked prefill, give the tokens each gets alone."""
    engine = Engine(llm.model, llm.tokenizer, EngineConfig(max_batch=3, max_seq_len=96, prefill_chunk=4, max_loras=0))
    prompts = [prompt(llm, i) for i in range(5)]
    results = []
    for i, p in enumerate(prompts):  # one new request every two steps; 5 requests on 3 slots
        req = Request(p, greedy(6 + i, ignore_eos=True))
        results.append(collect(req))
        engine.submit(req)
        engine.step()
        engine.step()
    run(engine)
    for i, (p, res) in enumerate(zip(prompts, results)):
        assert res["ids"] == reference_ids(llm, p, 6 + i), i
        assert res["reason"] == "length" and res["n"] == 6 + i
    assert engine.cache.usage() == 0 and not engine.running


def test_stop_token_and_stop_string(llm):
    engine = Engine(llm.model, llm.tokenizer, EngineConfig(max_batch=2, max_seq_len=96, max_loras=0))
    p = prompt(llm, 1)
    free = llm.complete([p], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    stop = free.text[3:6]
    req = Request(p, greedy(12, stop=[stop], ignore_eos=True))
    res = collect(req)
    engine.submit(req)
    run(engine)
    assert res["reason"] == "stop" and res["text"] == free.text[: free.text.find(stop)]


def test_cancel_frees_the_slot_next_step(llm):
    engine = Engine(llm.model, llm.tokenizer, EngineConfig(max_batch=1, max_seq_len=96, max_loras=0))
    a, b = (Request(prompt(llm, i), greedy(50, ignore_eos=True)) for i in range(2))
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
    with pytest.raises(ValueError, match="exceeds the context of 32"):
        engine.submit(Request(prompt(llm, 0), greedy(40)))
    engine.submit(Request([1, 2, 3], greedy(4)))
    engine.submit(Request([1, 2, 3], greedy(4)))
    with pytest.raises(QueueFull, match="max_queue=2"):
        engine.submit(Request([1, 2, 3], greedy(4)))


def test_seeded_sampling_independent_of_batch(llm):
    def sample_with(others: int) -> list[int]:
        engine = Engine(llm.model, llm.tokenizer, EngineConfig(max_batch=4, max_seq_len=96, max_loras=0))
        reqs = [Request(prompt(llm, 2), SamplingParams(10, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True))]
        reqs += [
            Request(prompt(llm, 3 + i), SamplingParams(10, temperature=1.0, ignore_eos=True)) for i in range(others)
        ]
        res = [collect(r) for r in reqs]
        for r in reversed(reqs):  # the seeded request lands in a different slot each time
            engine.submit(r)
        run(engine)
        return res[0]["ids"]

    assert sample_with(0) == sample_with(3)


def test_rows_with_different_adapters_match_each_alone(tiny_llama, tmp_path):
    """One batch: adapter a, base, adapter b (another rank); each row equals that adapter loaded on its own."""
    folders = {
        name: random_lora(tiny_llama[0], tmp_path / name, seed, r) for name, r, seed in (("a", 4, 1), ("b", 8, 2))
    }
    served = slimlm.load(str(tiny_llama[0]), dtype="fp32")
    engine = Engine(
        served.model, served.tokenizer, EngineConfig(max_batch=4, max_seq_len=96, max_loras=2, max_lora_rank=8)
    )
    plan = ["a", None, "b", "a"]
    reqs = [
        Request(
            prompt(served, i),
            greedy(8, ignore_eos=True),
            adapter=None if n is None else AdapterRef((n, 1), folders[n], n),
        )
        for i, n in enumerate(plan)
    ]
    res = [collect(r) for r in reqs]
    for r in reqs:
        engine.submit(r)
    run(engine)
    for i, n in enumerate(plan):
        alone = slimlm.load(str(tiny_llama[0]), dtype="fp32", adapter=folders[n] if n else None)
        assert res[i]["ids"] == reference_ids(alone, reqs[i].prompt_ids, 8), (i, n)
    assert engine.lru.pins(("a", 1)) == 0 and engine.lru.pins(("b", 1)) == 0


def test_bad_adapter_fails_only_its_request(llm, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    engine = Engine(llm.model, llm.tokenizer, EngineConfig(max_batch=2, max_seq_len=96, max_loras=1))
    broken = Request(prompt(llm, 0), greedy(4), adapter=AdapterRef(("bad", 1), bad, "bad"))
    fine = Request(prompt(llm, 1), greedy(4, ignore_eos=True))
    rb, rf = collect(broken), collect(fine)
    engine.submit(broken)
    engine.submit(fine)
    run(engine)
    assert rb["reason"] == "error" and "adapter bad" in rb["error"]
    assert rf["reason"] == "length"


# --- prefix caching -------------------------------------------------------------------------------------------------


def shared_prefix_prompts(llm, n: int) -> list[list[int]]:
    system = "You are a careful assistant. " + "Answer briefly. " * 2
    return [
        llm.tokenizer.prompt_ids(
            [{"role": "system", "content": system}, {"role": "user", "content": f"question {i}: what is {i} + {i}?"}],
            chat=True,
        )
        for i in range(n)
    ]


def test_prefix_cache_hits_and_outputs_are_identical(llm):
    prompts = shared_prefix_prompts(llm, 4)
    cfg = dict(max_batch=4, max_seq_len=256, prefill_chunk=16, max_loras=0, prefix_block=8)
    outs = {}
    for on in (False, True):
        engine = Engine(llm.model, llm.tokenizer, EngineConfig(prefix_cache=on, **cfg))
        reqs = [Request(p, greedy(6, ignore_eos=True)) for p in prompts]
        outs[on] = [collect(r) for r in reqs]
        for r in reqs:
            engine.submit(r)
        run(engine)
        if on:
            cached = [r.n_cached for r in reqs]
    assert [o["ids"] for o in outs[True]] == [o["ids"] for o in outs[False]]
    assert cached[0] == 0 and all(c >= 40 for c in cached[1:]), cached  # the shared system prompt came from the cache
    assert [o["ids"] for o in outs[True]][1] == reference_ids(llm, prompts[1], 6)
    assert engine.prefix_cache.hits == sum(cached) and engine.prefix_cache.queries == sum(map(len, prompts))


def test_prefix_cache_reuses_a_finished_chat_turn_and_evicts(llm):
    engine = Engine(
        llm.model,
        llm.tokenizer,
        EngineConfig(max_batch=1, max_seq_len=128, max_loras=0, prefix_block=4, prefix_cache_tokens=32),
    )
    first = prompt(llm, 1)
    a = Request(first, greedy(8, ignore_eos=True))
    collect(a)
    list(engine.generate([a]))
    follow = first + a.output_ids + [5, 6, 7]  # the next turn starts with the whole first exchange
    b = Request(follow, greedy(4, ignore_eos=True))
    res = collect(b)
    list(engine.generate([b]))
    assert b.n_cached == min(32, (len(first) + 7) // 4 * 4)  # everything in the cache but the last output token
    assert res["ids"] == reference_ids(llm, follow, 4)
    assert len(engine.prefix_cache.index) <= 8  # 32 tokens of 4-token blocks: older blocks were evicted


def test_prefix_cache_is_per_adapter(tiny_llama, tmp_path):
    folder = random_lora(tiny_llama[0], tmp_path / "a", 1, 4)
    served = slimlm.load(str(tiny_llama[0]), dtype="fp32")
    engine = Engine(
        served.model,
        served.tokenizer,
        EngineConfig(max_batch=2, max_seq_len=256, max_loras=1, max_lora_rank=4, prefix_block=8),
    )
    p = shared_prefix_prompts(served, 1)[0]
    base = Request(p, greedy(5, ignore_eos=True))
    tuned = Request(p, greedy(5, ignore_eos=True), adapter=AdapterRef(("a", 1), folder, "a"))
    rb, rt = collect(base), collect(tuned)
    list(engine.generate([base]))
    list(engine.generate([tuned]))
    assert tuned.n_cached == 0  # the base model's keys are not the adapter's
    alone = slimlm.load(str(tiny_llama[0]), dtype="fp32", adapter=folder)
    assert rt["ids"] == reference_ids(alone, p, 5) and rb["ids"] == reference_ids(served, p, 5)


# --- speculative decoding -------------------------------------------------------------------------------------------


def test_ngram_propose_finds_the_latest_match():
    from slimlm.engine.speculative import ngram_propose

    assert ngram_propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 2) == [7, 8]  # latest earlier "1 2 3"
    assert ngram_propose([5, 6, 7], 3) == []
    assert ngram_propose([4, 4, 4, 4], 2) == [4]  # the match must end before the tail starts


def test_speculative_greedy_tokens_are_identical_and_some_guesses_land(llm):
    text = "one two three four five " * 3
    prompts = [llm.tokenizer.prompt_ids(text, chat=False), prompt(llm, 2)]
    outs = {}
    for spec in (None, "ngram"):
        engine = Engine(
            llm.model,
            llm.tokenizer,
            EngineConfig(max_batch=2, max_seq_len=160, max_loras=0, speculative=spec, num_speculative_tokens=3),
        )
        reqs = [Request(p, greedy(24, ignore_eos=True)) for p in prompts]
        outs[spec] = [collect(r) for r in reqs]
        list(engine.generate(reqs))
    assert [o["ids"] for o in outs["ngram"]] == [o["ids"] for o in outs[None]]
    assert all(o["n"] == 24 for o in outs["ngram"])
    assert engine.spec_proposed > 0 and 0 <= engine.spec_accepted <= engine.spec_proposed


def test_speculative_sampling_keeps_the_distribution():
    """The rejection rule with a point-mass guess samples exactly p: check the empirical frequencies."""
    from slimlm.engine.speculative import verify_sampled

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    params = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    firsts = torch.tensor([verify_sampled(logits, [1], params, g)[0] for _ in range(4000)])
    freq = torch.bincount(firsts, minlength=3).float() / len(firsts)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03, rtol=0)


# --- the offline front, min tokens, LoRA rows ------------------------------------------------------------------------


def test_offline_generate_yields_outputs_and_cleans_up_on_break(llm):
    engine = Engine(llm.model, llm.tokenizer, EngineConfig(max_batch=2, max_seq_len=96, max_loras=0))
    reqs = [Request(prompt(llm, i), greedy(10, ignore_eos=True)) for i in range(3)]  # 3 requests, 2 slots
    for _req, out in engine.generate(reqs):
        if out.completion_tokens == 3:
            break
    assert not engine.running and not engine.waiting and engine.cache.usage() == 0
    assert all(r.finish_reason in ("abort", "length") for r in reqs)


def test_min_new_tokens_holds_back_stop_tokens(llm):
    engine = Engine(llm.model, llm.tokenizer, EngineConfig(max_batch=1, max_seq_len=96, max_loras=0))
    stop = next(iter(llm.tokenizer.stop_token_ids))
    req = Request(prompt(llm, 0), greedy(12, min_new_tokens=12))
    llm.model.lm_head.bias = torch.nn.Parameter(torch.zeros(llm.config.vocab_size))
    with torch.no_grad():
        llm.model.lm_head.bias[stop] = 100.0  # the model wants to stop at once
    res = collect(req)
    list(engine.generate([req]))
    assert res["n"] == 12 and stop not in req.output_ids[:11]


def test_rows_without_an_adapter_skip_the_lora_gemms(tiny_llama, tmp_path):
    from slimlm.engine.multi_lora import LoraSlots

    model = slimlm.load(str(tiny_llama[0]), dtype="fp32").model
    slots = LoraSlots.attach(model, 2, 4)
    slots.load(0, random_lora(tiny_llama[0], tmp_path / "a", 1, 4))
    ids = torch.randint(0, 300, (3, 5))
    with torch.no_grad(), slots.select([None, 0, None]):
        assert slots.selection.active.tolist() == [1]
        mixed = model(ids)
    with torch.no_grad(), slots.select([0, 0, 0]):
        all_a = model(ids)
    with torch.no_grad():
        base = model(ids)
    torch.testing.assert_close(mixed[1], all_a[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[[0, 2]], base[[0, 2]], atol=0, rtol=0)
