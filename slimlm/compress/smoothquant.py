"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before per-token INT8 quantization.

A few input channels of a Llama block's normed activations are much larger than the rest, so one absmax scale per
token wastes most of the int8 range on them. For a linear layer fed by an RMSNorm, y = W (g ⊙ x̂), dividing the
norm gain g by s [in] and multiplying the columns of W by s leaves y unchanged (exactly, up to fp round-off) and
shrinks channel j's activations by s_j. With s_j = max|X_j|^α / max|W_j|^(1-α) (over calibration tokens and over
the layers that read this norm), activations and weights share the difficulty; α = 0.5 as in the paper.

Applied to three groups per block: input_layernorm -> q/k/v and post_attention_layernorm -> gate/up (the norm gain
absorbs 1/s), and up_proj -> down_proj: down_proj's input is silu(gate x) ⊙ (up x), linear in up_proj's output
rows, so up_proj's rows absorb 1/s exactly. o_proj (fed by attention) is left as it is.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimlm.errors import InputError
from slimlm.model import Transformer


class _ChannelMax:
    """Running max |x| per input channel of a layer (forward hook on the first layer of a group)."""

    def __init__(self):
        self.max: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0].detach()
        m = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()  # [in]
        self.max = m if self.max is None else torch.maximum(self.max, m)


def _groups(block: nn.Module) -> list[tuple[torch.Tensor, list[nn.Linear]]]:
    """(the tensor whose last dim absorbs 1/s, the linear layers whose input columns take s) per smoothable input."""
    attn, mlp = block.self_attn, block.mlp
    return [
        (block.input_layernorm.weight, [attn.q_proj, attn.k_proj, attn.v_proj]),
        (block.post_attention_layernorm.weight, [mlp.gate_proj, mlp.up_proj]),
        (mlp.up_proj.weight.T, [mlp.down_proj]),
    ]  # up_proj rows = columns of its transpose (a view)


@torch.no_grad()
def smooth_model_(model: Transformer, calib_ids: torch.Tensor, alpha: float = 0.5, batch_size: int = 4) -> dict:
    """Fold SmoothQuant scales into the norms and linear layers of `model` in place; returns a summary."""
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"smoothing alpha must be in [0, 1], got {alpha}")
    if model.quantization:
        raise InputError("smooth the model before quantizing it")
    groups = [g for block in model.layers for g in _groups(block)]
    for _, linears in groups:
        if not all(isinstance(lin, nn.Linear) for lin in linears):
            raise InputError("smoothing needs plain nn.Linear layers: merge or remove adapters first")
    # One calibration pass serves every group: each rescaling below leaves every layer's output unchanged.
    stats = [_ChannelMax() for _ in groups]
    hooks = [linears[0].register_forward_hook(s) for (_, linears), s in zip(groups, stats)]
    try:
        model.eval()
        for i in range(0, calib_ids.shape[0], batch_size):
            model.hidden(calib_ids[i : i + batch_size])
    finally:
        for h in hooks:
            h.remove()
    ratios = []
    for (absorb, linears), s in zip(groups, stats):
        w_max = torch.stack([lin.weight.abs().amax(dim=0) for lin in linears]).amax(dim=0).float()  # [in]
        scale = (s.max.clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
        absorb.div_(scale.to(absorb.dtype))  # [in] or [.., in]: broadcasts over the last dim
        for lin in linears:
            lin.weight.mul_(scale.to(lin.weight.dtype)[None, :])
        ratios.append((s.max / s.max.median()).max().item())
    model.smoothing = {
        "method": "smoothquant",
        "alpha": alpha,
        "samples": int(calib_ids.shape[0]),
        "tokens": int(calib_ids.shape[1]),
    }
    return {"groups": len(groups), "max_outlier_ratio_before": max(ratios)}
