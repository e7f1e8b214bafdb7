"""Knowledge-distillation loss, chunked: α·T²·KL(teacher_T, student_T) + (1−α)·CE(labels), summed over tokens.

Like train/loss.py it takes the loss only at labelled positions and never holds [tokens, vocab] logits in full —
neither the student's nor the teacher's. Per chunk of rows it computes the student logits, the teacher's tempered
log-probs (from the teacher's hidden states on the fly, or from cached top-k log-probs), the loss, and right away
the gradient with respect to the student logits, which it multiplies back into d(hidden) and d(head weight).

Why analytic gradients in one pass rather than torch.utils.checkpoint per chunk: checkpointing recomputes the
student *and* the teacher logits in backward (two more [n, V] matmuls per chunk, and the teacher's hidden states
must be kept for it), while d(loss)/d(logits) has a closed form (below), so backward only scales two saved
gradients — the same cost as the fused cross-entropy. The closed forms are checked against autograd on the direct
formula (`kd_loss_reference`) in tests/test_distill.py. Heads that are not a bias-free nn.Linear fall back to
checkpointed chunks of that reference.

With s = student logits / T, t = teacher logits / T, p = softmax(s), q = softmax(t) (over the vocabulary, or
over the teacher's top-k ids renormalised for both, see `TopKTeacher`):
    forward KL(q‖p) = Σ q (log q − log p),   d/dlogits = (p − q) / T
    reverse KL(p‖q) = Σ p (log p − log q),   d/dlogits = p ⊙ (log p − log q − KL) / T
so α·T²·KL has gradient α·T·(…) and the CE part (1−α)·(softmax(logits) − onehot).

This module knows nothing of models or batches beyond hidden states, labels, a head and a teacher target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from slimlm.errors import InputError
from slimlm.train.batch import IGNORE
from slimlm.train.loss import saved_gradients

KL_DIRECTIONS = ("forward", "reverse")


@dataclass(frozen=True)
class KDSettings:
    alpha: float = 0.5  # weight of the KL term; 1 - alpha weighs the cross-entropy on the labels
    temperature: float = 1.0
    kl: str = "forward"  # "forward" = KL(teacher‖student) (mean-seeking) | "reverse" = KL(student‖teacher)


class DenseTeacher:
    """Teacher logits on the fly: its final-normed hidden states at the labelled rows [N, Dt] and its head."""

    def __init__(self, hidden: torch.Tensor, lm_head: nn.Module):
        self.hidden, self.lm_head = hidden, lm_head

    def __len__(self) -> int:
        return self.hidden.shape[0]

    @torch.no_grad()
    def logits(self, start: int, end: int) -> torch.Tensor:
        return _upcast(self.lm_head(self.hidden[start:end]))  # [n, V]


class TopKTeacher:
    """Cached teacher: its top-k log-probs (temperature 1) and their vocabulary ids at the labelled rows, [N, k].

    The KD term is taken over those k ids only, with teacher and student each renormalised over them. That is exact
    for any temperature (softmax over k ids of logp/T does not depend on the tail) and equals the full-vocabulary
    loss when k = V; the tail the teacher drops is left to the cross-entropy term.
    """

    def __init__(self, logp: torch.Tensor, ids: torch.Tensor):
        if logp.shape != ids.shape:
            raise ValueError(f"top-k log-probs {tuple(logp.shape)} and ids {tuple(ids.shape)} differ in shape")
        self.logp, self.ids = logp, ids.long()

    def __len__(self) -> int:
        return self.logp.shape[0]


Teacher = DenseTeacher | TopKTeacher


def _kd_rows(
    z: torch.Tensor, teacher: Teacher, start: int, end: int, s: KDSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row KL of one chunk and its gradient w.r.t. the student logits z [n, V] (fp32).

    Returns (kl [n], grad [n, V] or [n, k], ids [n, k] for a top-k teacher else None); the grad is of T²·KL.
    """
    T = s.temperature
    if isinstance(teacher, TopKTeacher):
        ids = teacher.ids[start:end].to(z.device)  # [n, k]
        ls = torch.log_softmax(z.gather(1, ids) / T, dim=-1)  # [n, k] student, renormalised over the k ids
        lt = torch.log_softmax(teacher.logp[start:end].to(z.device, z.dtype) / T, dim=-1)  # [n, k]
    else:
        ids = None
        ls = torch.log_softmax(z / T, dim=-1)  # [n, V]
        lt = torch.log_softmax(teacher.logits(start, end).to(z.device) / T, dim=-1)  # [n, V]
    p = ls.exp()
    if s.kl == "forward":
        q = lt.exp()
        kl = (q * (lt - ls)).sum(-1)  # [n]
        grad = (p - q) * T
    else:
        diff = ls - lt
        kl = (p * diff).sum(-1)
        grad = p * (diff - kl[:, None]) * T
    return kl, grad, ids


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half-precision logits (a stable log-softmax); float64 stays float64 (exact gradient tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _chunk_loss_and_grad(
    z: torch.Tensor, y: torch.Tensor, teacher: Teacher, start: int, s: KDSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss of one chunk of student logits z [n, V] (fp32) and d(loss)/dz [n, V]."""
    n = z.shape[0]
    g = torch.zeros_like(z)
    total = torch.zeros((), dtype=z.dtype, device=z.device)
    if s.alpha < 1:
        logp = torch.log_softmax(z, dim=-1)
        total = total - (1 - s.alpha) * logp.gather(1, y[:, None]).sum()
        g += logp.exp_()
        g[torch.arange(n, device=z.device), y] -= 1.0
        g *= 1 - s.alpha
    if s.alpha > 0:
        kl, gk, ids = _kd_rows(z, teacher, start, start + n, s)
        total = total + s.alpha * s.temperature**2 * kl.sum()
        if ids is None:
            g += s.alpha * gk
        else:
            g.scatter_add_(1, ids, s.alpha * gk)
    return total, g


class _FusedLinearKD(torch.autograd.Function):
    """The KD loss of h @ W^T, with d/dh (and d/dW) computed chunk by chunk in forward (as train/loss.py)."""

    @staticmethod
    def forward(
        ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, teacher: Teacher, s: KDSettings, chunk_size: int
    ) -> torch.Tensor:
        # h [N, D], weight [V, D], y [N]
        grad_h = torch.empty_like(h) if h.requires_grad else None
        wdt = torch.promote_types(weight.dtype, torch.float32)  # fp32 accumulation (fp64 stays fp64)
        grad_w = torch.zeros(weight.shape, dtype=wdt, device=weight.device) if weight.requires_grad else None
        total = torch.zeros((), dtype=_upcast(h).dtype, device=h.device)
        for start in range(0, h.shape[0], chunk_size):
            hc, yc = h[start : start + chunk_size], y[start : start + chunk_size]  # [n, D], [n]
            part, g = _chunk_loss_and_grad(_upcast(hc @ weight.T), yc, teacher, start, s)  # g [n, V]
            total += part
            g = g.to(weight.dtype)
            if grad_h is not None:
                grad_h[start : start + chunk_size] = g @ weight
            if grad_w is not None:
                grad_w += (g.T @ hc.to(weight.dtype)).to(wdt)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return (*saved_gradients(ctx, grad_out), None, None, None, None)


def labelled_rows(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, T, D], labels [B, T] -> (hidden [N, D], labels [N]) at the N positions that take a loss."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(h.device)
    keep = (y != IGNORE).nonzero().squeeze(1)  # [N], row-major: sample by sample, position by position
    return h.index_select(0, keep), y.index_select(0, keep)


def chunked_kd_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module,
    teacher: Teacher,
    settings: KDSettings,
    chunk_size: int = 512,
) -> tuple[torch.Tensor, int]:
    """Summed KD loss of the student `lm_head(hidden)` at the labelled positions, and their number.

    hidden [B, T, D] (final-normed student states), labels [B, T] with IGNORE where no loss is taken; `teacher`
    holds one row per labelled position in the same (row-major) order. Returns (loss_sum fp32 scalar, n).
    """
    if chunk_size <= 0:
        raise InputError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    h, y = labelled_rows(hidden, labels)  # [N, D], [N]
    n = h.shape[0]
    if len(teacher) != n:
        raise ValueError(
            f"the teacher has {len(teacher)} rows but the batch has {n} labelled positions; the teacher "
            "targets must come from the same batch (or cache) as the labels"
        )
    if n == 0:
        return h.sum().float(), 0
    if torch.is_grad_enabled() and isinstance(lm_head, nn.Linear) and lm_head.bias is None:
        return _FusedLinearKD.apply(h, lm_head.weight, y, teacher, settings, chunk_size), n
    total = None
    for start in range(0, n, chunk_size):  # other heads: recompute each chunk in backward
        hc, yc = h[start : start + chunk_size], y[start : start + chunk_size]
        args = (hc, yc, lm_head, teacher, start, settings)
        part = (
            checkpoint(_reference_chunk, *args, use_reentrant=False)
            if torch.is_grad_enabled()
            else _reference_chunk(*args)
        )
        total = part if total is None else total + part
    return total, n


def _reference_chunk(
    h: torch.Tensor, y: torch.Tensor, lm_head: nn.Module, teacher: Teacher, start: int, s: KDSettings
) -> torch.Tensor:
    z = _upcast(lm_head(h))
    if isinstance(teacher, TopKTeacher):
        t = teacher.logp[start : start + len(y)].to(z.device, z.dtype)
        ids = teacher.ids[start : start + len(y)].to(z.device)
    else:
        t, ids = teacher.logits(start, start + len(y)), None
    return kd_loss_reference(z, y, t, s, ids)


def kd_loss_reference(
    z: torch.Tensor,
    y: torch.Tensor,
    teacher_logits: torch.Tensor,
    s: KDSettings,
    teacher_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss written directly (autograd differentiates it): z [N, V] student logits, y [N] labels.

    teacher_logits [N, V] (or [N, k] log-probs at teacher_ids [N, k] for a top-k teacher). Unchunked; for tests and
    the fallback path.
    """
    T = s.temperature
    ce = F.cross_entropy(z, y, reduction="sum")
    zs = z if teacher_ids is None else z.gather(1, teacher_ids)
    ls, lt = torch.log_softmax(zs / T, dim=-1), torch.log_softmax(teacher_logits / T, dim=-1)
    kl = (
        F.kl_div(ls, lt, log_target=True, reduction="sum")
        if s.kl == "forward"
        else F.kl_div(lt, ls, log_target=True, reduction="sum")
    )
    return (1 - s.alpha) * ce + s.alpha * T**2 * kl


__all__ = [
    "KDSettings",
    "DenseTeacher",
    "TopKTeacher",
    "KL_DIRECTIONS",
    "chunked_kd_loss",
    "kd_loss_reference",
    "labelled_rows",
]
