"""Concatenate linear layers that read the same input along their output rows, and split them back for saving.

y = x @ [W1; W2; W3]^T is [x W1^T | x W2^T | x W3^T] exactly: every output element is the same dot product, only
computed by one GEMM instead of three. Which layer kinds allow it depends on whether their stored numbers are
per output row:

- nn.Linear: weight rows (+ bias).
- Int8WeightOnlyLinear / DynamicInt8Linear: int8 rows + one scale per row; the dynamic layer's per-token activation
  scale depends on x only, which the parts share.
- StaticInt8Linear: as above, only when every part has the same calibrated input scale (one GEMM quantizes x once).
- Int4WeightOnlyLinear: packed rows + per-row group scales/zeros, when the group sizes agree.
Everything else raises CannotFuse with the reason (NF4: its block absmaxes are double-quantized with one offset per
tensor, so a concatenation would be stored differently; LoRA: the adapter has its own input path).

Saving: `keep_unfused_names` hooks the parent module's state_dict so a fused model still *presents* the unfused HF
names (`q_proj.weight`, `k_proj.weight`, ...; quantized buffers alike), and its load_state_dict accepts them. So
`save_hf_folder` and `save_quantized` write ordinary, HF-compatible files without knowing about fusion, and a saved
fused model reloads as the unfused model (fusing again after load takes milliseconds). This is the reverse of
gpt-fast's load-time fusion hook; the fused layout is a run-time choice, never a file format.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from slimlm.quantize.int4 import Int4WeightOnlyLinear
from slimlm.quantize.int8 import (
    DynamicInt8Linear,
    Int8WeightOnlyLinear,
    StaticInt8Linear,
)

# Kinds known not to concatenate, by class name (so this file imports neither peft nor nf4), and why.
NOT_CONCATENABLE = {
    "LoRALinear": "a LoRA/DoRA adapter is attached (its A/B path is separate): run the 'merge' pass first",
    "NF4Linear": "NF4 double-quantizes block absmaxes around one per-tensor mean, so concatenated rows would be "
    "stored differently: fuse before quantizing to NF4, or merge (which dequantizes) first",
    "AdapterOut": "a bottleneck adapter wraps this projection (not mergeable)",
}


class CannotFuse(Exception):
    """These layers cannot be concatenated exactly; str(e) says why (it goes into the pass's report)."""


def _cat_bias(layers: list[nn.Module]) -> torch.Tensor | None:
    """Biases concatenated [sum out]; zeros for a part without one (None when no part has one)."""
    if all(getattr(lin, "bias", None) is None for lin in layers):
        return None
    like = next(lin.bias for lin in layers if lin.bias is not None)
    return torch.cat(
        [lin.bias.detach() if lin.bias is not None else like.new_zeros(lin.out_features) for lin in layers]
    )


def _cat_linear(layers: list[nn.Linear]) -> nn.Linear:
    w = torch.cat([lin.weight.detach() for lin in layers])  # [sum out, in]
    fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")  # no throw-away init
    fused.weight = nn.Parameter(w, requires_grad=False)
    bias = _cat_bias(layers)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused


def _cat_int8(layers: list[nn.Module]) -> nn.Module:
    qweight = torch.cat([lin.qweight for lin in layers])  # [sum out, in] int8
    scale = torch.cat([lin.scale for lin in layers])  # [sum out] fp32
    return type(layers[0])(qweight, scale, _cat_bias(layers))


def _cat_int8_static(layers: list[StaticInt8Linear]) -> StaticInt8Linear:
    scales = [float(lin.input_scale) for lin in layers]
    if len(set(scales)) > 1:
        raise CannotFuse(
            f"calibrated input scales differ ({', '.join(f'{s:.4g}' for s in scales)}) and one GEMM "
            "quantizes its input with one scale"
        )
    return StaticInt8Linear(
        torch.cat([lin.qweight for lin in layers]),
        torch.cat([lin.scale for lin in layers]),
        _cat_bias(layers),
        layers[0].input_scale.clone(),
    )


def _cat_int4(layers: list[Int4WeightOnlyLinear]) -> Int4WeightOnlyLinear:
    groups = sorted({lin.group_size for lin in layers})
    if len(groups) > 1:
        raise CannotFuse(f"int4 group sizes differ ({groups}); the kernel takes one group size")
    return Int4WeightOnlyLinear(
        torch.cat([lin.qweight for lin in layers]),  # [sum out, in/2] uint8
        torch.cat([lin.scale for lin in layers]),  # [sum out, in/g] bf16
        torch.cat([lin.zero for lin in layers]),
        _cat_bias(layers),
    )


# Exact type -> how to concatenate rows. A subclass is not assumed to keep its parent's layout.
ROW_CONCAT = {
    nn.Linear: _cat_linear,
    Int8WeightOnlyLinear: _cat_int8,
    DynamicInt8Linear: _cat_int8,
    StaticInt8Linear: _cat_int8_static,
    Int4WeightOnlyLinear: _cat_int4,
}


@torch.no_grad()
def concat_rows(layers: list[nn.Module]) -> nn.Module:
    """One layer computing [layer_1(x) | ... | layer_n(x)] exactly; CannotFuse with the reason otherwise."""
    kinds = sorted({type(lin).__name__ for lin in layers})
    if len(kinds) > 1:
        raise CannotFuse(f"the projections are of different kinds ({', '.join(kinds)})")
    kind = type(layers[0])
    if kind not in ROW_CONCAT:
        raise CannotFuse(
            NOT_CONCATENABLE.get(
                kind.__name__,
                f"{kind.__name__} has no known row layout to "
                "concatenate (supported: "
                f"{', '.join(k.__name__ for k in ROW_CONCAT)})",
            )
        )
    if len({lin.in_features for lin in layers}) > 1:
        raise CannotFuse(f"input sizes differ ({[lin.in_features for lin in layers]})")
    return ROW_CONCAT[kind](layers)


def keep_unfused_names(parent: nn.Module, fused: str, parts: list[tuple[str, int]]) -> None:
    """Make `parent.state_dict()` show child `fused` as its parts [(name, out rows)], and load_state_dict take them.

    Tensors whose first dim is the fused row count are split by rows (weight, bias, qweight, scale, zero); anything
    else (StaticInt8Linear's scalar input_scale) is given to every part. Split pieces are cloned: safetensors
    refuses to save tensors that share storage.
    """
    parts = [(name, int(rows)) for name, rows in parts]
    parent.register_state_dict_post_hook(partial(_split_state, fused=fused, parts=parts))
    parent.register_load_state_dict_pre_hook(partial(_join_state, fused=fused, parts=parts))


def _split_state(
    module: nn.Module, state: dict, prefix: str, local_metadata: dict, *, fused: str, parts: list[tuple[str, int]]
) -> None:
    head, rows = f"{prefix}{fused}.", [r for _, r in parts]
    for key in [k for k in state if k.startswith(head)]:
        t, leaf = state.pop(key).detach(), key[len(head) :]
        pieces = t.split(rows) if t.dim() and t.shape[0] == sum(rows) else [t] * len(parts)
        for (name, _), piece in zip(parts, pieces):
            state[f"{prefix}{name}.{leaf}"] = piece.clone()


def _join_state(
    module: nn.Module,
    state: dict,
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing: list,
    unexpected: list,
    errors: list,
    *,
    fused: str,
    parts: list[tuple[str, int]],
) -> None:
    first = f"{prefix}{parts[0][0]}."
    for leaf in [k[len(first) :] for k in state if k.startswith(first)]:
        keys = [f"{prefix}{name}.{leaf}" for name, _ in parts]
        if not all(k in state for k in keys):
            continue  # load_state_dict then names what is missing and unexpected
        ts = [state.pop(k) for k in keys]
        if ts[0].dim() == 0 and any(not torch.equal(t, ts[0]) for t in ts):
            errors.append(f"{prefix}{fused}.{leaf}: the parts' values differ and a fused layer holds one")
        state[f"{prefix}{fused}.{leaf}"] = ts[0] if ts[0].dim() == 0 else torch.cat(ts)
