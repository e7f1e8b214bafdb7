"""engine/sampling.py: validation, per-row filters and penalties, parity with generate.sample, seeded draws that do
not depend on the batch, logprobs, and penalty state that starts clean when a row is reused."""

from __future__ import annotations

import pytest
import torch

from slimlm.engine.sampling import SamplingTensors, TokenCounts, apply_penalties, filter_probs, sample_batch
from slimlm.generate import SamplingParams, apply_repetition_penalty, sample

V = 1000


def RS(**kw) -> SamplingParams:
    """Per-request parameters with the OpenAI API's default temperature of 1 (SamplingParams defaults to greedy)."""
    return SamplingParams(**{"temperature": 1.0, **kw})


def logits_for(B: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    return torch.randn(B, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def kept(logits: torch.Tensor, **kw) -> set[int]:
    """Token ids with nonzero probability after one row's filters (temperature already applied)."""
    probs = filter_probs(logits[None], SamplingTensors.from_params([RS(**kw)]))
    return set(probs[0].nonzero()[:, 0].tolist())


# --- validation ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(temperature=-0.1), r"temperature must be a number >= 0 \(0 = greedy\), got -0.1"),
        (dict(temperature=float("nan")), r"temperature must be a number >= 0"),
        (dict(top_p=0.0), r"top_p must be a number in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
        (dict(top_k=-2), r"top_k must be an integer >= 1, or 0 or -1 for no limit, got -2"),
        (dict(top_k=2.5), r"top_k must be an integer"),
        (dict(top_k=True), r"top_k must be an integer"),
        (dict(min_p=1.1), r"min_p must be a number in \[0, 1\], got 1.1"),
        (dict(repetition_penalty=0), r"repetition_penalty must be a number > 0 \(1 = off\), got 0"),
        (dict(presence_penalty=2.5), r"presence_penalty must be a number in \[-2, 2\], got 2.5"),
        (dict(frequency_penalty=-3), r"frequency_penalty must be a number in \[-2, 2\], got -3"),
        (dict(seed=-1), r"seed must be null or an integer in \[0, 2\*\*64\), got -1"),
        (dict(seed="7"), r"seed must be null or an integer"),
        (dict(logprobs=1), r"logprobs must be true or false, got 1"),
        (dict(logprobs=True, top_logprobs=21), r"top_logprobs must be an integer in \[0, 20\], got 21"),
        (dict(top_logprobs=3), r"top_logprobs=3 needs logprobs=true"),
        (dict(temperature="hot"), r"temperature must be a number >= 0 \(0 = greedy\), got 'hot'"),
    ],
)
def test_validation_names_the_field_and_its_range(kw, match):
    with pytest.raises(ValueError, match=match):
        RS(**kw)


def test_validation_collects_every_error_and_accepts_the_edges():
    with pytest.raises(ValueError, match=r"invalid sampling parameters: temperature .*; top_p .*; min_p"):
        RS(temperature=-1, top_p=2, min_p=-1)
    RS(
        temperature=0,
        top_p=1,
        top_k=-1,
        min_p=1,
        presence_penalty=-2,
        frequency_penalty=2,
        seed=0,
        logprobs=True,
        top_logprobs=20,
    )


# --- filters ----------------------------------------------------------------------------------------------------------


def test_top_k_keeps_the_k_largest():
    logits = logits_for(1)[0]
    assert kept(logits, top_k=7) == set(logits.topk(7).indices.tolist())
    assert kept(logits, top_k=V + 5) == set(range(V))  # k beyond V: everything
    assert kept(logits, top_k=-1) == kept(logits, top_k=0) == set(range(V))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = logits_for(1, seed=1)[0]
    probs, order = logits.softmax(-1).sort(descending=True)
    n = int((probs.cumsum(-1) < 0.8).sum()) + 1  # the first n most likely tokens reach 0.8
    assert probs[:n].sum() >= 0.8 > probs[: n - 1].sum()
    assert kept(logits, top_p=0.8) == set(order[:n].tolist())


def test_top_p_on_a_flat_distribution_looks_past_the_first_candidates():
    logits = logits_for(1, seed=11, vocab=49152)[0] * 0.05  # nearly uniform: the 0.9 set holds ~44k tokens
    probs, order = logits.softmax(-1).sort(descending=True)
    n = int((probs.cumsum(-1) - probs < 0.9).sum())
    assert n > 20000
    assert kept(logits, top_p=0.9) == set(order[:n].tolist())


def test_top_p_keeps_every_token_tied_with_the_last_one_kept():
    logits = torch.tensor([3.0, 1.0, 1.0, 1.0, -2.0])  # the set reaching 0.8 ends inside the tied 1.0s
    assert kept(logits, top_p=0.8) == {0, 1, 2, 3}


def test_min_p_keeps_tokens_at_least_min_p_times_the_most_likely():
    logits = logits_for(1, seed=2)[0]
    probs = logits.softmax(-1)
    expected = set((probs >= 0.05 * probs.max()).nonzero()[:, 0].tolist())
    assert 1 < len(expected) < V
    assert kept(logits, min_p=0.05) == expected


def test_filters_off_keep_everything_at_full_vocab():
    # top_p=1 must not drop a tail whose float32 cumsum already reached 1 (another row turns top_p sorting on).
    logits = logits_for(2, seed=3, vocab=49152) * 4
    t = SamplingTensors.from_params([RS(), RS(top_p=0.5)])
    assert bool((filter_probs(logits, t)[0] > 0).all())


def test_each_row_is_filtered_as_if_alone():
    params = [RS(top_k=5), RS(top_p=0.7), RS(min_p=0.1), RS(top_k=50, top_p=0.9, min_p=0.02), RS()]
    logits = logits_for(len(params), seed=4)
    batch = filter_probs(logits, SamplingTensors.from_params(params))
    for i, p in enumerate(params):
        assert torch.equal(batch[i : i + 1], filter_probs(logits[i : i + 1], SamplingTensors.from_params([p])))


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(top_k=20),
        dict(top_p=0.85),
        dict(min_p=0.1),
        dict(top_k=40, top_p=0.9, min_p=0.05),
        dict(temperature=0.6, top_p=0.95),
        dict(repetition_penalty=1.3, top_k=30),
    ],
)
def test_single_row_draws_equal_generate_sample(kw):
    """With the same generator, B=1 gives generate.sample's tokens step after step."""
    kw = {"temperature": 0.8, **kw}
    ours_gen, ref_gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    ref_params = SamplingParams(**{k: v for k, v in kw.items()})
    counts = TokenCounts(1, V)
    counts.add_row(0, [3, 14, 15, 92])
    seen = torch.zeros(1, V, dtype=torch.bool)
    seen[0, [3, 14, 15, 92]] = True
    ours, ref = [], []
    for step in range(40):
        logits = logits_for(1, seed=100 + step)
        tok = sample_batch(logits, [RS(**kw)], counts, [0], [ours_gen]).tokens
        counts.record([0], tok)
        ref_logits = apply_repetition_penalty(logits, seen, kw.get("repetition_penalty", 1.0))
        ref_tok = sample(ref_logits, ref_params, ref_gen)
        seen[0, ref_tok] = True
        ours.append(int(tok[0]))
        ref.append(int(ref_tok[0]))
    assert ours == ref
    assert len(set(ours)) > 10, "the draws should be random"


# --- greedy and penalties ---------------------------------------------------------------------------------------------


def test_greedy_rows_take_the_argmax_of_the_penalised_logits():
    logits = logits_for(3, seed=6)
    counts = TokenCounts(3, V)
    top = logits.argmax(-1)
    for row in range(3):
        counts.add_row(row, [])
    counts.record([0, 1, 2], top)
    params = [
        RS(temperature=0),
        RS(temperature=0, top_k=1, top_p=0.1),
        RS(temperature=0, presence_penalty=2, frequency_penalty=2),
    ]
    out = sample_batch(logits, params, counts)
    assert out.tokens[:2].tolist() == top[:2].tolist()
    penalised = logits[2].clone()
    penalised[top[2]] -= 4
    assert int(out.tokens[2]) == int(penalised.argmax())
    ref = sample(apply_repetition_penalty(logits, counts.counts > 0, 1.5), SamplingParams(temperature=0))
    assert torch.equal(sample_batch(logits, [RS(temperature=0, repetition_penalty=1.5)] * 3, counts).tokens, ref)


def test_presence_and_frequency_penalties_subtract_the_defined_amounts():
    logits = logits_for(2, seed=7)
    counts = TokenCounts(4, V)
    counts.add_row(3, [10, 11])  # prompt tokens: only the repetition penalty sees them
    counts.add_row(1, [])
    counts.record([3, 1], [20, 30])
    counts.record([3, 1], [20, 31])
    counts.record([3, 1], [21, V + 7])  # an id >= V is ignored
    params = [RS(presence_penalty=0.5, frequency_penalty=0.25), RS(presence_penalty=-1.0, frequency_penalty=1.5)]
    t = SamplingTensors.from_params(params)
    rows = torch.tensor([3, 1])
    got = apply_penalties(logits, counts.prompt[rows], counts.counts[rows], t)
    expected = logits.clone()
    expected[0, 20] -= 0.5 + 0.25 * 2
    expected[0, 21] -= 0.5 + 0.25
    expected[1, [30, 31]] -= -1.0 + 1.5
    assert torch.equal(got, expected)
    assert int(counts.counts.sum()) == 5


def test_repetition_penalty_matches_generate():
    logits = logits_for(2, seed=8)
    counts = TokenCounts(2, V)
    counts.add_row(0, [1, 2, 3, V + 1])  # prompt tuning's virtual id V+1 is ignored
    counts.add_row(1, [4])
    counts.record([0, 1], [50, 60])
    params = [RS(repetition_penalty=1.3), RS(repetition_penalty=0.7)]
    got = apply_penalties(logits, counts.prompt, counts.counts, SamplingTensors.from_params(params))
    seen = counts.prompt | (counts.counts > 0)
    assert seen.sum(-1).tolist() == [4, 2]
    for i, p in enumerate(params):
        assert torch.equal(
            got[i], apply_repetition_penalty(logits[i : i + 1], seen[i : i + 1], p.repetition_penalty)[0]
        )


def test_repetition_comes_before_presence_and_frequency():
    logits = torch.tensor([[4.0, -4.0, 4.0, 1.0]])
    prompt = torch.tensor([[True, False, False, False]])
    counts = torch.tensor([[0, 2, 1, 0]], dtype=torch.int32)
    t = SamplingTensors.from_params([RS(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)])
    expected = torch.tensor([[2.0, -8.0 - 0.5 - 0.5, 2.0 - 0.5 - 0.25, 1.0]])
    assert torch.equal(apply_penalties(logits, prompt, counts, t), expected)


def test_penalties_need_counts():
    with pytest.raises(ValueError, match="pass counts="):
        sample_batch(logits_for(1), [RS(frequency_penalty=1.0)])


# --- seeds, shared generator, logprobs, row reuse ---------------------------------------------------------------------


def run_steps(requests: list[tuple[int, SamplingParams]], steps: int = 12, device: str = "cpu") -> list[list[int]]:
    """Decode `steps` steps of random logits keyed by each request's key (so a request sees the same logits in any
    batch), with penalty state in rows that are not 0..B-1; tokens per request."""
    params = [p for _, p in requests]
    counts = TokenCounts(len(params) + 2, V, device)
    rows = list(range(len(params) + 2))[::-1][: len(params)]
    for r in rows:
        counts.add_row(r, [7, 8, 9])
    gens = [p.make_generator(device) for p in params]
    out: list[list[int]] = [[] for _ in params]
    for step in range(steps):
        logits = torch.cat([logits_for(1, seed=1000 * key + step) for key, _ in requests]).to(device)
        tokens = sample_batch(logits, params, counts, rows, gens).tokens
        counts.record(rows, tokens)
        for i, tok in enumerate(tokens.tolist()):
            out[i].append(tok)
    return out


SEEDED = (0, RS(temperature=0.9, top_k=100, top_p=0.95, frequency_penalty=0.5, repetition_penalty=1.1, seed=1234))
OTHERS = [
    (1, RS(temperature=0)),
    (2, RS(temperature=1.2, min_p=0.05)),
    (3, RS(temperature=0.7, seed=99, presence_penalty=1.0)),
]


def test_a_seeded_request_gets_the_same_tokens_alone_or_in_any_batch():
    alone = run_steps([SEEDED])[0]
    assert len(set(alone)) > 3
    assert run_steps([SEEDED] + OTHERS)[0] == alone
    assert run_steps([OTHERS[0], SEEDED, OTHERS[1]])[1] == alone
    assert run_steps(OTHERS + [SEEDED])[3] == alone
    # and the other seeded request too
    assert run_steps([OTHERS[2], SEEDED])[0] == run_steps([OTHERS[2]])[0]


@pytest.mark.cuda
def test_seeded_request_is_batch_independent_on_cuda():
    alone = run_steps([SEEDED], device="cuda")[0]
    assert run_steps(OTHERS + [SEEDED], device="cuda")[3] == alone


def test_unseeded_rows_share_the_default_generator():
    logits = logits_for(3, seed=9)
    params = [RS(temperature=1.0)] * 3
    a = sample_batch(logits, params, default_generator=torch.Generator().manual_seed(1)).tokens
    b = sample_batch(logits, params, default_generator=torch.Generator().manual_seed(1)).tokens
    assert torch.equal(a, b)


def test_logprobs_are_the_raw_log_softmax_and_top_logprobs_are_sorted():
    logits = logits_for(3, seed=10)
    counts = TokenCounts(3, V)
    for row in range(3):
        counts.add_row(row, [5, 6])
    params = [
        RS(temperature=0.5, top_k=3, repetition_penalty=2.0, logprobs=True, top_logprobs=5),
        RS(),
        RS(temperature=0, presence_penalty=1.0, logprobs=True),
    ]
    out = sample_batch(logits, params, counts)
    raw = logits.log_softmax(-1)
    for i in (0, 2):
        assert out.logprobs[i] == pytest.approx(float(raw[i, out.tokens[i]]), abs=1e-6)
    ids, values = zip(*out.top_logprobs[0])
    assert list(ids) == raw[0].topk(5).indices.tolist()
    assert list(values) == sorted(values, reverse=True)
    assert values == pytest.approx(raw[0].topk(5).values.tolist(), abs=1e-6)
    assert out.top_logprobs[2] == []  # logprobs without top_logprobs
    assert out.logprobs[1] is None and out.top_logprobs[1] is None


def test_a_freed_and_reused_row_starts_clean():
    counts = TokenCounts(2, V)
    counts.add_row(0, [1, 2, 3])
    counts.add_row(1, [4])
    counts.record([0, 1], [10, 11])
    counts.free(0)
    assert not counts.prompt[0].any() and not counts.counts[0].any()
    counts.add_row(1, [5])  # reuse without an explicit free
    assert counts.prompt[1].nonzero()[:, 0].tolist() == [5] and not counts.counts[1].any()
