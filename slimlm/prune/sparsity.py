"""Exact sparsity of a model: zeros counted in the prunable linears and over all parameters.

Zeros save nothing by themselves: slimlm's dense CPU kernels multiply them like any other weight, so unstructured
and N:M sparsity make a model no faster or smaller here (2:4 needs sparse tensor-core kernels on a GPU).
"""

from __future__ import annotations

from slimlm.model import Transformer
from slimlm.prune.calibrate import linears_of_block


def sparsity_report(model: Transformer) -> dict[str, float | int]:
    """{"linear_zeros", "linear_params", "linear_sparsity", "zeros", "params", "sparsity"} counted exactly.

    linear_*: the 7 linears of every block (what unstructured pruning touches); the rest: every parameter once
    (tied embeddings counted once), so embeddings, norms and lm_head dilute it.
    """
    lz = lp = 0
    for block in model.layers:
        for lin in linears_of_block(block).values():
            lz += int((lin.weight == 0).sum())
            lp += lin.weight.numel()
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    params = sum(p.numel() for p in model.parameters())
    return {
        "linear_zeros": lz,
        "linear_params": lp,
        "linear_sparsity": lz / max(lp, 1),
        "zeros": zeros,
        "params": params,
        "sparsity": zeros / max(params, 1),
    }
