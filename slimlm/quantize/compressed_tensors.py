"""compressed-tensors folders: write slimlm's int8 models in the layout transformers and vLLM load as quantized, and
read such folders (slimlm's own or llm-compressor's) back into slimlm's int8 layers.

compressed-tensors (the `quantization_config: {"quant_method": "compressed-tensors", ...}` of llm-compressor) names
each linear layer's scheme in `config_groups` and stores the layer as codes plus scales. What fits slimlm exactly:

- `int8` (weight-only, per output channel, symmetric): weights `{num_bits: 8, type: int, symmetric, strategy:
  channel}`, no activation quantization, format `pack-quantized` (int8 codes packed four to an int32,
  `...weight_packed` [out, in/4] + `weight_scale` [out, 1] + `weight_shape`) — the format vLLM's W8A16 path reads
  (`int-quantized` would also load in transformers, but vLLM reads weight-only int8 only from pack-quantized).
- `int8-dynamic`: the same weights + `input_activations {int8, symmetric, strategy: token, dynamic}`, format
  `int-quantized` (`...weight` int8 [out, in] + `weight_scale`) — compressed-tensors' INT8_W8A8 preset.
- `int8-static`: input_activations `{strategy: tensor, dynamic: false}` with `...input_scale` [1]; the layers
  slimlm's calibration handed to per-token scales (`dynamic_layers`) form a second config group.

Not representable, so refused (check_ct_format says why): `int4` by RTN, GPTQ or QAT — slimlm stores a float zero
point per group, w = (q - 8) * scale + zero (torch's tinygemm layout), while compressed-tensors' int4 has integer
zero points, w = (q - zp) * scale; writing it would change the weights.

The embedding table and the LM head are written dense (`ignore: ["lm_head"]`), as llm-compressor does and as vLLM
requires (its embedding and LM head layers take no compressed-tensors scheme), so tied embeddings stay tied in
transformers. They are stored in fp32 as codes x scales, exactly what slimlm's int8 table stands for: slimlm
re-quantizes them to per-row int8 on load and gets back the very codes and scales. The price is file size: the
fp32 table of SmolLM2-135M is 108 MiB where slimlm's own layout stores 27 MiB of int8 rows. What the dense
head cannot say — that slimlm's head quantizes its input under int8-dynamic/static — goes into the safetensors
metadata (`slimlm_head`), read only by slimlm, so slimlm reloads the model it saved.

What other tools compute from such a folder: transformers' CompressedTensorsHfQuantizer loads the packed codes and,
on the first forward, decompresses them to the float dtype and runs fake quantization (activations quantized and
dequantized in float, per-token scale absmax / 127.5 where slimlm and vLLM use absmax / 127). This module knows
nothing of kernels or serving; it converts tensors and configs.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn as nn

from slimlm.errors import CheckpointError, InputError
from slimlm.model import Transformer
from slimlm.quantize.int8 import DynamicInt8Linear, Int8WeightOnlyLinear, StaticInt8Linear
from slimlm.quantize.schemes import named_quantizable_linears

FORMATS = ("compressed-tensors", "slimlm")
CT_METHOD = "compressed-tensors"
# slimlm layer class -> compressed-tensors storage format of its weights.
CT_FORMAT_OF_LAYER = {
    Int8WeightOnlyLinear: "pack-quantized",
    DynamicInt8Linear: "int-quantized",
    StaticInt8Linear: "int-quantized",
}
CT_SCHEMES = ("int8", "int8-dynamic", "int8-static")
INT4_UNFIT = (
    "slimlm's int4 (rtn, gptq and qat alike) stores a float zero point per group, w = (q - 8) * scale + "
    "zero, and compressed-tensors' int4 only integer zero points, w = (q - zp) * scale: the weights would "
    "change. Use --format slimlm (slimlm reads it; transformers and vLLM refuse it loudly) or an int8 scheme"
)


def default_format(scheme: str) -> str:
    """compressed-tensors for the schemes it represents exactly (see the module docstring), else slimlm's own."""
    return CT_METHOD if scheme in CT_SCHEMES else "slimlm"


def check_ct_format(scheme: str, fmt: str) -> None:
    """Raise ValueError if `fmt` is unknown or cannot hold `scheme` exactly (the message says why and what to do)."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == CT_METHOD and scheme not in CT_SCHEMES:
        reason = INT4_UNFIT if scheme == "int4" else f"compressed-tensors holds only {', '.join(CT_SCHEMES)}"
        raise InputError(f"--format compressed-tensors cannot hold scheme {scheme!r}: {reason}")


# ---------------------------------------------------------------------------------------------------------- writing


def _layer_args(layer: nn.Module) -> dict[str, Any]:
    """The compressed-tensors QuantizationScheme fields (weights, input_activations) of one slimlm int8 layer."""
    from compressed_tensors.quantization import QuantizationArgs

    weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel", dynamic=False)
    if isinstance(layer, Int8WeightOnlyLinear):
        return {"weights": weights, "input_activations": None}
    dynamic = isinstance(layer, DynamicInt8Linear)
    acts = QuantizationArgs(
        num_bits=8, type="int", symmetric=True, dynamic=dynamic, strategy="token" if dynamic else "tensor"
    )
    return {"weights": weights, "input_activations": acts}


def block_layers(model: Transformer) -> dict[str, nn.Module]:
    """HF module name (`model.layers.0.self_attn.q_proj`) -> slimlm layer, for every decoder-block projection."""
    return {f"model.{n}": layer for n, layer in named_quantizable_linears(model).items() if n != "lm_head"}


def ct_quantization_config(model: Transformer) -> dict[str, Any]:
    """config.json's `quantization_config` for a slimlm int8 model, built with compressed-tensors' own classes.

    One config group per layer kind; a single kind targets the class `Linear`, several (int8-static with some
    per-token layers) list their layers by name.
    """
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    if any(
        getattr(b.self_attn, "qkv_proj", None) is not None or getattr(b.mlp, "gate_up_proj", None) is not None
        for b in model.layers
    ):
        raise InputError(
            "the model has fused q/k/v or gate/up projections: save it before fusing (compressed-"
            "tensors stores each projection by its own name; vLLM and slimlm.fuse fuse at load)"
        )
    layers = block_layers(model)
    bad = sorted({type(layer).__name__ for layer in layers.values() if type(layer) not in CT_FORMAT_OF_LAYER})
    if bad:
        raise InputError(f"compressed-tensors holds slimlm's int8 layers only, not {', '.join(bad)}")
    kinds: dict[type, list[str]] = {}
    for name, layer in layers.items():
        kinds.setdefault(type(layer), []).append(name)
    groups = {}
    for i, (cls, names) in enumerate(kinds.items()):
        targets = ["Linear"] if len(kinds) == 1 else names
        groups[f"group_{i}"] = QuantizationScheme(
            targets=targets, format=CT_FORMAT_OF_LAYER[cls], **_layer_args(layers[names[0]])
        )
    formats = {CT_FORMAT_OF_LAYER[cls] for cls in kinds}
    config = QuantizationConfig(
        config_groups=groups,
        quant_method=CT_METHOD,
        ignore=["lm_head"],
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
    )
    return {"version": compressed_tensors.__version__, **config.model_dump(exclude_none=True)}


def compressed_layer(layer: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One int8 layer's tensors, by the compressed-tensors compressor of its format (local names: weight_scale...)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    fmt = CT_FORMAT_OF_LAYER[type(layer)]
    scheme = QuantizationScheme(targets=["Linear"], format=fmt, **_layer_args(layer))
    # The compressor quantizes a dense weight with the given scale; codes * scale / scale rounds back to the
    # codes exactly in fp32 (|error| <= 127 * 2^-23), so the stored codes are slimlm's.
    state = {"weight": layer.dequantize(torch.float32), "weight_scale": layer.scale.float()[:, None]}
    out = BaseCompressor.get_value_from_registry(fmt).compress(state, scheme)
    if isinstance(layer, StaticInt8Linear):
        out["input_scale"] = layer.input_scale.float().reshape(1)
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().to(dtype)
    return out


def head_metadata(model: Transformer) -> dict[str, Any]:
    """What slimlm needs to rebuild its own LM head: its scheme and, if static, its input scale."""
    head = model.lm_head
    meta: dict[str, Any] = {"scheme": head.scheme}
    if isinstance(head, StaticInt8Linear):
        meta["input_scale"] = float(head.input_scale)
    return meta


def parse_ct_config(quant: dict[str, Any], where: str):
    """compressed-tensors' QuantizationConfig of a config.json dict; CheckpointError naming the file if invalid."""
    from compressed_tensors.quantization import QuantizationConfig

    fields = {k: v for k, v in quant.items() if k not in ("version", "sparsity_config", "transform_config")}
    if quant.get("sparsity_config") or quant.get("transform_config"):
        raise CheckpointError(
            f"{where}: compressed-tensors sparsity / transforms are not supported by slimlm; "
            "load the dense model and quantize it with slimlm"
        )
    try:
        return QuantizationConfig.model_validate(fields)
    except Exception as e:  # pydantic's ValidationError: a many-line message, cut to its first line
        raise CheckpointError(
            f"{where}: invalid compressed-tensors quantization_config ({str(e).splitlines()[0]})"
        ) from None


def scheme_of(config, name: str):
    """The QuantizationScheme that applies to module `name` (None if ignored or untargeted), matched as
    compressed-tensors does: exact name, then regex, then class name (every block projection is a Linear)."""
    from compressed_tensors.utils.match import is_match, match_targets

    probe = nn.Linear(1, 1, device="meta")
    if is_match(name, probe, config.ignore or []):
        return None
    best = None
    for scheme in config.config_groups.values():
        hits = match_targets(name, probe, scheme.targets)
        rank = min(((0 if t == name else 1 if t.startswith("re:") else 2) for t in hits), default=None)
        if rank is not None and (best is None or rank < best[0]):
            best = (rank, scheme)
    return None if best is None else best[1]


def _layer_class(scheme, name: str, where: str) -> type:
    """slimlm's int8 layer class for a compressed-tensors scheme; CheckpointError for schemes with no slimlm kernel."""
    w, a = scheme.weights, scheme.input_activations
    ok_w = (
        w is not None
        and w.type == "int"
        and w.num_bits == 8
        and w.symmetric
        and w.strategy == "channel"
        and not w.dynamic
        and scheme.output_activations is None
    )
    if ok_w and a is None:
        return Int8WeightOnlyLinear
    if ok_w and a.type == "int" and a.num_bits == 8 and a.symmetric:
        if a.strategy == "token" and a.dynamic is True:
            return DynamicInt8Linear
        if a.strategy == "tensor" and a.dynamic is False:
            return StaticInt8Linear
    got = (
        f"weights {w.model_dump(exclude_none=True) if w else None}, input_activations "
        f"{a.model_dump(exclude_none=True) if a else None}"
    )
    raise CheckpointError(
        f"{where}: layer {name} has a compressed-tensors scheme slimlm has no kernel for ({got}); "
        "slimlm reads int8 symmetric per-channel weights, with no, per-token dynamic or per-tensor "
        "static int8 activations. Load the dense model and quantize it with slimlm"
    )


def _codes(tensors: dict[str, torch.Tensor], fmt: str, name: str, where: str) -> torch.Tensor:
    """int8 codes [out, in] of one layer from its stored tensors (pack-quantized or int/naive-quantized)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    if fmt == "pack-quantized" and f"{name}.weight_packed" in tensors:
        shape = torch.Size(tensors[f"{name}.weight_shape"].tolist())
        return unpack_from_int32(tensors[f"{name}.weight_packed"], 8, shape)
    if (
        fmt in ("int-quantized", "naive-quantized")
        and tensors.get(f"{name}.weight") is not None
        and tensors[f"{name}.weight"].dtype == torch.int8
    ):
        return tensors[f"{name}.weight"]
    raise CheckpointError(
        f"{where}: layer {name} ({fmt}) lacks its int8 weight tensors "
        f"({name}.weight_packed or an int8 {name}.weight); the folder is incomplete"
    )


def build_layer(
    tensors: dict[str, torch.Tensor], scheme, fmt: str, name: str, where: str, dtype: torch.dtype
) -> nn.Module:
    """slimlm's int8 layer for module `name` from its stored tensors (fmt: the scheme's or the folder's format)."""
    cls = _layer_class(scheme, name, where)
    codes = _codes(tensors, fmt, name, where)
    scale = tensors.get(f"{name}.weight_scale")
    if scale is None or scale.numel() != codes.shape[0]:
        raise CheckpointError(
            f"{where}: layer {name} needs a weight_scale of {codes.shape[0]} values (one per output channel)"
        )
    bias = tensors.get(f"{name}.bias")
    # Fresh aligned copies (see load_quantized: the int8 CPU kernels use aligned vector loads).
    args = (codes.to(torch.int8).clone(), scale.float().reshape(-1).clone(), None if bias is None else bias.to(dtype))
    if cls is StaticInt8Linear:
        if f"{name}.input_scale" not in tensors:
            raise CheckpointError(f"{where}: static layer {name} has no input_scale")
        return cls(*args, input_scale=tensors[f"{name}.input_scale"].float().reshape(()))
    return cls(*args)


def model_scheme(layers: dict[str, nn.Module], where: str) -> tuple[str, list[str]]:
    """slimlm's scheme name for the loaded layers and the int8-static model's per-token (dynamic) layers."""
    kinds = {type(layer) for layer in layers.values()}
    if kinds == {Int8WeightOnlyLinear}:
        return "int8", []
    if kinds == {DynamicInt8Linear}:
        return "int8-dynamic", []
    if kinds <= {StaticInt8Linear, DynamicInt8Linear}:
        return "int8-static", sorted(
            n.removeprefix("model.") for n, layer in layers.items() if isinstance(layer, DynamicInt8Linear)
        )
    raise CheckpointError(
        f"{where}: mixes weight-only and activation-quantized int8 layers; a slimlm model runs one scheme"
    )


def saved_head(meta: dict[str, str], where: str) -> dict[str, Any]:
    """slimlm's LM head scheme from the safetensors metadata; a weight-only int8 head for others' folders (closest
    to the dense head that transformers and vLLM run)."""
    head = json.loads(meta.get("slimlm_head", '{"scheme": "int8"}'))
    if head.get("scheme") not in CT_SCHEMES or (head["scheme"] == "int8-static") != ("input_scale" in head):
        raise CheckpointError(
            f"{where}: the safetensors metadata slimlm_head is invalid ({head}); save the folder again"
        )
    return head
