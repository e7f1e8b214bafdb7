"""Speculative decoding: cheap guesses of the next tokens, checked by one forward of the real model.

A *proposer* guesses up to k tokens that follow a sequence; the engine runs the model once over
[last token, guess_1 .. guess_k] (k + 1 positions per row, in one batch) and keeps guesses while they agree with
what the model itself picks, plus the model's own token at the first disagreement, so each verify step yields
1 .. k + 1 tokens for the price of roughly one decode step (decode reads all weights per step whatever T is).

- Greedy rows keep guess j when it equals the argmax at position j - 1: the tokens are exactly those of plain
  greedy decoding.
- Sampled rows use the standard rule (Leviathan et al. 2023, Chen et al. 2023) for a proposer that puts all its
  probability on its guess d: accept with probability p(d); on rejection draw from p with d removed, renormalised.
  The output distribution is exactly the model's.

`ngram_propose` is prompt-lookup decoding (vLLM's `ngram` method): find the most recent earlier occurrence of the
sequence's last n tokens (n from `max_n` down to `min_n`) and propose the tokens that followed it. It costs no
model and helps most where the output copies the input (extraction, editing, code, RAG). The other proposer, a
draft model's greedy guesses, lives in engine/draft.py; its guesses are point masses too, verified here the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from slimlm.engine.sampling import SamplingParams, SamplingTensors, draw, filter_probs


def ngram_propose(tokens: Sequence[int], k: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier match of the last n tokens of `tokens` ([] if none)."""
    L = len(tokens)
    if k < 1:
        return []
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        tail = list(tokens[L - n :])
        for start in range(L - n - 1, -1, -1):  # most recent first; the match must end before the tail starts
            if list(tokens[start : start + n]) == tail:
                return list(tokens[start + n : start + n + k])
    return []


def verify_greedy(logits: torch.Tensor, drafts: Sequence[int]) -> list[int]:
    """logits [k + 1, V] at [last, d_1 .. d_k] -> accepted tokens: matching drafts, then the model's next one."""
    picks = logits.argmax(dim=-1).tolist()  # picks[j] follows position j
    out = []
    for j, d in enumerate(drafts):
        out.append(picks[j])
        if picks[j] != d:
            return out
    out.append(picks[len(drafts)])
    return out


def verify_sampled(
    logits: torch.Tensor, drafts: Sequence[int], params: SamplingParams, generator: torch.Generator | None
) -> list[int]:
    """The rejection rule for point-mass drafts on logits [k + 1, V] (temperature and top-k/p/min-p applied)."""
    t = SamplingTensors.from_params([params] * logits.shape[0], logits.device)
    probs = filter_probs(logits.float() / t.temperature, t)  # [k + 1, V], rows unnormalised
    probs = probs / probs.sum(dim=-1, keepdim=True)
    out = []
    for j, d in enumerate(drafts):
        u = torch.rand(1, generator=generator, device=logits.device)
        if bool(u < probs[j, d]):
            out.append(d)
            continue
        residual = probs[j : j + 1].clone()
        residual[0, d] = 0.0  # max(0, p - q) for q = one-hot(d)
        out.append(int(draw(residual, generator)[0]))
        return out
    out.append(int(draw(probs[len(drafts) :], generator)[0]))
    return out
