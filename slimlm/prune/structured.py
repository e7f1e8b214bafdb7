"""Structured pruning with real removal: MLP channels and attention KV groups leave the weight matrices.

Importance, measured on calibration data with the unpruned model (one forward pass with hooks):
  - MLP channel j of a layer: mean over tokens of |silu(gate_j x) · up_j x| (the input of down_proj) times
    ‖down[:, j]‖₂, i.e. the average size of what channel j adds to the residual stream.
  - KV group g of a layer (one k/v head and its n_heads / n_kv_heads query heads; under GQA they can only go
    together): mean over tokens of ‖o_proj restricted to the group's input columns applied to the group's
    attention output‖₂, i.e. the size of the group's contribution to o_proj's output.
A `ratio` of all units goes. uniform=True removes the same count from every layer (the lowest-scored of each);
uniform=False ranks all layers' scores together, each divided by its layer's mean score, so layers
lose different counts: a layer with a long tail of weak units loses more. (Raw scores are not comparable across
layers: the residual stream grows with depth, so ranking them raw strips the early layers, which costs SmolLM2-135M
two orders of magnitude in perplexity at 25 % of MLP channels.) Kept MLP channel counts are rounded to a multiple
of `multiple_of` (kernel-friendly shapes), and every layer keeps at least one unit. The model changes in place; its
config records the new sizes: plain and uniform when every layer has the same sizes (transformers loads the saved
folder), else per-layer `layer_sizes`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimlm.errors import InputError
from slimlm.model import Transformer
from slimlm.prune.calibrate import calibration_pass, check_calib_ids, forward_hooks


def check_ratio(ratio: float, what: str) -> None:
    if not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise InputError(f"ratio of {what} to remove must be in [0, 1) (1 would remove every one), got {ratio!r}")


class _MeanAbsInput:
    """Forward hook: mean over tokens of |x_j| per input column of a linear ([in], fp32)."""

    def __init__(self, n_in: int):
        self.sum, self.n = torch.zeros(n_in), 0

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, in]
        self.sum += x.abs().sum(dim=0).cpu()
        self.n += x.shape[0]


class _GroupContribution:
    """Forward hook on o_proj: mean over tokens of ‖x[:, cols_g] @ W_o[:, cols_g]ᵀ‖₂ per KV group g."""

    def __init__(self, n_groups: int, group_width: int):
        self.sum, self.n, self.width = torch.zeros(n_groups), 0, group_width

    def __call__(self, module: nn.Linear, args: tuple, output: torch.Tensor) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, H * hd]
        w = module.weight.detach().float()  # [D, H * hd]
        for g in range(len(self.sum)):
            cols = slice(g * self.width, (g + 1) * self.width)
            self.sum[g] += (x[:, cols] @ w[:, cols].T).norm(dim=-1).sum().cpu()  # [tokens, D] -> scalar
        self.n += x.shape[0]


def mlp_channel_scores(model: Transformer, calib_ids: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """Importance [intermediate_size_i] of every MLP channel of every layer (see the module docstring)."""
    stats = [_MeanAbsInput(b.mlp.down_proj.in_features) for b in model.layers]
    with forward_hooks([(b.mlp.down_proj, s) for b, s in zip(model.layers, stats)]):
        calibration_pass(model, check_calib_ids(calib_ids, "MLP channel pruning"), batch_size)
    return [
        s.sum / s.n * b.mlp.down_proj.weight.detach().float().norm(dim=0).cpu() for b, s in zip(model.layers, stats)
    ]


def kv_group_scores(model: Transformer, calib_ids: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """Importance [n_kv_heads_i] of every KV group of every layer (see the module docstring)."""
    stats = []
    for b in model.layers:
        a = b.self_attn
        stats.append(_GroupContribution(a.n_kv_heads, a.n_heads // a.n_kv_heads * a.head_dim))
    with forward_hooks([(b.self_attn.o_proj, s) for b, s in zip(model.layers, stats)]):
        calibration_pass(model, check_calib_ids(calib_ids, "head pruning"), batch_size)
    return [s.sum / s.n for s in stats]


def _round_keep(keep: int, total: int, multiple: int) -> int:
    """keep rounded to the nearest multiple (at least one multiple, at most total)."""
    return min(total, max(multiple, multiple * round(keep / multiple)))


def choose_kept(scores: list[torch.Tensor], ratio: float, uniform: bool, multiple: int = 1) -> list[torch.Tensor]:
    """Sorted indices of the units each layer keeps when a `ratio` of all units goes (lowest scores first)."""
    if uniform:
        counts = [_round_keep(len(s) - round(ratio * len(s)), len(s), multiple) for s in scores]
    else:  # rank over all layers, each layer's scores relative to its mean (raw sizes grow with depth)
        scores = [sc / sc.mean().clamp(min=1e-12) for sc in scores]
        flat = torch.cat(scores)
        n_remove = round(ratio * len(flat))
        thr = flat.sort().values[n_remove - 1] if n_remove else -float("inf")
        counts = [_round_keep(int((s > thr).sum()), len(s), multiple) for s in scores]
    return [s.argsort(descending=True, stable=True)[:k].sort().values for s, k in zip(scores, counts)]


def _sliced(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new nn.Linear holding lin.weight[rows][:, cols] (and bias[rows]); same dtype and device."""
    w = lin.weight.detach()
    w = w[rows.to(w.device)] if rows is not None else w
    w = w[:, cols.to(w.device)] if cols is not None else w
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device="meta")
    new.weight = nn.Parameter(w.clone())
    if lin.bias is not None:
        b = lin.bias.detach()
        new.bias = nn.Parameter((b[rows.to(b.device)] if rows is not None else b).clone())
    return new


def remove_mlp_channels_(block: nn.Module, keep: torch.Tensor) -> None:
    """Keep MLP channels `keep` [k] of a block: rows of gate/up, columns of down."""
    mlp = block.mlp
    mlp.gate_proj, mlp.up_proj = _sliced(mlp.gate_proj, rows=keep), _sliced(mlp.up_proj, rows=keep)
    mlp.down_proj = _sliced(mlp.down_proj, cols=keep)


def remove_kv_groups_(block: nn.Module, keep: torch.Tensor) -> None:
    """Keep KV groups `keep` [k] of a block: their k/v heads, their query heads and o_proj's matching columns."""
    a = block.self_attn
    r, hd = a.n_heads // a.n_kv_heads, a.head_dim
    kv_dims = (keep[:, None] * hd + torch.arange(hd)).flatten()  # [k * hd]
    q_heads = (keep[:, None] * r + torch.arange(r)).flatten()  # query head h reads KV head h // r
    q_dims = (q_heads[:, None] * hd + torch.arange(hd)).flatten()  # [k * r * hd]
    a.q_proj, a.o_proj = _sliced(a.q_proj, rows=q_dims), _sliced(a.o_proj, cols=q_dims)
    a.k_proj, a.v_proj = _sliced(a.k_proj, rows=kv_dims), _sliced(a.v_proj, rows=kv_dims)
    a.n_heads, a.n_kv_heads = len(q_heads), len(keep)


def _sizes(model: Transformer) -> list[dict[str, int]]:
    return [
        {
            "n_heads": b.self_attn.n_heads,
            "n_kv_heads": b.self_attn.n_kv_heads,
            "intermediate_size": b.mlp.down_proj.in_features,
        }
        for b in model.layers
    ]


def _finish(
    model: Transformer, kind: str, before: list[int], kept: list[torch.Tensor], params_before: int, **extra
) -> dict:
    """Record the new per-layer sizes in model.config and summarise what went (kept: each layer's kept units)."""
    model.config = model.config.with_layer_sizes(_sizes(model))
    key = "intermediate_size" if kind == "mlp" else "n_kv_heads"
    after = [model.config.layer_size(i)[key] for i in range(model.config.n_layers)]
    params = sum(p.numel() for p in model.parameters())
    assert params == model.config.num_params(), "config sizes disagree with the pruned weights"
    return {
        "kind": kind,
        **extra,
        "per_layer_before": before,
        "per_layer_after": after,
        "removed": sum(before) - sum(after),
        "total_before": sum(before),
        "kept": [k.tolist() for k in kept],
        "uniform": model.config.layer_sizes is None,
        "params_before": params_before,
        "params_after": params,
        "param_reduction": 1 - params / params_before,
    }


def prune_mlp_channels_(
    model: Transformer,
    ratio: float,
    calib_ids: torch.Tensor,
    uniform: bool = True,
    multiple_of: int = 8,
    batch_size: int = 4,
) -> dict:
    """Remove a `ratio` of all MLP channels in place, chosen by activation importance (module docstring).

    calib_ids [samples, tokens]: calibration token ids. uniform: same count per layer, else ranked over all layers.
    multiple_of: kept channel counts are rounded to a multiple of it. Returns per-layer counts, kept channel
    indices ("kept") and params.
    """
    check_ratio(ratio, "MLP channels")
    if multiple_of < 1:
        raise InputError(f"multiple_of must be >= 1, got {multiple_of}")
    params_before = sum(p.numel() for p in model.parameters())
    before = [b.mlp.down_proj.in_features for b in model.layers]
    kept = choose_kept(mlp_channel_scores(model, calib_ids, batch_size), ratio, uniform, multiple_of)
    for block, keep in zip(model.layers, kept):
        remove_mlp_channels_(block, keep)
    return _finish(model, "mlp", before, kept, params_before, ratio=ratio, multiple_of=multiple_of)


def prune_heads_(
    model: Transformer, ratio: float, calib_ids: torch.Tensor, uniform: bool = True, batch_size: int = 4
) -> dict:
    """Remove a `ratio` of all KV groups (each: 1 k/v head + its query heads) in place, by importance.

    calib_ids [samples, tokens]: calibration token ids. uniform: same count per layer, else ranked over all layers.
    Every layer keeps at least one group. Returns per-layer KV-head counts, kept group indices and params.
    """
    check_ratio(ratio, "KV groups")
    params_before = sum(p.numel() for p in model.parameters())
    before = [b.self_attn.n_kv_heads for b in model.layers]
    kept = choose_kept(kv_group_scores(model, calib_ids, batch_size), ratio, uniform)
    for block, keep in zip(model.layers, kept):
        remove_kv_groups_(block, keep)
    return _finish(model, "heads", before, kept, params_before, ratio=ratio)
