"""train/loss.py: chunked cross-entropy equals the full-logits loss (value and gradients) and keeps less memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slimlm.train.batch import IGNORE
from slimlm.train.loss import chunked_cross_entropy

B, T, D, V = 3, 11, 16, 50


def make_inputs(seed: int = 0, ignore_frac: float = 0.4):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Linear(D, V, bias=False)
    hidden = torch.randn(B, T, D, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < ignore_frac] = IGNORE
    return hidden, labels, head


def reference(hidden, labels, head):
    logits = head(hidden).float()  # [B, T, V]
    return F.cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=IGNORE, reduction="sum")


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])  # 7 does not divide the ~20 labelled rows; 1000 > all
def test_matches_full_cross_entropy_value_and_grads(chunk_size):
    hidden, labels, head = make_inputs()
    ref = reference(hidden, labels, head)
    ref_gh, ref_gw = torch.autograd.grad(ref, (hidden, head.weight))

    loss, n = chunked_cross_entropy(hidden, labels, head, chunk_size)
    gh, gw = torch.autograd.grad(loss, (hidden, head.weight))

    assert n == int((labels != IGNORE).sum())
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh, ref_gh, atol=1e-5, rtol=0)
    torch.testing.assert_close(gw, ref_gw, atol=1e-5, rtol=0)


def test_all_ignore_gives_zero_and_backward_works():
    hidden, labels, head = make_inputs()
    loss, n = chunked_cross_entropy(hidden, torch.full_like(labels, IGNORE), head, 4)
    assert n == 0 and loss.item() == 0.0
    loss.backward()  # still part of the graph: zero gradients, no error
    assert torch.count_nonzero(hidden.grad) == 0


def test_no_grad_mode_gives_the_same_value():
    hidden, labels, head = make_inputs()
    with torch.no_grad():
        loss, _ = chunked_cross_entropy(hidden, labels, head, 5)
    torch.testing.assert_close(loss, reference(hidden, labels, head).detach(), atol=1e-5, rtol=1e-5)


def test_bf16_autocast_close_to_fp32():
    hidden, labels, head = make_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, n = chunked_cross_entropy(hidden, labels, head, 4)
    assert loss.dtype == torch.float32  # logits are upcast before the log-softmax
    torch.testing.assert_close(loss, reference(hidden, labels, head), rtol=2e-2, atol=0)


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while `fn` runs (what stays alive until backward)."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes)


def test_keeps_no_logits_for_backward():
    hidden, labels, head = make_inputs(ignore_frac=0.0)
    full = saved_bytes(lambda: reference(hidden, labels, head))
    chunked = saved_bytes(lambda: chunked_cross_entropy(hidden, labels, head, 8))
    logits_bytes = B * T * V * 4
    assert full >= logits_bytes  # the reference keeps the [N, V] log-softmax
    # The fused path keeps d(hidden) [N, D] and, for a head that trains, d(weight) [V, D] (which backward would
    # produce anyway) — never the [N, V] logits.
    assert chunked < logits_bytes / 2 + head.weight.numel() * 4
    head.weight.requires_grad_(False)
    assert saved_bytes(lambda: chunked_cross_entropy(hidden, labels, head, 8)) < logits_bytes / 2


def test_rejects_bad_chunk_size():
    hidden, labels, head = make_inputs()
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        chunked_cross_entropy(hidden, labels, head, 0)
