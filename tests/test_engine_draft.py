"""engine/draft.py: draft-model speculation keeps the target's greedy tokens and its sampling distribution."""

from __future__ import annotations

import copy
import re

import httpx
import pytest
import torch
from serve_helpers import running_server
from test_engine import collect, greedy

import slimlm
from slimlm import kernels
from slimlm.engine.cache import SlotKVCache
from slimlm.engine.core import Engine, EngineConfig, Request
from slimlm.engine.sampling import SamplingParams
from slimlm.serve.state import ServeConfig


@pytest.fixture(scope="module")
def other_folder(make_model_folder):
    """A second random Llama of the same shape and tokenizer: a draft whose guesses the target rarely takes."""
    return make_model_folder("llama", seed=7)[0]


def load(folder, quantize: str | None = None):
    return slimlm.load(str(folder), dtype="fp32", quantize=quantize)


def noisy_copy(model: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """The target with noise on its final norm's gains (never quantized): a draft that agrees with it often, but
    not always."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = draft.norm.weight
        w.mul_(1 + std * torch.randn(w.shape, generator=g).to(w.dtype))
    return draft


def make_draft(kind: str, llm, other_folder, quantize: str | None = None) -> torch.nn.Module:
    return {
        "self": lambda: llm.model,
        "noisy": lambda: noisy_copy(llm.model),
        "other": lambda: load(other_folder, quantize).model,
    }[kind]()


def prompts(llm, n: int = 4) -> list[list[int]]:
    """Prompts of different lengths (about 12 to 40 tokens)."""
    return [
        llm.tokenizer.prompt_ids(f"tell me story {i} " + "the cat sat on the mat " * (2 * i), chat=True)
        for i in range(n)
    ]


def engine(llm, draft=None, **kw) -> Engine:
    cfg = EngineConfig(
        **{
            "max_batch": 4,
            "max_seq_len": 160,
            "max_loras": 0,
            "num_speculative_tokens": 3,
            "speculative": "draft" if draft is not None else None,
            **kw,
        }
    )
    return Engine(llm.model, llm.tokenizer, cfg, draft_model=draft)


def greedy_outputs(e: Engine, ps: list[list[int]], n: int = 20) -> list[list[int]]:
    reqs = [Request(p, greedy(n, ignore_eos=True)) for p in ps]
    list(e.generate(reqs))
    return [r.output_ids for r in reqs]


PATHS = [
    pytest.param(True, None, id="fused-fp32"),
    pytest.param(True, "int8", id="fused-int8"),
    pytest.param(False, None, id="forward-fp32"),
]


@pytest.mark.parametrize("fused,quantize", PATHS)
@pytest.mark.parametrize("kind", ["self", "noisy", "other"])
def test_greedy_tokens_are_identical(tiny_llama, other_folder, fused, quantize, kind):
    """Batched requests of different prompt lengths: the tokens of plain decoding, whatever the draft guesses."""
    if fused and not kernels.load():
        pytest.skip("slimlm's CPU kernels could not be built here")
    llm = load(tiny_llama[0], quantize)
    ps = prompts(llm)
    want = greedy_outputs(engine(llm, fused_decode=fused), ps)
    draft = make_draft(kind, llm, other_folder, quantize)
    e = engine(llm, draft, fused_decode=fused)
    assert (e.fused is not None) == fused and (e.draft.fused is not None) == fused
    assert greedy_outputs(e, ps) == want
    assert e.spec_proposed > 0
    if kind == "self":  # the target guessing for itself: (nearly) every guess lands
        assert e.spec_accepted >= 0.95 * e.spec_proposed
    if kind == "noisy":  # some land, some do not: both ways through the draft's bookkeeping
        assert 0 < e.spec_accepted < e.spec_proposed, (e.spec_accepted, e.spec_proposed)


@pytest.mark.parametrize("fused,quantize", PATHS)
def test_draft_vocab_guesses_only_low_ids(tiny_llama, fused, quantize):
    """draft_vocab=N: the draft's head cut to ids < N; its guesses stay below N and the output is unchanged."""
    if fused and not kernels.load():
        pytest.skip("slimlm's CPU kernels could not be built here")
    llm = load(tiny_llama[0], quantize)
    ps = prompts(llm)
    want = greedy_outputs(engine(llm, fused_decode=fused), ps)
    e = engine(llm, llm.model, fused_decode=fused, draft_vocab=200)  # the target as its own draft, 200 of 384 ids
    guessed = []
    propose = e.draft.propose
    e.draft.propose = lambda rows: (lambda out: (guessed.extend(t for g in out.values() for t in g), out)[1])(
        propose(rows)
    )
    assert greedy_outputs(e, ps) == want
    assert guessed and max(guessed) < 200
    assert e.draft.head.out_features == 200 and llm.model.lm_head.out_features == 384  # the model is not changed
    # The target's own tokens below 200 are guessed right: the draft is the target restricted to those ids.
    assert 0 < e.spec_accepted < e.spec_proposed


def check_draft_keys(e: Engine) -> None:
    """Every draft key the draft counts as valid equals a fresh prefill of the request's tokens by the draft."""
    d = e.draft
    for r in e.running.values():
        if r.pending is None or r.slot not in d.state:
            continue
        n = d.sync(r).length
        ids = (r.prompt_ids + r.output_ids)[:n]
        ref = SlotKVCache.for_model(d.model, 1, d.cache.max_len, e.config.kv_cache_dtype)
        pos = torch.arange(n)[None]
        with torch.no_grad():
            d.model(torch.tensor([ids]), cache=ref.batch(pos, 0), cache_pos=pos)
        for got, want in zip(d.cache.k + d.cache.v, ref.k + ref.v):
            tol = 1e-4 if got.dtype == torch.float32 else 4e-3  # two paths' round-off may move a half's last bit
            torch.testing.assert_close(got[r.slot, :, :n], want[0, :, :n], atol=tol, rtol=tol)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "forward"])
def test_finished_cancelled_and_reused_slots(tiny_llama, fused):
    """Requests finish, one is cancelled, new ones take their slots: the draft's state starts over for each, its
    valid keys are always right, and every output is still plain decoding's."""
    llm = load(tiny_llama[0])
    ps = prompts(llm, 5)
    lengths = [6, 40, 9, 17, 11]  # request 1 still runs when it is cancelled
    want = [greedy_outputs(engine(llm, fused_decode=fused), [p], n)[0] for p, n in zip(ps, lengths)]
    e = engine(llm, noisy_copy(llm.model), max_batch=2, prefill_chunk=16, fused_decode=fused)
    reqs = [Request(p, greedy(n, ignore_eos=True)) for p, n in zip(ps, lengths)]
    results = [collect(r) for r in reqs]
    for i, r in enumerate(reqs):  # one new request every three steps, 5 requests on 2 slots
        e.submit(r)
        for _ in range(3):
            e.step()
            check_draft_keys(e)
        if i == 2:
            e.cancel(reqs[1])
    while e.has_work():
        e.step()
        check_draft_keys(e)
    assert results[1]["reason"] == "abort" and reqs[1].output_ids == want[1][: len(reqs[1].output_ids)]
    for i in (0, 2, 3, 4):
        assert results[i]["reason"] == "length" and results[i]["ids"] == want[i], i
    assert e.spec_proposed > 0 and not e.draft.state and e.cache.usage() == 0


def exact_pairs(llm, ids: list[int], top_k: int) -> dict[tuple[int, int], float]:
    """P(first two tokens = (a, b)) when sampling at temperature 1 from the target's top_k: {(a, b): p}."""

    def top(seq):
        with torch.no_grad():
            logits = llm.model(torch.tensor([seq]))[0, -1].float()
        v, i = torch.topk(logits, top_k)
        return dict(zip(i.tolist(), v.softmax(-1).tolist()))

    return {(a, b): pa * pb for a, pa in top(ids).items() for b, pb in top(ids + [a]).items()}


@pytest.mark.parametrize("kind", ["self", "noisy"])
def test_sampling_keeps_the_distribution(tiny_llama, other_folder, kind):
    """Seeded sampled requests (top-3, temperature 1): the first two tokens — the second verified against the
    draft's guess — follow the target's own distribution."""
    llm = load(tiny_llama[0])
    p = prompts(llm, 1)[0]
    n, top_k = 1200, 3
    # A prefill chunk that runs every row's prompt through the draft at its first decode step: every second token
    # is then verified against a guess (with the default, rows past the chunk decode their first step plainly).
    e = engine(
        llm,
        make_draft(kind, llm, other_folder),
        max_batch=48,
        max_seq_len=64,
        num_speculative_tokens=2,
        prefill_chunk=1024,
    )
    reqs = [
        Request(p, SamplingParams(max_new_tokens=4, temperature=1.0, top_k=top_k, seed=s, ignore_eos=True))
        for s in range(n)
    ]
    list(e.generate(reqs))
    exact = exact_pairs(llm, p, top_k)
    got = {pair: 0.0 for pair in exact}
    for r in reqs:
        got[tuple(r.output_ids[:2])] += 1 / n  # a pair outside the top-3 x top-3 would be a KeyError
    keys = sorted(exact)
    torch.testing.assert_close(
        torch.tensor([got[k] for k in keys]), torch.tensor([exact[k] for k in keys]), atol=0.035, rtol=0
    )  # accepting guesses 0.15 more often moves a cell by ~0.08
    assert e.spec_proposed >= 2 * n  # two guesses per row at its first decode step
    assert 0 < e.spec_accepted < e.spec_proposed  # both the accept and the reject branch ran


def test_config_errors(tiny_llama, make_model_folder):
    llm = load(tiny_llama[0])
    with pytest.raises(ValueError, match=r'speculative="draft" needs a draft model.*draft_model='):
        Engine(llm.model, llm.tokenizer, EngineConfig(max_loras=0, speculative="draft"))
    with pytest.raises(ValueError, match=r"draft model was given but speculative='ngram'"):
        Engine(llm.model, llm.tokenizer, EngineConfig(max_loras=0, speculative="ngram"), draft_model=llm.model)
    with pytest.raises(ValueError, match=r'draft_vocab applies to draft-model speculation.*speculative="draft"'):
        EngineConfig(speculative="ngram", draft_vocab=100).validate()
    with pytest.raises(ValueError, match="draft_vocab must be >= 0"):
        EngineConfig(speculative="draft", draft_vocab=-1).validate()
    wide = make_model_folder("llama", seed=3, vocab_size=512)[0]
    with pytest.raises(ValueError, match="vocab_size is 512, the target's is 384.*tokenizer"):
        Engine(llm.model, llm.tokenizer, EngineConfig(max_loras=0, speculative="draft"), draft_model=load(wide).model)
    with pytest.raises(ValueError, match="vocab_size is 512"):  # slimlm.load checks at load time
        slimlm.load(str(tiny_llama[0]), dtype="fp32", draft_model=str(wide))
    with pytest.raises(ValueError, match="ngram, draft or None"):
        EngineConfig(speculative="medusa").validate()


def test_load_with_a_draft_model(tiny_llama, other_folder):
    plain = load(tiny_llama[0])
    llm = slimlm.load(str(tiny_llama[0]), dtype="fp32", draft_model=str(other_folder))
    assert llm.engine_config.speculative == "draft" and llm.draft_model is not None
    texts = [f"story {i} the cat sat" for i in range(3)]
    assert llm.generate(texts, max_new_tokens=12, ignore_eos=True) == plain.generate(
        texts, max_new_tokens=12, ignore_eos=True
    )
    assert llm._engine.draft is not None and llm._engine.spec_proposed > 0


def test_serve_flags(tiny_llama):
    from slimlm.cli import build_parser
    from slimlm.serve.cli import serve_config

    parse = lambda *a: build_parser().parse_args(["serve", *a])  # noqa: E731
    cfg = serve_config(parse("--speculative", "draft", "--draft-model", "small", "--num-speculative-tokens", "3"))
    assert cfg.draft_model == "small" and cfg.engine.speculative == "draft" and cfg.engine.num_speculative_tokens == 3
    with pytest.raises(ValueError, match="--speculative draft needs --draft-model"):
        serve_config(parse("--speculative", "draft"))
    with pytest.raises(ValueError, match="add --speculative draft"):
        serve_config(parse("--draft-model", "small"))


def test_server_counts_draft_tokens_in_metrics(tiny_llama):
    """The target as its own draft through `slimlm serve`'s state: guesses verified, counted in /metrics."""
    engine_cfg = EngineConfig(max_batch=2, max_seq_len=120, max_loras=0, speculative="draft", num_speculative_tokens=3)
    cfg = ServeConfig(
        model=str(tiny_llama[0]),
        served_name="tiny",
        dtype="fp32",
        max_tokens_limit=64,
        draft_model=str(tiny_llama[0]),
        engine=engine_cfg,
    )
    with running_server(cfg) as (url, state):
        r = httpx.post(
            url + "/v1/completions",
            json={"model": "tiny", "prompt": "the cat sat on", "max_tokens": 16, "temperature": 0, "ignore_eos": True},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        text = httpx.get(url + "/metrics").text
    counts = {
        name: float(v)
        for name, v in re.findall(r"^vllm:spec_decode_num_(draft|accepted)_tokens_total\{[^}]*\} (\S+)$", text, re.M)
    }
    assert counts["draft"] > 0 and counts["accepted"] >= 0.9 * counts["draft"]
    assert counts["draft"] == state.engine.spec_proposed
