"""Unstructured and semi-structured (N:M) weight pruning: zero individual weights of the blocks' linears.

Scores: magnitude |W_ij|, or Wanda (Sun et al., 2023) |W_ij| · ‖X_j‖₂ with X the calibration inputs of that linear.
  - Unstructured magnitude, scope "layer": each linear loses exactly round(s · numel) weights, lowest |W| first;
    scope "global": one threshold over the |W| of all linears together (layers end up with different sparsities).
  - Unstructured Wanda: within each output row, exactly round(s · in_features) weights with the lowest score go
    (the paper's per-output comparison group; scores of different layers are not comparable, so no global scope).
  - N:M (2:4, 4:8): in every group of M consecutive input weights of a row the N best scores stay.
Wanda runs block by block like the paper: block i's input norms come from the outputs of the already-pruned blocks
before it. Only the 7 linears of each block are pruned, never embeddings or lm_head. Weights are zeroed in place;
no mask is kept. Zeros give no speed-up with dense kernels (see sparsity.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from slimlm.errors import InputError
from slimlm.model import Transformer
from slimlm.prune.calibrate import BlockInputs, InputSqNorm, check_calib_ids, forward_hooks, linears_of_block
from slimlm.prune.sparsity import sparsity_report

SCORES = ("magnitude", "wanda")
SCOPES = ("layer", "global")
NM_PATTERNS = {"2:4": (2, 4), "4:8": (4, 8)}


def check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise InputError(f"sparsity must be in [0, 1) (the fraction of weights set to zero), got {sparsity!r}")


def lowest_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (True = prune) of exactly the k lowest entries of each row of score [rows, n]."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, score.argsort(dim=1, stable=True)[:, :k], True)
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask (True = prune) of score [out, in]: in each group of m consecutive inputs the m - n lowest go."""
    out_f, in_f = score.shape
    if in_f % m:
        raise InputError(f"{n}:{m} sparsity needs in_features divisible by {m}, got {in_f}")
    groups = score.reshape(-1, m)  # [out * in/m, m]
    return lowest_mask(groups, m - n).reshape(out_f, in_f)


def _apply_(lin: nn.Linear, prune: torch.Tensor) -> None:
    with torch.no_grad():
        lin.weight.masked_fill_(prune.to(lin.weight.device), 0)


def _layer_mask(score: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    if per_row:  # Wanda: compare within each output row
        return lowest_mask(score, round(sparsity * score.shape[1]))
    return lowest_mask(score.reshape(1, -1), round(sparsity * score.numel())).reshape(score.shape)


def _global_magnitude_(model: Transformer, sparsity: float) -> None:
    """One |W| threshold over every block linear; ties at the threshold broken in order so the count is exact."""
    lins = [lin for block in model.layers for lin in linears_of_block(block).values()]
    k = round(sparsity * sum(lin.weight.numel() for lin in lins))
    if k == 0:
        return
    scores = [lin.weight.detach().abs().float().flatten().cpu() for lin in lins]
    thr = torch.cat(scores).kthvalue(k).values
    left = k - sum(int((s < thr).sum()) for s in scores)  # how many ties at thr still go
    for lin, s in zip(lins, scores):
        prune = s < thr
        ties = (s == thr).nonzero().flatten()[: max(left, 0)]
        prune[ties] = True
        left -= len(ties)
        _apply_(lin, prune.view_as(lin.weight))


@torch.no_grad()
def _prune_blocks_(
    model: Transformer,
    score_fn: str,
    mask_fn: Callable[[torch.Tensor], torch.Tensor],
    calib_ids: torch.Tensor | None,
    batch_size: int,
) -> None:
    """Prune each block's linears with mask_fn(score); Wanda scores from block-sequential calibration inputs."""
    inputs = BlockInputs(model, check_calib_ids(calib_ids, "wanda"), batch_size) if score_fn == "wanda" else None
    for i, block in enumerate(model.layers):
        lins = linears_of_block(block)
        norms = {name: torch.ones(lin.in_features) for name, lin in lins.items()}  # magnitude: |W| alone
        if inputs is not None:
            stats = {name: InputSqNorm(lin.in_features) for name, lin in lins.items()}
            with forward_hooks([(lins[n], s) for n, s in stats.items()]):
                inputs.run(block, i)  # the unpruned block on the pruned blocks' outputs
            norms = {name: s.norm for name, s in stats.items()}
        for name, lin in lins.items():
            score = lin.weight.detach().abs().float().cpu() * norms[name][None, :]  # [out, in]
            _apply_(lin, mask_fn(score))
        if inputs is not None and i + 1 < len(model.layers):
            inputs.advance(block, i)


def prune_unstructured_(
    model: Transformer,
    method: str = "wanda",
    sparsity: float = 0.5,
    calib_ids: torch.Tensor | None = None,
    scope: str = "layer",
    batch_size: int = 4,
) -> dict:
    """Zero a `sparsity` fraction of the block linears' weights in place by magnitude or Wanda scores.

    calib_ids [samples, tokens]: calibration token ids (Wanda only). scope: "layer" (every linear pruned to the
    target) or "global" (magnitude only: one threshold over all linears). Returns what was done and the exact
    sparsity (see sparsity_report); dense kernels run no faster on the zeros.
    """
    check_sparsity(sparsity)
    if method not in SCORES:
        raise InputError(
            f"unknown unstructured method {method!r}; use one of {', '.join(SCORES)} "
            f"(or prune_nm_ for {', '.join(NM_PATTERNS)})"
        )
    if scope not in SCOPES:
        raise InputError(f"unknown scope {scope!r}; use 'layer' or 'global'")
    if scope == "global" and method != "magnitude":
        raise InputError(
            "scope 'global' is for magnitude: Wanda scores compare weights within one output row, "
            "not across layers; use scope 'layer'"
        )
    params_before = sum(p.numel() for p in model.parameters())
    if scope == "global":
        _global_magnitude_(model, sparsity)
    else:
        _prune_blocks_(
            model, method, lambda s: _layer_mask(s, sparsity, per_row=method == "wanda"), calib_ids, batch_size
        )
    return {
        "kind": "unstructured",
        "method": method,
        "scope": scope,
        "target_sparsity": sparsity,
        "params_before": params_before,
        **sparsity_report(model),
    }


def prune_nm_(
    model: Transformer,
    pattern: str = "2:4",
    method: str = "wanda",
    calib_ids: torch.Tensor | None = None,
    batch_size: int = 4,
) -> dict:
    """N:M semi-structured sparsity in place: keep the N best of every M consecutive inputs of each row.

    pattern: "2:4" or "4:8"; method: "magnitude" or "wanda" scores (Wanda needs calib_ids [samples, tokens]).
    """
    if pattern not in NM_PATTERNS:
        raise InputError(f"unknown N:M pattern {pattern!r}; use one of {', '.join(NM_PATTERNS)}")
    if method not in SCORES:
        raise InputError(f"unknown N:M score {method!r}; use one of {', '.join(SCORES)}")
    n, m = NM_PATTERNS[pattern]
    bad = sorted({lin.in_features for b in model.layers for lin in linears_of_block(b).values() if lin.in_features % m})
    if bad:
        raise InputError(f"{pattern} sparsity needs every linear's in_features divisible by {m}, got {bad}")
    params_before = sum(p.numel() for p in model.parameters())
    _prune_blocks_(model, method, lambda s: nm_mask(s, n, m), calib_ids, batch_size)
    return {
        "kind": "nm",
        "method": method,
        "pattern": pattern,
        "target_sparsity": 1 - n / m,
        "params_before": params_before,
        **sparsity_report(model),
    }
