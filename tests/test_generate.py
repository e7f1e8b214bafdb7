"""generate.py: greedy parity with HF generate, batching, sampling filters, repetition penalty, limits."""

from __future__ import annotations

import pytest
import torch

from slimlm.checkpoint import load_model
from slimlm.generate import SamplingParams, apply_repetition_penalty, decode_one_token, generate_tokens, sample
from slimlm.kv_cache import KVCache

PROMPTS = [[5, 17, 99], [300, 12, 7, 7, 44, 210, 3, 18, 150], [11] * 2 + list(range(40, 60))]


@pytest.fixture(scope="module")
def llama(tiny_llama):
    """(slimlm model, HF model) of the shared tiny Llama."""
    folder, hf = tiny_llama
    return load_model(folder)[2], hf


@pytest.fixture(scope="module")
def mistral(make_model_folder):
    folder, hf = make_model_folder("mistral", seed=11, tokenizer=False, sliding_window=8)
    return load_model(folder)[2], hf


def run(model, prompts, params, stops=(), pad_id=0, **kwargs) -> list[list[int]]:
    """Tokens per row (stop token included, as HF returns it)."""
    out = [[] for _ in prompts]
    for step in generate_tokens(model, prompts, params, stops, pad_id, **kwargs):
        assert len(step) == len(prompts)
        for row, tok in enumerate(step):
            if tok is not None:
                assert not out[row] or out[row][-1] not in stops or params.ignore_eos, "token after a stop"
                out[row].append(tok)
    return out


def hf_generate(hf, prompt, max_new_tokens, eos, **kwargs) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            eos_token_id=list(eos),
            pad_token_id=0,
            **kwargs,
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("which", ["llama", "mistral"])
def test_greedy_matches_hf_generate(request, which):
    model, hf = request.getfixturevalue(which)
    params = SamplingParams(max_new_tokens=24)
    for prompt in PROMPTS:
        ours = run(model, [prompt], params, stops={2})[0]
        ref = hf_generate(hf, prompt, 24, [2], do_sample=False)
        assert ours == ref, f"prompt {prompt}"
    assert len(set(ours)) > 3, "degenerate generation would make the comparison weak"


def test_batch_of_different_lengths_equals_each_prompt_alone(llama):
    model, _ = llama
    params = SamplingParams(max_new_tokens=16)
    alone_free = [run(model, [p], params)[0] for p in PROMPTS]
    # a stop token that row 0 produces early but not every row, so rows finish at different steps
    stop = alone_free[0][3]
    stops = {stop}
    alone = [run(model, [p], params, stops)[0] for p in PROMPTS]
    batch = run(model, PROMPTS, params, stops, pad_id=123)
    assert batch == alone
    assert len({len(a) for a in alone}) > 1, "rows should finish at different steps"


def test_reused_dirty_cache_gives_same_tokens(llama):
    model, _ = llama
    params = SamplingParams(max_new_tokens=10)
    cache = KVCache.for_model(model, batch_size=2, max_len=64)
    run(model, [PROMPTS[2], [9] * 30], params, cache=cache)  # fills slots well beyond the next prompts
    fresh = run(model, PROMPTS[:2], params)
    assert run(model, PROMPTS[:2], params, cache=cache) == fresh


def test_custom_decode_fn_is_used(llama):
    model, _ = llama
    calls = []

    def counting(m, token, cache, pos):
        calls.append(int(pos))
        return decode_one_token(m, token, cache, pos)

    out = run(model, [PROMPTS[0]], SamplingParams(max_new_tokens=6), decode_fn=counting)[0]
    assert len(out) == 6
    assert calls == [3, 4, 5, 6, 7]  # slots after the 3-token prompt; no decode after the last token


# --- SamplingParams ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer, got 0"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be a positive integer, got 2.5"),
        (dict(temperature=-0.1), "temperature must be a number >= 0"),
        (dict(top_k=-2), "top_k must be an integer >= 1, or 0 or -1"),
        (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
        (dict(min_p=1.5), r"min_p must be a number in \[0, 1\]"),
        (dict(min_p=-0.1), r"min_p must be a number in \[0, 1\]"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be a number > 0"),
        (dict(min_new_tokens=5, max_new_tokens=4), r"min_new_tokens must be in \[0, max_new_tokens\], got 5"),
        (dict(stop=["ok", ""]), "stop must be a list of non-empty strings"),
    ],
)
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_collects_errors_and_wraps_stop_string():
    with pytest.raises(
        ValueError, match="invalid sampling parameters: temperature must be a number >= 0.*; top_k must be an integer"
    ):
        SamplingParams(temperature=-1, top_k=-2)
    assert SamplingParams(stop="END").stop == ["END"]


# --- sampling ---------------------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_seeds_differ(llama):
    model, _ = llama
    p = dict(max_new_tokens=20, temperature=1.5)
    a = run(model, PROMPTS[:2], SamplingParams(seed=123, **p))
    b = run(model, PROMPTS[:2], SamplingParams(seed=123, **p))
    c = run(model, PROMPTS[:2], SamplingParams(seed=124, **p))
    assert a == b
    assert a != c
    greedy = run(model, PROMPTS[:2], SamplingParams(max_new_tokens=20))
    assert a != greedy  # temperature 1.5 really samples


def test_top_k_1_equals_greedy(llama):
    model, _ = llama
    greedy = run(model, PROMPTS, SamplingParams(max_new_tokens=12))
    assert run(model, PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.0, top_k=1, seed=0)) == greedy
    assert run(model, PROMPTS, SamplingParams(max_new_tokens=12, temperature=5.0, top_k=1, seed=1)) == greedy


PROBS = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
N_DRAWS = 4000


def sampled_counts(params: SamplingParams, probs: torch.Tensor = PROBS) -> torch.Tensor:
    logits = probs.log()[None].expand(N_DRAWS, -1).contiguous() + 3.0  # a shift must not matter
    tokens = sample(logits, params, torch.Generator().manual_seed(0))
    assert tokens.shape == (N_DRAWS,)
    return torch.bincount(tokens, minlength=len(probs))


def hf_kept(params: SamplingParams, probs: torch.Tensor = PROBS) -> set[int]:
    """The tokens transformers' warpers (temperature, top-k, top-p, min-p, in HF's order) leave sampleable."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = probs.log()[None].clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(params.temperature)(ids, scores)
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(ids, scores)
    if params.top_p < 1:
        scores = TopPLogitsWarper(params.top_p)(ids, scores)
    if params.min_p:
        scores = MinPLogitsWarper(params.min_p)(ids, scores)
    return set(torch.isfinite(scores[0]).nonzero().flatten().tolist())


@pytest.mark.parametrize(
    "kwargs,kept",
    [
        (dict(), {0, 1, 2, 3, 4, 5}),
        (dict(top_k=2), {0, 1}),
        (dict(top_p=0.7), {0, 1, 2}),  # mass before token 2 is 0.65 < 0.7; before token 3 it is 0.8
        (dict(top_p=0.6), {0, 1}),
        (dict(min_p=0.3), {0, 1, 2}),  # threshold 0.12
        (dict(min_p=0.2), {0, 1, 2, 3}),  # threshold 0.08
        (dict(temperature=0.5, min_p=0.3), {0, 1}),  # min_p applies to the temperature-sharpened distribution
        (dict(top_k=3, top_p=0.75), {0, 1}),  # top_p on the top-k renormalised mass (0.5, 0.3125, ...)
    ],
)
def test_sampling_filters(kwargs, kept):
    params = SamplingParams(**{"temperature": 1.0, **kwargs})
    assert hf_kept(params) == kept  # the expected sets agree with transformers' own warpers
    counts = sampled_counts(params)
    assert set(counts.nonzero().flatten().tolist()) == kept
    # and the kept tokens keep their relative probabilities
    p = PROBS ** (1 / params.temperature)
    expected = torch.zeros_like(p)
    expected[list(kept)] = p[list(kept)] / p[list(kept)].sum()
    assert (counts / N_DRAWS - expected).abs().max() < 0.03


def test_greedy_sample_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [5.0, 4.9, 0.0]])
    assert sample(logits, SamplingParams()).tolist() == [1, 0]


def test_repetition_penalty_matches_hf_processor():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    logits[0, 4] = 0.0
    input_ids = torch.tensor([[4, 4, 9, 10, 11], [0, 1, 2, 3, 49], [7, 7, 7, 7, 7]])
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, input_ids, True)
    for penalty in (1.3, 0.7):
        ref = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits.clone())
        ours = apply_repetition_penalty(logits, seen, penalty)
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
        assert not torch.equal(ours, logits)


def test_repetition_penalty_generation_matches_hf(llama):
    model, hf = llama
    prompt = PROMPTS[1]
    ours = run(model, [prompt], SamplingParams(max_new_tokens=20, repetition_penalty=1.8), stops={2})[0]
    ref = hf_generate(hf, prompt, 20, [2], do_sample=False, repetition_penalty=1.8)
    assert ours == ref
    assert ours != run(model, [prompt], SamplingParams(max_new_tokens=20), stops={2})[0], "penalty had no effect"


def test_repetition_penalty_ignores_padding(llama):
    """Pad ids are not prompt tokens: a batch row must be penalised exactly as when it runs alone."""
    model, _ = llama
    params = SamplingParams(max_new_tokens=10, repetition_penalty=1.8)
    short = PROMPTS[0]
    alone = run(model, [short], params)[0]
    first = alone[0]
    batch = run(model, [short, PROMPTS[2]], params, pad_id=first)  # pad with the token it would pick
    assert batch[0] == alone


def test_min_new_tokens_suppresses_stop_tokens(llama):
    model, hf = llama
    prompt = PROMPTS[0]
    free = run(model, [prompt], SamplingParams(max_new_tokens=8))[0]
    stop = free[1]
    assert run(model, [prompt], SamplingParams(max_new_tokens=8), stops={stop})[0] == free[:2]
    out = run(model, [prompt], SamplingParams(max_new_tokens=8, min_new_tokens=4), stops={stop})[0]
    assert stop not in out[:4] and len(out) >= 4 and out[:1] == free[:1]
    assert out == hf_generate(hf, prompt, 8, [stop], do_sample=False, min_new_tokens=4)


def test_ignore_eos_runs_to_max_new_tokens(llama):
    model, _ = llama
    free = run(model, [PROMPTS[0]], SamplingParams(max_new_tokens=8))[0]
    out = run(model, [PROMPTS[0]], SamplingParams(max_new_tokens=8, ignore_eos=True), stops={free[0]})[0]
    assert out == free


def test_max_new_tokens_over_context_raises(llama):
    model, _ = llama
    ctx = model.config.max_seq_len
    prompt = list(range(10))
    with pytest.raises(ValueError, match=f"exceeds the model's context of {ctx} tokens"):
        next(generate_tokens(model, [prompt], SamplingParams(max_new_tokens=ctx - 9)))
    next(generate_tokens(model, [prompt], SamplingParams(max_new_tokens=ctx - 10)))  # exactly fits


def test_empty_prompt_raises(llama):
    model, _ = llama
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        next(generate_tokens(model, [[1, 2], []], SamplingParams()))
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        next(generate_tokens(model, [], SamplingParams()))
