"""Sampling for the engine: SamplingParams (one request's settings) and `sample_batch` (one token per running row).

`SamplingParams` is the one parameter class of slimlm: `LLM.generate`, the HTTP API, batch jobs and benchmarks all
build it, and the engine reads it per request. `sample_batch` turns one step's logits [B, V] into one token per row.
The elementwise work (penalties, temperature, top-k / top-p / min-p) is vectorised over rows with per-row parameter
tensors (`SamplingTensors`); only the final draw loops, over seeded rows, so that a seeded request draws from its own
torch.Generator and gets the same tokens alone or in any batch.

This module knows nothing of slots, scheduling or stop conditions. The per-row statistics the penalties need live in
`TokenCounts`, which the engine keeps up to date (`add_row`, `record`, `free`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from slimlm.engine.structured import StructuredOutput
from slimlm.errors import InputError


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops (vLLM / OpenAI names). Raises ValueError when invalid.

    temperature=0 (the default) is greedy. The OpenAI API maps its own defaults onto these (serve/api.py).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # HF/CTRL, over prompt + generated tokens; 1 = off
    presence_penalty: float = 0.0  # OpenAI, over generated tokens: logit -= presence * (count > 0)
    frequency_penalty: float = 0.0  # OpenAI, over generated tokens: logit -= frequency * count
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings: the text is cut before the first one
    min_new_tokens: int = 0  # stop tokens are suppressed until this many tokens exist
    ignore_eos: bool = False  # never stop on a stop token (benchmarks)
    logprobs: bool = False  # return the chosen token's logprob
    top_logprobs: int = 0  # and the N most likely tokens' (needs logprobs=True)
    structured: StructuredOutput | None = None  # JSON schema / regex / grammar / choice the output must follow

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        """Collect every invalid field into one ValueError whose message names the field and its allowed range."""
        checks = [  # (field, is valid, allowed)
            ("max_new_tokens", _integer(self.max_new_tokens) and self.max_new_tokens >= 1, "a positive integer"),
            ("temperature", _number(self.temperature) and self.temperature >= 0, "a number >= 0 (0 = greedy)"),
            ("top_p", _number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("top_k", _integer(self.top_k) and self.top_k >= -1, "an integer >= 1, or 0 or -1 for no limit"),
            ("min_p", _number(self.min_p) and 0 <= self.min_p <= 1, "a number in [0, 1]"),
            (
                "repetition_penalty",
                _number(self.repetition_penalty) and self.repetition_penalty > 0,
                "a number > 0 (1 = off)",
            ),
            (
                "presence_penalty",
                _number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
                "a number in [-2, 2]",
            ),
            (
                "frequency_penalty",
                _number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
                "a number in [-2, 2]",
            ),
            (
                "seed",
                self.seed is None or (_integer(self.seed) and 0 <= self.seed < 2**64),
                "null or an integer in [0, 2**64)",
            ),
            (
                "stop",
                isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
                "a list of non-empty strings",
            ),
            ("min_new_tokens", _integer(self.min_new_tokens) and self.min_new_tokens >= 0, "an integer >= 0"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "true or false"),
            ("logprobs", isinstance(self.logprobs, bool), "true or false"),
            ("top_logprobs", _integer(self.top_logprobs) and 0 <= self.top_logprobs <= 20, "an integer in [0, 20]"),
            (
                "structured",
                self.structured is None or isinstance(self.structured, StructuredOutput),
                "None or a StructuredOutput (slimlm.engine.structured)",
            ),
        ]
        errors = [f"{name} must be {allowed}, got {getattr(self, name)!r}" for name, ok, allowed in checks if not ok]
        if not errors and self.top_logprobs > 0 and not self.logprobs:
            errors.append(f"top_logprobs={self.top_logprobs} needs logprobs=true")
        if not errors and self.min_new_tokens > self.max_new_tokens:
            errors.append(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if errors:
            raise InputError("invalid sampling parameters: " + "; ".join(errors))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """The request's own generator when it has a seed; None means "use the engine's shared one"."""
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """logits [B, V] float; seen [B, V] bool marks tokens already in the prompt or the output (HF/CTRL style:
    divide positive logits by the penalty, multiply negative ones)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs [B, V] (rows need not sum to 1) by inverse CDF: one uniform number per row.

    torch.multinomial draws a random number per vocabulary entry (about 1.5 ms a row for V = 49k on a 2-core CPU);
    this is about 20x cheaper and samples the same distribution. right=True never picks a zero-probability token.
    """
    cdf = probs.float().cumsum(dim=-1)  # [B, V]
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


class TokenCounts:
    """Per-row token statistics for the penalties, indexed by the engine's row (slot) number.

    prompt [n_rows, V] bool marks prompt tokens (repetition penalty); counts [n_rows, V] int32 counts generated
    tokens (all three penalties). 64 rows x V=49152 take 15.7 MB. Ids outside [0, V) (prompt tuning's virtual
    tokens) are ignored.
    """

    def __init__(self, n_rows: int, vocab_size: int, device: torch.device | str = "cpu"):
        self.vocab_size = vocab_size
        self.prompt = torch.zeros(n_rows, vocab_size, dtype=torch.bool, device=device)
        self.counts = torch.zeros(n_rows, vocab_size, dtype=torch.int32, device=device)

    def add_row(self, row: int, prompt_ids: Sequence[int] | torch.Tensor) -> None:
        """Start a request in `row`: forget what was there, mark its prompt tokens."""
        self.free(row)
        ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=self.prompt.device)
        self.prompt[row, ids[(ids >= 0) & (ids < self.vocab_size)]] = True

    def record(self, rows: torch.Tensor | Sequence[int], tokens: torch.Tensor | Sequence[int]) -> None:
        """Count one generated token per row: rows [N], tokens [N] (distinct rows, as after one step)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.counts.device)
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.counts.device)
        valid = ((tokens >= 0) & (tokens < self.vocab_size)).int()  # adds 0 for invalid ids: no host sync
        self.counts.index_put_((rows, tokens.clamp(0, self.vocab_size - 1)), valid, accumulate=True)

    def free(self, row: int) -> None:
        self.prompt[row] = False
        self.counts[row] = 0


@dataclass
class SamplingTensors:
    """The batch's parameters as per-row tensors [B] (temperature [B, 1]), plus which stages any row uses."""

    temperature: torch.Tensor  # [B, 1]; greedy rows hold 1 (they are never divided)
    top_k: torch.Tensor  # [B] long, 0 = off
    top_p: torch.Tensor  # [B]
    min_p: torch.Tensor  # [B]
    repetition: torch.Tensor  # [B]
    presence: torch.Tensor  # [B]
    frequency: torch.Tensor  # [B]
    use_top_k: bool = False
    use_top_p: bool = False
    use_repetition: bool = False
    use_presence_frequency: bool = False

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], device: torch.device | str = "cpu") -> SamplingTensors:
        def col(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            temperature=col([p.temperature or 1.0 for p in params])[:, None],
            top_k=col([max(p.top_k, 0) for p in params], torch.long),
            top_p=col([p.top_p for p in params]),
            min_p=col([p.min_p for p in params]),
            # A penalty below float32's range (5e-324) would become 0, and a masked logit (-inf) x 0 is NaN.
            repetition=col([p.repetition_penalty for p in params]).clamp(min=torch.finfo(torch.float32).tiny),
            presence=col([p.presence_penalty for p in params]),
            frequency=col([p.frequency_penalty for p in params]),
            use_top_k=any(p.top_k > 0 for p in params),
            use_top_p=any(p.top_p < 1 for p in params),
            use_repetition=any(p.repetition_penalty != 1 for p in params),
            use_presence_frequency=any(p.presence_penalty or p.frequency_penalty for p in params),
        )


def apply_penalties(
    logits: torch.Tensor, prompt: torch.Tensor, counts: torch.Tensor, t: SamplingTensors
) -> torch.Tensor:
    """logits [B, V]; prompt [B, V] bool; counts [B, V] int32 of generated tokens. vLLM's order: repetition first
    (over prompt + generated tokens), then logit -= presence * (count > 0) + frequency * count."""
    generated = counts > 0
    if t.use_repetition:
        logits = apply_repetition_penalty(logits, prompt | generated, t.repetition[:, None])
    if t.use_presence_frequency:
        logits = logits - (t.presence[:, None] * generated + t.frequency[:, None] * counts)
    return logits


def filter_probs(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Temperature-scaled logits [B, V] -> probabilities [B, V], zero outside each row's top-k / top-p / min-p.

    Per row: top-k keeps the k largest logits (and ties with the k-th); top-p then keeps the smallest set of most
    likely tokens whose mass reaches top_p (and every token tied with the last one kept); min-p, last, zeroes tokens
    less likely than min_p x the most likely one. Not renormalised (`draw` does not need it).
    """
    if t.use_top_k:
        k = t.top_k.clamp(1, logits.shape[-1])  # off rows: k=1, masked out below
        kth = torch.topk(logits, int(k.max()), dim=-1).values.gather(1, k[:, None] - 1)  # [B, 1]
        logits = logits.masked_fill((logits < kth) & (t.top_k > 0)[:, None], float("-inf"))
    probs = logits.softmax(dim=-1)
    if t.use_top_p:
        probs = logits.masked_fill(_top_p_drop(probs, t.top_p), float("-inf")).softmax(dim=-1)
    return probs.masked_fill(probs < t.min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)


def _top_p_drop(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """probs [B, V], top_p [B] -> [B, V] bool, True outside each row's top-p set; rows with top_p=1 drop nothing.

    Why not sort the row: sorting 49152 floats takes ~8 ms on one CPU core, 0.5 s for
    64 rows. The set usually lies within the 256 most likely tokens, so take the top k, k growing x8 until it
    holds every row's set.
    """
    off = top_p >= 1
    k = min(256, probs.shape[-1])
    while True:
        top = probs.topk(k, dim=-1).values  # [B, k], most likely first
        mass_before = top.cumsum(dim=-1) - top  # [B, k]: mass of the tokens more likely than each
        if k == probs.shape[-1] or bool((off | (mass_before[:, -1] + top[:, -1] >= top_p)).all()):
            break
        k = min(probs.shape[-1], k * 8)
    # [B, 1]; at least the most likely token even when top_p is below float32's range (1e-50 -> 0.0)
    n_keep = (mass_before < top_p[:, None]).sum(dim=-1, keepdim=True).clamp(min=1)
    return (probs < top.gather(1, n_keep - 1)) & ~off[:, None]


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # [B] long
    logprobs: list[float | None]  # chosen token's logprob; None where the request did not ask
    top_logprobs: list[list[tuple[int, float]] | None]  # (token id, logprob), most likely first; None likewise


def sample_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    counts: TokenCounts | None = None,
    rows: torch.Tensor | Sequence[int] | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
    default_generator: torch.Generator | None = None,
) -> SampleOutput:
    """One token per row of logits [B, V], row i following params[i].

    counts/rows: the penalty state and which of its rows each logits row is (default 0..B-1); needed only when a
    request uses a penalty. The caller records the returned tokens (`counts.record(rows, out.tokens)`).
    generators[i]: row i's own generator (a seeded request's `make_generator`); None rows share
    `default_generator` (None: torch's global one). Greedy rows (temperature 0) take the argmax of the penalised
    logits. Logprobs follow vLLM's default: log-softmax of the raw logits as given, before penalties, temperature
    and top-k/top-p/min-p.
    """
    B = logits.shape[0]
    raw = logits = logits.float()
    if all(_plain_greedy(p) for p in params):  # the common decode case: no per-row parameter tensors at all
        return SampleOutput(logits.argmax(dim=-1), [None] * B, [None] * B)
    t = SamplingTensors.from_params(params, logits.device)
    if t.use_repetition or t.use_presence_frequency:  # else no [B, V] gathers
        if counts is None:
            raise ValueError("a request uses repetition/presence/frequency penalties: pass counts= (a TokenCounts)")
        rows = torch.arange(B) if rows is None else rows
        rows = torch.as_tensor(rows, dtype=torch.long, device=counts.counts.device)
        logits = apply_penalties(logits, counts.prompt[rows], counts.counts[rows], t)
    tokens = logits.argmax(dim=-1)  # [B]: the greedy rows' answer; random rows are overwritten below
    rand = [i for i, p in enumerate(params) if p.temperature > 0]
    if rand:
        sub = SamplingTensors.from_params([params[i] for i in rand], logits.device)
        probs = filter_probs(logits[rand] / sub.temperature, sub)  # [R, V]
        gens = [None] * B if generators is None else generators
        shared = [j for j, i in enumerate(rand) if gens[i] is None]
        drawn = torch.empty(len(rand), dtype=torch.long, device=logits.device)
        if shared:
            drawn[shared] = draw(probs[shared], default_generator)
        for j, i in enumerate(rand):  # seeded rows one at a time: their draws must not depend on the batch
            if gens[i] is not None:
                drawn[j] = draw(probs[j : j + 1], gens[i])[0]
        tokens[rand] = drawn
    return SampleOutput(tokens, *_logprobs(raw, tokens, params))


def _plain_greedy(p: SamplingParams) -> bool:
    return (
        p.temperature == 0
        and not p.logprobs
        and p.repetition_penalty == 1
        and not p.presence_penalty
        and not p.frequency_penalty
    )


def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, params: Sequence[SamplingParams]) -> tuple[list, list]:
    """Chosen-token and top-N logprobs from the raw logits [B, V] for rows that asked; None elsewhere."""
    chosen: list = [None] * len(params)
    top: list = [None] * len(params)
    want = [i for i, p in enumerate(params) if p.logprobs]
    if not want:
        return chosen, top
    logp = raw[want].log_softmax(dim=-1)  # [W, V]
    picked = logp.gather(1, tokens[want][:, None])[:, 0].tolist()
    n = max(params[i].top_logprobs for i in want)
    values, ids = logp.topk(n, dim=-1)  # [W, n], most likely first
    values, ids = values.tolist(), ids.tolist()
    for j, i in enumerate(want):
        k = params[i].top_logprobs
        chosen[i], top[i] = picked[j], list(zip(ids[j][:k], values[j][:k]))
    return chosen, top
