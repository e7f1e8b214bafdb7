"""GPTQ (Frantar et al., 2023): data-aware INT4 that fills the same grouped codes as round-to-nearest (int4.py).

For a linear layer with weight W [out, in] and calibration inputs X [n, in], GPTQ quantizes W one input column at a
time and spreads each column's rounding error over the columns not yet quantized, weighted by the inverse Hessian
of the layer's squared output error, H = 2/n · XᵀX [in, in]. Per group of g columns the scale/zero are taken from
the (already error-corrected) weights when the group starts, so the result is stored exactly like RTN int4.

The model is processed block by block, as in the paper's reference code: the calibration activations enter block 0,
every linear layer of the block gets its H from one pass of the block in full precision, the block is quantized, and
its *quantized* output becomes the next block's input, so later blocks correct for earlier blocks' error.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from slimlm.errors import InputError
from slimlm.model import Transformer, rope_cos_sin
from slimlm.quantize.int4 import (
    Int4WeightOnlyLinear,
    check_int4_shape,
    int4_params,
    int4_params_searched,
    int4_round,
    int4_value,
    pack_int4,
)


def gptq_int4_weight(
    w: torch.Tensor,
    H: torch.Tensor,
    group: int = 64,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> dict[str, torch.Tensor]:
    """Quantize w [out, in] given H [in, in]; returns int4 storage (see quantize_int4_weight) of the same layout.

    Without act_order the columns are visited in order and each group's scale/zero is taken from the
    error-corrected weights when the group starts. act_order=True visits the columns by decreasing H diagonal (the
    most active inputs first, whose error the others can still absorb); the groups' scale/zero are then fixed up
    front from w (static groups, each range clipped to minimise its diag(H)-weighted error), so the stored layout
    is unchanged.
    """
    out_f, in_f = w.shape
    check_int4_shape(out_f, in_f, group)
    block_size = max(group, block_size - block_size % group)  # groups never straddle a block
    W, H = _prepare(w, H, damp)  # inputs never active in calibration are zeroed: any value would do there
    scales = torch.zeros(out_f, in_f // group, dtype=torch.bfloat16)
    zeros = torch.zeros_like(scales)
    perm = torch.arange(in_f)
    if act_order:
        s, z = int4_params_searched(W, group, importance=torch.diag(H))  # static groups [out, in/g]
        scales, zeros = s.bfloat16(), z.bfloat16()
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    group_of = perm // group  # [in]: the group of the column visited at each step
    # Upper Cholesky factor of H^-1: row i holds what quantizing column i does to the columns after it.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8)
    for b0 in range(0, in_f, block_size):
        b1 = min(b0 + block_size, in_f)
        W1, Hinv1 = W[:, b0:b1].clone(), Hinv[b0:b1, b0:b1]
        err1 = torch.zeros_like(W1)
        for i in range(b1 - b0):
            col, g = b0 + i, int(group_of[b0 + i])
            if not act_order and col % group == 0:  # this group's range from the error-corrected weights
                s, z = int4_params(W1[:, i : i + group], group)
                scales[:, g], zeros[:, g] = s[:, 0].bfloat16(), z[:, 0].bfloat16()
            s, z = scales[:, g].float(), zeros[:, g].float()
            q = int4_round(W1[:, i], s, z)
            codes[:, perm[col]] = q.to(torch.uint8)
            e = (W1[:, i] - int4_value(q, s, z)) / Hinv1[i, i]  # [out]
            W1[:, i:] -= e[:, None] * Hinv1[i, i:][None, :]
            err1[:, i] = e
        W[:, b1:] -= err1 @ Hinv[b0:b1, b1:]
    return {"qweight": pack_int4(codes), "scale": scales, "zero": zeros}


def _prepare(w: torch.Tensor, H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dampened H with dead inputs fixed, and W with those inputs zeroed (float copies)."""
    W, H = w.detach().float().clone(), H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0])
    return W, H


class _InputHessian:
    """Accumulates H = 2/n · XᵀX of a layer's inputs from forward hooks."""

    def __init__(self, n_in: int):
        self.H, self.n = torch.zeros(n_in, n_in), 0

    def __call__(self, module: nn.Module, args: tuple, output) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, in]
        total = self.n + x.shape[0]
        self.H *= self.n / total
        x = x * math.sqrt(2 / total)
        self.H += x.T @ x
        self.n = total


@torch.no_grad()
def gptq_quantize_model_(
    model: Transformer,
    calib_ids: torch.Tensor,
    group_size: int = 64,
    damp: float = 0.01,
    act_order: bool = True,
    batch_size: int = 4,
    progress: bool = True,
) -> Transformer:
    """INT4 (grouped) by GPTQ on calibration token ids [n, T], in place; embeddings/head as in quantize_model_."""
    from tqdm.auto import tqdm

    from slimlm.quantize.schemes import linears_of_block, quantize_embeddings_

    if model.quantization:
        raise InputError(f"the model is already quantized ({model.quantization['scheme']})")
    if calib_ids.ndim != 2 or calib_ids.shape[1] < 2:
        raise InputError(f"calibration ids must be [samples, tokens >= 2], got {tuple(calib_ids.shape)}")
    model.eval()
    n, T = calib_ids.shape
    positions = torch.arange(T).expand(1, T)
    cos, sin = rope_cos_sin(model.inv_freq, positions, model.dtype)  # [1, 1, T, hd], shared by every sample
    xs = [model.embed_tokens(calib_ids[i : i + batch_size]) for i in range(0, n, batch_size)]  # [b, T, D] each

    def run_block(block: nn.Module, i: int) -> list[torch.Tensor]:
        return [block(x, cos, sin, None, None, i, None) for x in xs]

    for i, block in enumerate(tqdm(model.layers, desc="gptq", disable=not progress)):
        targets = linears_of_block(block)
        if not all(isinstance(layer, nn.Linear) for _, _, layer in targets):
            raise InputError("GPTQ needs plain nn.Linear layers: merge or remove adapters first")
        stats = [_InputHessian(layer.in_features) for _, _, layer in targets]
        hooks = [layer.register_forward_hook(s) for (_, _, layer), s in zip(targets, stats)]
        run_block(block, i)  # full-precision pass: the inputs every linear of this block sees
        for h in hooks:
            h.remove()
        for (parent, attr, layer), s in zip(targets, stats):
            q = gptq_int4_weight(layer.weight, s.H, group_size, damp, act_order=act_order)
            setattr(parent, attr, Int4WeightOnlyLinear(**q, bias=layer.bias))
        xs = run_block(block, i)  # the quantized block's output feeds the next block
    quantize_embeddings_(model, "int4")
    model.quantization = {
        "quant_method": "slimlm",
        "scheme": "int4",
        "group_size": group_size,
        "method": "gptq",
        "calibration": {"samples": n, "tokens": T, "damp": damp, "act_order": act_order},
    }
    return model
