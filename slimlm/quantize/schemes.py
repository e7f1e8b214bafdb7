"""Quantize a whole Llama model in place: the schemes and the per-layer conversion.

Schemes (`SCHEMES`): `int8` (weight-only, per channel), `int8-dynamic` (weights per channel, activations per token
at run time), `int8-static` (weights per channel, one calibrated activation scale per layer: compress/static_int8.py;
layers calibrated as unfit for one scale run dynamic and are listed in `dynamic_layers`),
`int4` (weight-only, grouped RTN, group 32/64/128). Every linear layer of the decoder blocks is
quantized. The embedding table becomes per-row int8 (`Int8Embedding`) and the LM head int8 — sharing the same codes
when the embeddings are tied, as in SmolLM2 — under every scheme: the table is 20 % of SmolLM2-135M and an int4
head costs more quality than it saves (llama.cpp keeps it at 6+ bits too). The head runs as the scheme's int8 layer
(dynamic under `int8-dynamic`, static under `int8-static`, weight-only otherwise). Norms stay in the model dtype.

A quantized model saves and reloads packed (checkpoint/quantized.py): loading builds the layers empty with
`quantize_model_` on the meta device and fills them with the stored codes. This module is torch only: it reads and
writes no files, so PEFT and checkpoint loading can use it without pulling in training or file code.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimlm.errors import InputError
from slimlm.model import Transformer
from slimlm.quantize.int4 import GROUP_SIZES, Int4WeightOnlyLinear
from slimlm.quantize.int8 import (
    DynamicInt8Linear,
    Int8Embedding,
    Int8WeightOnlyLinear,
    StaticInt8Linear,
    quantize_int8_weight,
)

SCHEMES = ("int8", "int8-dynamic", "int8-static", "int4")
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_scheme(scheme: str, group_size: int) -> None:
    if scheme not in SCHEMES:
        raise InputError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme == "int4" and group_size not in GROUP_SIZES:
        raise InputError(f"int4 group_size must be one of {GROUP_SIZES}, got {group_size}")


def describe_quantization(quantization: dict | None) -> str | None:
    """'int8', 'int8-dynamic' or 'int4 g64' for a model's `quantization` attribute (None when not quantized)."""
    if not quantization:
        return None
    scheme = quantization["scheme"]
    return f"{scheme} g{quantization['group_size']}" if scheme == "int4" else scheme


def linears_of_block(block: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent module, attribute name, layer) for every projection of one decoder block."""
    return [
        (parent, attr, getattr(parent, attr))
        for parent in (block.self_attn, block.mlp)
        for attr in BLOCK_LINEARS
        if getattr(parent, attr, None) is not None
    ]


def named_quantizable_linears(model: Transformer) -> dict[str, nn.Linear]:
    """Every nn.Linear a quantization scheme replaces: the decoder blocks' projections and the LM head."""
    out = {}
    for i, block in enumerate(model.layers):
        for parent, attr, layer in linears_of_block(block):
            part = "self_attn" if parent is block.self_attn else "mlp"
            out[f"layers.{i}.{part}.{attr}"] = layer
    out["lm_head"] = model.lm_head
    return out


def quantize_linear(linear: nn.Linear, scheme: str, group_size: int = 64, input_scale: float = 1.0) -> nn.Module:
    """The quantized replacement of one nn.Linear under `scheme` (input_scale: int8-static only)."""
    if scheme == "int8":
        return Int8WeightOnlyLinear.from_linear(linear)
    if scheme == "int8-dynamic":
        return DynamicInt8Linear.from_linear(linear)
    if scheme == "int8-static":
        return StaticInt8Linear.from_linear(linear, input_scale)
    return Int4WeightOnlyLinear.from_linear(linear, group_size)


@torch.no_grad()
def quantize_model_(
    model: Transformer, scheme: str, group_size: int = 64, input_scales: dict[str, float] | None = None
) -> Transformer:
    """Quantize `model` in place under `scheme` (see the module docstring); returns it.

    int8-static needs `input_scales` {linear name: scale} from compress.static_int8.calibrate_input_scales.
    """
    check_scheme(scheme, group_size)
    if any(
        getattr(b.self_attn, "qkv_proj", None) is not None or getattr(b.mlp, "gate_up_proj", None) is not None
        for b in model.layers
    ):
        raise InputError(
            "the model has fused q/k/v or gate/up projections: quantize first, then fuse "
            "(slimlm.fuse fuses quantized layers exactly)"
        )
    if model.quantization:
        raise InputError(f"the model is already quantized ({model.quantization['scheme']})")
    names = {id(layer): name for name, layer in named_quantizable_linears(model).items()}
    if scheme == "int8-static":
        missing = [n for n in names.values() if n not in (input_scales or {})]
        if missing:
            raise InputError(
                f"int8-static needs a calibrated input scale for every linear layer ({missing[0]} has "
                "none): run compress.static_int8.calibrate_input_scales on calibration text first"
            )
    scales = input_scales or {}
    dynamic = sorted(n for n, s in scales.items() if s is None) if scheme == "int8-static" else []

    def layer_scheme(layer: nn.Module) -> tuple[str, float]:  # int8-static layers without a scale run dynamic
        s = scales.get(names.get(id(layer)), 1.0)
        return ("int8-dynamic", 1.0) if s is None else (scheme, s)

    for parent, attr, layer in [t for block in model.layers for t in linears_of_block(block)]:
        if not isinstance(layer, nn.Linear):
            raise InputError(f"cannot quantize {type(layer).__name__} layers: merge or remove adapters first")
        layer_as, input_scale = layer_scheme(layer)
        setattr(parent, attr, quantize_linear(layer, layer_as, group_size, input_scale))
    quantize_embeddings_(model, *layer_scheme(model.lm_head))
    model.quantization = {"quant_method": "slimlm", "scheme": scheme, "group_size": group_size}
    if dynamic:
        model.quantization["dynamic_layers"] = dynamic
    return model


def quantize_embeddings_(model: Transformer, scheme: str, head_input_scale: float = 1.0) -> None:
    """Int8 embedding table and LM head; tied models share one set of codes."""
    emb = Int8Embedding.from_embedding(model.embed_tokens)
    if model.config.tie_word_embeddings:
        qweight, scale, bias = emb.qweight, emb.scale, None
    else:
        qweight, scale = quantize_int8_weight(model.lm_head.weight)
        bias = model.lm_head.bias
    if scheme == "int8-static":
        head = StaticInt8Linear(qweight, scale, bias, head_input_scale)
    else:
        head = (DynamicInt8Linear if scheme == "int8-dynamic" else Int8WeightOnlyLinear)(qweight, scale, bias)
    model.embed_tokens, model.lm_head = emb, head


def tie_quantized_head(model: Transformer) -> None:
    """Point the LM head at the embedding's codes again (loading assigns them separately)."""
    if model.config.tie_word_embeddings:
        model.lm_head.qweight, model.lm_head.scale = model.embed_tokens.qweight, model.embed_tokens.scale


def stored_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """What a quantized checkpoint holds: every buffer and parameter, the tied LM head once (live tensors)."""
    tied = model.config.tie_word_embeddings
    return {k: v for k, v in model.state_dict().items() if not (tied and k.startswith("lm_head."))}


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, tied tensors once (what the model holds in memory)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
