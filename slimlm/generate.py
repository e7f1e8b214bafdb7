"""Model-level generation over a static KVCache: prefill, decode_one_token and a reference token loop.

Every front (LLM.generate, `slimlm serve`, batch jobs) runs on the engine (slimlm/engine/core.py). What stays here
is what works on a bare model and a KVCache: the prefill/decode step functions that eval/speed.py, the fusion
benchmark and torch.compile use, and `generate_tokens`, a plain left-padded decode loop that tests use as an
independent reference for the engine and that exports are checked with. Sampling parameters are the engine's
SamplingParams (one class everywhere).
`decode_one_token` is a separate small function so that exactly the hot step can be torch.compile'd.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from slimlm.engine.sampling import SamplingParams, apply_repetition_penalty, draw  # noqa: F401 (re-exported)
from slimlm.errors import InputError
from slimlm.kv_cache import KVCache
from slimlm.protocol import CausalLM


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from logits [B, V] (float32); returns [B] token ids."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return draw(probs, generator)


def prefill(model: CausalLM, input_ids: torch.Tensor, cache: KVCache, cache_pos: torch.Tensor) -> torch.Tensor:
    """Run the prompt input_ids [B, T] into cache slots cache_pos [T]; logits of the last position [B, V]."""
    return model(input_ids, cache=cache, cache_pos=cache_pos, logits_to_keep=1)[:, -1]


def decode_one_token(model: CausalLM, token: torch.Tensor, cache: KVCache, cache_pos: torch.Tensor) -> torch.Tensor:
    """One step: token [B, 1] at slot cache_pos [1] -> logits [B, V]."""
    return model(token, cache=cache, cache_pos=cache_pos)[:, -1]


DecodeFn = Callable[[CausalLM, torch.Tensor, KVCache, torch.Tensor], torch.Tensor]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, T] left-padded to the longest prompt, and start [B] = pad count per row."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p, dtype=torch.long)
    start = torch.tensor([T - len(p) for p in prompts], dtype=torch.long)
    return ids.to(device), start.to(device)


@torch.no_grad()
def generate_tokens(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    stop_token_ids: set[int] | Sequence[int] = (),
    pad_id: int = 0,
    cache: KVCache | None = None,
    decode_fn: DecodeFn = decode_one_token,
    prefill_fn: DecodeFn = prefill,
) -> Iterator[list[int | None]]:
    """Yield, per step, one new token per prompt (None for rows that have finished) until all rows finish.

    Rows stop at a stop token (unless params.ignore_eos) or after max_new_tokens. A given `cache` is reused when
    it is large enough (batch == len(prompts), max_len >= longest prompt + max_new_tokens).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("every prompt needs at least one token")
    device, B = model.device, len(prompts)
    input_ids, start = left_pad(prompts, pad_id, device)
    T = input_ids.shape[1]
    need = T + params.max_new_tokens
    if need > model.config.max_seq_len:
        raise InputError(
            f"prompt ({T} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the model's "
            f"context of {model.config.max_seq_len} tokens; shorten the prompt or lower max_new_tokens"
        )
    if cache is None or cache.batch_size != B or cache.max_len < need:
        cache = KVCache.for_model(model, B, need)
    cache.reset(start)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    stops = torch.tensor(sorted(stop_token_ids), dtype=torch.long, device=device)
    seen = None  # [B, V] bool: tokens in the prompt (not its padding) or generated so far
    if params.repetition_penalty != 1.0:
        V = model.config.vocab_size
        real = torch.arange(T, device=device)[None, :] >= start[:, None]  # [B, T]
        real &= input_ids < V  # prompt tuning's virtual token ids (>= V) are not vocabulary tokens
        counts = torch.zeros(B, V, dtype=torch.int32, device=device)
        seen = counts.scatter_add_(1, input_ids.clamp(max=V - 1), real.int()) > 0

    logits = prefill_fn(model, input_ids, cache, torch.arange(T, device=device))
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(params.max_new_tokens):
        logits = logits.float()
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        if step < params.min_new_tokens and len(stops):
            logits[:, stops] = float("-inf")
        token = sample(logits, params, generator)  # [B]
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        yield [None if d else t for t, d in zip(token.tolist(), done.tolist())]
        if not params.ignore_eos and len(stops):
            done |= torch.isin(token, stops)
        if bool(done.all()) or step == params.max_new_tokens - 1:
            return
        logits = decode_fn(model, token[:, None], cache, torch.tensor([T + step], device=device))
