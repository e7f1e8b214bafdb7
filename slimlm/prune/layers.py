"""Whole-layer removal: keep a subset of a model's decoder blocks, chosen by hand or by block influence.

Used for structured depth pruning and to make a distillation student from its teacher ("keep every other layer").
The result is an ordinary Transformer with n_layers = len(keep) (per-layer sizes carried over if the model has
them), so a uniform model saves as an HF folder transformers loads.

Block influence (ShortGPT, Men et al., 2024): BI_i = 1 − mean over calibration tokens of cos(x_in, x_out) of block
i's residual stream. A block that barely turns the hidden state has low BI and is the first to go.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from slimlm.errors import InputError
from slimlm.model import Transformer
from slimlm.prune.calibrate import calibration_pass, check_calib_ids, forward_hooks


def every_other_layer(n_layers: int, keep: int | None = None) -> list[int]:
    """Indices of `keep` layers (default half) spread evenly over 0..n_layers-1, always keeping the first and last."""
    keep = keep if keep is not None else (n_layers + 1) // 2
    if not 1 <= keep <= n_layers:
        raise InputError(f"cannot keep {keep} of {n_layers} layers; choose 1..{n_layers}")
    if keep == 1:
        return [0]
    return sorted({round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)})


def _check_keep(model: Transformer, keep: list[int]) -> list[int]:
    n = model.config.n_layers
    bad = [i for i in keep if not (isinstance(i, int) and 0 <= i < n)]
    if bad or not keep or len(set(keep)) != len(keep):
        raise InputError(f"keep must list distinct layer indices in 0..{n - 1}, got {keep}")
    return sorted(keep)


def _keep_layers_(model: Transformer, keep: list[int]) -> Transformer:
    model.config = model.config.with_layer_sizes([model.config.layer_size(i) for i in keep])
    model.layers = nn.ModuleList(model.layers[i] for i in keep)
    model.tie_weights()
    return model


def drop_layers(model: Transformer, keep: list[int]) -> Transformer:
    """A new model made of model.layers[i] for i in keep (deep copies; the input model is untouched)."""
    keep = _check_keep(model, keep)
    student = copy.deepcopy(model)  # keeps quantized/adapted modules, dtype and device as they are
    return _keep_layers_(student, keep)


class _BlockInfluence:
    """Forward hook on a block: running sum over tokens of 1 − cos(x_in, x_out)."""

    def __init__(self):
        self.sum, self.n = 0.0, 0

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x_in, x_out = args[0].detach().float(), output.detach().float()  # [B, T, D]
        cos = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)  # [B, T]
        self.sum += float((1 - cos).sum())
        self.n += cos.numel()


def layer_importance(model: Transformer, calib_ids: torch.Tensor, batch_size: int = 4) -> list[float]:
    """Block influence BI_i = 1 − mean cos(x_in, x_out) of every layer on calibration ids [samples, tokens]."""
    stats = [_BlockInfluence() for _ in model.layers]
    with forward_hooks(list(zip(model.layers, stats))):
        calibration_pass(model, check_calib_ids(calib_ids, "layer pruning"), batch_size)
    return [s.sum / s.n for s in stats]


def prune_layers_(model: Transformer, n_drop: int, calib_ids: torch.Tensor, batch_size: int = 4) -> dict:
    """Remove the n_drop layers of lowest block influence in place (calib_ids [samples, tokens]); returns a summary."""
    n = model.config.n_layers
    if not isinstance(n_drop, int) or not 0 <= n_drop < n:
        raise InputError(f"n_drop must be in 0..{n - 1} (the model has {n} layers and must keep one), got {n_drop!r}")
    params_before = sum(p.numel() for p in model.parameters())
    bi = layer_importance(model, calib_ids, batch_size)
    dropped = sorted(sorted(range(n), key=lambda i: bi[i])[:n_drop])
    _keep_layers_(model, [i for i in range(n) if i not in dropped])
    params = sum(p.numel() for p in model.parameters())
    return {
        "kind": "layers",
        "dropped": dropped,
        "block_influence": bi,
        "n_layers_before": n,
        "n_layers_after": n - n_drop,
        "params_before": params_before,
        "params_after": params,
        "param_reduction": 1 - params / params_before,
    }
