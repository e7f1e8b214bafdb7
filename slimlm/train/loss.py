"""Chunked cross-entropy: the LM loss without ever holding the full [tokens, vocab] logits.

With a 49k vocabulary the logits of one 8 x 2048 micro-batch are 3.2 GB in fp32, more than the rest of a small
model's activations together. So the loss (1) projects only positions that carry a label (SFT masks the prompt,
which alone skips most of the work) and (2) does it in chunks of rows. For a plain linear head the gradient is
computed in the same pass (fused linear cross-entropy, as Liger-Kernel does): each chunk's logits are turned into
softmax - onehot right away and multiplied back into d(hidden) (and d(weight) if the head trains), so backward
neither keeps nor recomputes any logits. Other heads fall back to chunks under activation checkpointing.

This module knows nothing of models or batches beyond a hidden-state tensor, labels and a head module.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from slimlm.errors import InputError
from slimlm.train.batch import IGNORE


def chunked_cross_entropy(
    hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, chunk_size: int = 1024
) -> tuple[torch.Tensor, int]:
    """Summed token cross-entropy of `lm_head(hidden)` against `labels`, and the number of labelled tokens.

    hidden [B, T, D] (final-normed), labels [B, T] with IGNORE where no loss is taken. Returns (loss_sum, n): a
    scalar fp32 tensor and an int. The sum, not the mean, so a trainer can normalise over a whole accumulated step.
    With no labelled token it returns a zero that is still part of the graph (backward gives zero gradients).
    """
    if chunk_size <= 0:
        raise InputError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    h = hidden.reshape(-1, hidden.shape[-1])  # [B*T, D]
    y = labels.reshape(-1).to(h.device)  # [B*T]
    keep = (y != IGNORE).nonzero().squeeze(1)  # [N] positions that take a loss
    h, y = h.index_select(0, keep), y.index_select(0, keep)  # [N, D], [N]
    n = int(keep.numel())
    if n == 0:
        return h.sum().float(), 0  # empty sum: 0.0 with a grad_fn, no NaN whatever hidden holds
    if torch.is_grad_enabled() and isinstance(lm_head, nn.Linear) and lm_head.bias is None:
        return _FusedLinearCrossEntropy.apply(h, lm_head.weight, y, chunk_size), n
    # Recompute-in-backward only pays off when a backward will follow; under no_grad just run the chunks.
    use_checkpoint = torch.is_grad_enabled()
    total = None
    for start in range(0, n, chunk_size):
        hc, yc = h[start : start + chunk_size], y[start : start + chunk_size]  # [n, D], [n]
        if use_checkpoint:
            part = checkpoint(_chunk_loss, hc, yc, lm_head, use_reentrant=False)
        else:
            part = _chunk_loss(hc, yc, lm_head)
        total = part if total is None else total + part
    return total, n


def _chunk_loss(h: torch.Tensor, y: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """Summed cross-entropy of one chunk: h [n, D] -> logits [n, V] (fp32 for a stable log-softmax) -> scalar."""
    logits = lm_head(h).float()
    return F.cross_entropy(logits, y, reduction="sum")


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum CE(h @ W^T, y) with d/dh (and d/dW) computed chunk by chunk in forward; backward only scales them."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk_size: int) -> torch.Tensor:
        # h [N, D], weight [V, D], y [N]
        need_w = weight.requires_grad
        grad_h = torch.empty_like(h) if h.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_size):
            hc, yc = h[start : start + chunk_size], y[start : start + chunk_size]  # [n, D], [n]
            logp = torch.log_softmax((hc @ weight.T).float(), dim=-1)  # [n, V]; one fused pass over the logits
            total -= logp.gather(1, yc[:, None]).sum()
            g = logp.exp_()  # softmax, in place
            g[torch.arange(g.shape[0], device=g.device), yc] -= 1.0  # d(sum CE)/d(logits) = softmax - onehot
            g = g.to(weight.dtype)  # (under autocast the two matmuls below run in its dtype, as the forward did)
            if grad_h is not None:
                grad_h[start : start + chunk_size] = g @ weight
            if grad_w is not None:
                grad_w += (g.T @ hc.to(weight.dtype)).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return (*saved_gradients(ctx, grad_out), None, None)


def saved_gradients(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Backward of a loss whose forward saved d loss / d hidden and d loss / d weight: scale them by grad_out."""
    grad_h, grad_w = ctx.saved_tensors
    gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
    gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
    return gh, gw
