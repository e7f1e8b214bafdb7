"""Perplexity of a causal LM on a text, with one fixed protocol (HF transformers' sliding-window perplexity).

Protocol:
  1. The whole text is tokenized once: `tokenizer.encode(text, add_special_tokens=True)`, i.e. with whatever the
     tokenizer adds at the very start (a Llama tokenizer adds one BOS, SmolLM2's adds nothing). Windows are slices
     of this one token stream: no BOS or other token is inserted into later windows.
  2. Windows of at most `seq_len` tokens start every `stride` tokens: [0, seq_len), [stride, stride + seq_len), ...
     until a window reaches the end of the text.
  3. A token is scored (its negative log-likelihood given the tokens before it in its window) in the first window
     where it is not the window's first token and was not scored before. So with stride < seq_len every token but
     the text's first is scored exactly once, by the window whose last `stride` tokens hold it, with at least
     seq_len - stride tokens of context; the overlap is context only. With stride == seq_len the windows are
     disjoint and each window's first token is context only (seq_len - 1 tokens scored per full window), exactly
     as in HF's guide. Smaller strides give lower, slower, more faithful perplexities: always report both numbers.
  4. `max_tokens` caps the number of scored tokens (the window where the cap falls is cut short).
  5. nll = mean over scored tokens of -log softmax(logits)[target], the log-softmax in fp32 whatever the model's
     dtype, summed in fp64; ppl = exp(nll). Logits are computed chunk by chunk from the final hidden states
     (`model.lm_head(model.hidden(ids))`, which is what `model(ids)` computes), only at the positions that score
     a token, so a [batch, seq_len, vocab] tensor is never held; a model without `hidden`/`lm_head` is called as
     `model(ids)` and its logits are log-softmaxed chunk by chunk.
  6. A model with prompt tuning gets its virtual tokens in front of every window (as generation and training
     do); they are context, never scored, and do not count toward seq_len.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimlm.errors import InputError
from slimlm.model import Transformer
from slimlm.protocol import CausalLM


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) of the stream go through the model; targets [score_from, end) are scored."""

    begin: int
    end: int
    score_from: int  # begin < score_from <= end - 1

    @property
    def length(self) -> int:
        return self.end - self.begin

    @property
    def scored(self) -> int:
        return self.end - self.score_from


def sliding_windows(n_tokens: int, seq_len: int, stride: int, max_tokens: int | None = None) -> list[Window]:
    """The windows of the protocol (see the module docstring) over a stream of n_tokens tokens."""
    if seq_len < 2:
        raise InputError(f"seq_len must be at least 2 (one token of context, one to score), got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise InputError(f"stride must be in [1, seq_len={seq_len}] (a larger stride would skip tokens), got {stride}")
    if max_tokens is not None and max_tokens < 1:
        raise InputError(f"max_tokens must be a positive number of tokens, got {max_tokens}")
    if n_tokens < 2:
        raise InputError(f"the text has {n_tokens} token(s); perplexity needs at least 2")
    windows, prev_end, scored = [], 0, 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        score_from = max(prev_end, begin + 1)
        if max_tokens is not None:
            end = min(end, score_from + max_tokens - scored)
        if end > score_from:
            windows.append(Window(begin, end, score_from))
            scored += end - score_from
        prev_end = end
        if end == n_tokens or (max_tokens is not None and scored >= max_tokens):
            break
    return windows


def _batches(windows: Sequence[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows grouped batch_size at a time, never mixing lengths (only the last may be shorter)."""
    out: list[list[Window]] = []
    for w in windows:
        if out and len(out[-1]) < batch_size and out[-1][0].length == w.length:
            out[-1].append(w)
        else:
            out.append([w])
    return out


def _param(model: nn.Module) -> torch.Tensor:
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError("the model has no parameters, so its device and dtype are unknown")
    return p


def _device_and_dtype(model: CausalLM | nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where and in what dtype a model runs: a CausalLM says so; any other nn.Module, its first parameter."""
    if isinstance(model, CausalLM):
        return model.device, model.dtype
    p = _param(model)
    return p.device, p.dtype


def _features(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, nn.Module]:
    """(features [B, T, F], head) with head(features) = logits: hidden states and lm_head, or logits and Identity."""
    if isinstance(model, Transformer):
        return model.hidden(ids), model.lm_head  # [B, T, D]
    return model(ids), nn.Identity()  # [B, T, V]


def _batch_nll(
    model: nn.Module, stream: torch.Tensor, batch: list[Window], prefix: torch.Tensor, chunk_size: int
) -> tuple[float, int]:
    """Summed NLL (fp64) and count of the targets of one batch of equal-length windows."""
    P = prefix.numel()
    ids = torch.stack([torch.cat([prefix, stream[w.begin : w.end]]) for w in batch])  # [B, P + L]
    feats, head = _features(model, ids)  # [B, P + L, F]
    # Target token at window offset j is predicted by the features at offset j - 1.
    sel = torch.cat(
        [feats[r, P + w.score_from - w.begin - 1 : P + w.length - 1] for r, w in enumerate(batch)]
    )  # [N, F]
    targets = torch.cat([stream[w.score_from : w.end] for w in batch])  # [N]
    total = 0.0
    for start in range(0, sel.shape[0], chunk_size):
        logits = head(sel[start : start + chunk_size]).float()  # [n, V], fp32 for the log-softmax
        nll = F.cross_entropy(logits, targets[start : start + chunk_size], reduction="none")  # [n]
        total += float(nll.double().sum())
    return total, int(targets.numel())


@torch.no_grad()
def perplexity_of_ids(
    model: CausalLM | nn.Module,
    ids: Sequence[int],
    *,
    seq_len: int = 512,
    stride: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 4,
    chunk_size: int = 512,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of a token stream under the protocol of the module docstring; see `perplexity` for the result."""
    from tqdm.auto import tqdm

    from slimlm.peft.prompt import input_prefix_ids

    if batch_size < 1 or chunk_size < 1:
        raise InputError(f"batch_size and chunk_size must be positive, got {batch_size} and {chunk_size}")
    windows = sliding_windows(len(ids), seq_len, stride, max_tokens)
    prefix_ids = input_prefix_ids(model)
    config = model.config if isinstance(model, CausalLM) else None  # any other nn.Module: no sizes to check
    limit = config.max_seq_len if config is not None else None
    if limit is not None and seq_len + len(prefix_ids) > limit:
        raise InputError(
            f"seq_len {seq_len} (+ {len(prefix_ids)} virtual tokens) exceeds the model's context of "
            f"{limit} tokens; lower seq_len"
        )
    vocab = config.vocab_size if config is not None else None
    if vocab is not None and (max(ids) >= vocab or min(ids) < 0):
        raise InputError(f"token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}: wrong tokenizer?")
    device, dtype = _device_and_dtype(model)
    stream = torch.tensor(list(ids), dtype=torch.long, device=device)  # [N]
    prefix = torch.tensor(prefix_ids, dtype=torch.long, device=device)  # [P]
    to_score = sum(w.scored for w in windows)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    nll_sum, n = 0.0, 0
    try:
        with tqdm(total=to_score, desc="perplexity", unit="tok", disable=not progress, dynamic_ncols=True) as bar:
            for batch in _batches(windows, batch_size):
                s, k = _batch_nll(model, stream, batch, prefix, chunk_size)
                nll_sum, n = nll_sum + s, n + k
                bar.update(k)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    nll = nll_sum / n
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "tokens_scored": n,
        "tokens_total": len(ids),
        "windows": len(windows),
        "seq_len": seq_len,
        "stride": stride,
        "max_tokens": max_tokens,
        "batch_size": batch_size,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "virtual_tokens": len(prefix_ids),
        "seconds": seconds,
        "tokens_per_s": n / seconds if seconds > 0 else 0.0,
    }


def perplexity(
    model: CausalLM | nn.Module,
    tokenizer: Any,
    text: str,
    *,
    seq_len: int = 512,
    stride: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 4,
    add_special_tokens: bool = True,
    chunk_size: int = 512,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of `model` on `text` (protocol in the module docstring).

    model: slimlm.model.Transformer (or any module mapping ids [B, T] to logits [B, T, V]); tokenizer: anything
    with `encode(text, add_special_tokens=...)` (slimlm's Tokenizer or an HF tokenizer). The model's train/eval
    mode is restored afterwards. Returns {"ppl", "nll" (mean, nats/token), "tokens_scored", "tokens_total",
    "windows", "seq_len", "stride", "max_tokens", "batch_size", "dtype", "device", "virtual_tokens",
    "add_special_tokens", "seconds", "tokens_per_s"}.
    """
    if not isinstance(text, str) or not text.strip():
        raise InputError("the text to measure perplexity on is empty")
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    out = perplexity_of_ids(
        model,
        ids,
        seq_len=seq_len,
        stride=stride,
        max_tokens=max_tokens,
        batch_size=batch_size,
        chunk_size=chunk_size,
        progress=progress,
    )
    out["add_special_tokens"] = add_special_tokens
    return out
