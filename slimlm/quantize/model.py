"""Quantize a whole Llama model in place, and save / reload it packed (no re-quantization on load).

Schemes (`SCHEMES`): `int8` (weight-only, per channel), `int8-dynamic` (weights per channel, activations per token
at run time), `int8-static` (weights per channel, one calibrated activation scale per layer: quantize/static.py;
layers calibrated as unfit for one scale run dynamic and are listed in `dynamic_layers`),
`int4` (weight-only, grouped RTN, group 32/64/128). Every linear layer of the decoder blocks is
quantized. The embedding table becomes per-row int8 (`Int8Embedding`) and the LM head int8 — sharing the same codes
when the embeddings are tied, as in SmolLM2 — under every scheme: the table is 20 % of SmolLM2-135M and an int4
head costs more quality than it saves (llama.cpp keeps it at 6+ bits too). The head runs as the scheme's int8 layer
(dynamic under `int8-dynamic`, static under `int8-static`, weight-only otherwise). Norms stay in the model dtype.

A quantized model saves as an HF-style folder whose config.json carries
`"quantization_config": {"quant_method": "slimlm", "scheme": ..., "group_size": ..., "model_type": "llama"}` and
whose safetensors hold the packed buffers (`...q_proj.qweight`, `...q_proj.scale`, ...). slimlm.load() reads it back
as is. Other tools cannot load this layout (export/ writes formats they can), so the folder is written to make them
fail loudly rather than load random weights: its top-level `model_type` is `QUANTIZED_MODEL_TYPE`, which
transformers' AutoConfig / AutoModelForCausalLM / pipeline (and vLLM, which reads configs through AutoConfig) refuse
with an error that quotes it, and llama.cpp's convert_hf_to_gguf.py refuses the unknown quant_method 'slimlm'.
(An unknown quant_method alone does not do it: transformers only warns, skips it and re-initialises every weight.)
Folders written before this kept `model_type` at the top level; `hf_config_of_quantized` reads both.
The int8 schemes can instead be saved as compressed-tensors (`save_quantized(..., format="compressed-tensors")`,
quantize/compressed_tensors.py), which transformers and vLLM load as quantized.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from slimlm.model import Transformer
from slimlm.quantize.int4 import GROUP_SIZES, Int4WeightOnlyLinear
from slimlm.quantize.int8 import (DynamicInt8Linear, Int8Embedding, Int8WeightOnlyLinear, StaticInt8Linear,
                                  quantize_int8_weight)

SCHEMES = ("int8", "int8-dynamic", "int8-static", "int4")
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The config.json model_type of a packed folder: transformers prints it in its "does not recognize this architecture"
# error, so it says what the folder is and what to do instead.
QUANTIZED_MODEL_TYPE = ("slimlm-quantized: packed int8/int4 weights that only slimlm reads. Load this folder with "
                        "slimlm.load() or `slimlm generate --model`; for transformers, llama.cpp or vLLM use the "
                        "unquantized model it was made from (see `slimlm quantize --help`)")


def hf_config_of_quantized(hf: dict) -> dict:
    """The config.json dict of a packed folder with its real model_type back (old folders pass through)."""
    quant = hf.get("quantization_config")
    if hf.get("model_type") == QUANTIZED_MODEL_TYPE and isinstance(quant, dict) and "model_type" in quant:
        return {**hf, "model_type": quant["model_type"]}
    return hf


def check_scheme(scheme: str, group_size: int) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {GROUP_SIZES}, got {group_size}")


def describe_quantization(quantization: dict | None) -> str | None:
    """'int8', 'int8-dynamic' or 'int4 g64' for a model's `quantization` attribute (None when not quantized)."""
    if not quantization:
        return None
    scheme = quantization["scheme"]
    return f"{scheme} g{quantization['group_size']}" if scheme == "int4" else scheme


def linears_of_block(block: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent module, attribute name, layer) for every projection of one decoder block."""
    return [(parent, attr, getattr(parent, attr)) for parent in (block.self_attn, block.mlp)
            for attr in BLOCK_LINEARS if getattr(parent, attr, None) is not None]


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
def quantize_model_(model: Transformer, scheme: str, group_size: int = 64,
                    input_scales: dict[str, float] | None = None) -> Transformer:
    """Quantize `model` in place under `scheme` (see the module docstring); returns it.

    int8-static needs `input_scales` {linear name: scale} from quantize.static.calibrate_input_scales.
    """
    from slimlm.quantize.static import named_quantizable_linears

    check_scheme(scheme, group_size)
    if any(getattr(b.self_attn, "qkv_proj", None) is not None or getattr(b.mlp, "gate_up_proj", None) is not None
           for b in model.layers):
        raise ValueError("the model has fused q/k/v or gate/up projections: quantize first, then fuse "
                         "(slimlm.fuse fuses quantized layers exactly)")
    if getattr(model, "quantization", None):
        raise ValueError(f"the model is already quantized ({model.quantization['scheme']})")
    names = {id(layer): name for name, layer in named_quantizable_linears(model).items()}
    if scheme == "int8-static":
        missing = [n for n in names.values() if n not in (input_scales or {})]
        if missing:
            raise ValueError(f"int8-static needs a calibrated input scale for every linear layer ({missing[0]} has "
                             "none): run quantize.static.calibrate_input_scales on calibration text first")
    scales = input_scales or {}
    dynamic = sorted(n for n, s in scales.items() if s is None) if scheme == "int8-static" else []

    def layer_scheme(layer: nn.Module) -> tuple[str, float]:  # int8-static layers without a scale run dynamic
        s = scales.get(names.get(id(layer)), 1.0)
        return ("int8-dynamic", 1.0) if s is None else (scheme, s)

    for parent, attr, layer in [t for block in model.layers for t in linears_of_block(block)]:
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"cannot quantize {type(layer).__name__} layers: merge or remove adapters first")
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


def quantized_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """stored_tensors as contiguous CPU copies, ready for safetensors."""
    return {k: v.detach().contiguous().cpu() for k, v in stored_tensors(model).items()}


def save_quantized(model: Transformer, folder: str | Path, tokenizer=None, format: str = "slimlm") -> Path:
    """Write a quantized model as a folder (config.json with quantization_config, model.safetensors), atomically.

    format "slimlm": the packed layout above (every scheme); "compressed-tensors": the layout transformers and vLLM
    load as quantized (int8 schemes only: quantize/compressed_tensors.py; `default_format` picks per scheme).
    """
    from safetensors.torch import save_file

    from slimlm.checkpoint.atomic import atomic_folder
    from slimlm.checkpoint.hf import write_model_files
    from slimlm.quantize.compressed_tensors import CT_METHOD, check_ct_format, save_compressed_tensors

    if not getattr(model, "quantization", None):
        raise ValueError("the model is not quantized: call quantize_model_ first")
    check_ct_format(model.quantization["scheme"], format)
    if format == CT_METHOD:
        return save_compressed_tensors(model, folder, tokenizer)
    with atomic_folder(folder) as tmp:
        save_file(quantized_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        quant = {**model.quantization, "model_type": model.config.model_type}
        write_model_files(tmp, model.config, tokenizer, model_type=QUANTIZED_MODEL_TYPE, quantization_config=quant)
    return Path(folder)


def load_quantized(folder: str | Path, quantization: dict, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> Transformer:
    """Rebuild a model saved by save_quantized: the layers are created empty and filled with the stored codes."""
    from slimlm.checkpoint.hf import load_safetensors, read_hf_config, safetensors_files
    from slimlm.checkpoint.materialize import CheckpointError
    from slimlm.model import rope_inv_freq
    from slimlm.quantize.static import named_quantizable_linears

    folder = Path(folder)
    try:
        scheme, group = quantization.get("scheme"), int(quantization.get("group_size", 64))
        check_scheme(scheme, group)
    except (TypeError, ValueError) as e:  # TypeError: a group_size that is not a number
        raise CheckpointError(f"{folder}/config.json: quantization_config: {e}") from None
    config = read_hf_config(folder)
    with torch.device("meta"):
        model = Transformer(config)
        # int8-static: which layers run dynamic comes from the config; the static scales themselves are loaded
        # from the file below, so any value builds the right layer here.
        dynamic = set(quantization.get("dynamic_layers", []))
        layer_kinds = {name: None if name in dynamic else 1.0 for name in named_quantizable_linears(model)}
        model = quantize_model_(model, scheme, group, layer_kinds)
    expected = stored_tensors(model)
    state = {}
    for f in safetensors_files(folder):
        state.update(load_safetensors(f, device=str(device)))  # header checked first: a corrupt file is refused
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{folder}: a {scheme} checkpoint of this config needs other tensors "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape) or t.dtype != expected[name].dtype and \
                not t.is_floating_point():
            raise CheckpointError(f"{folder}: tensor {name!r} is {tuple(t.shape)} {t.dtype}, expected "
                                  f"{tuple(expected[name].shape)} {expected[name].dtype}")
        if t.is_floating_point() and name.split(".")[-1] not in ("scale", "zero", "input_scale"):
            state[name] = t.to(dtype)  # norms and biases follow the requested dtype; scales keep theirs
        else:
            # A fresh, aligned copy: tensors read from a file can start at any byte offset, and the low-bit CPU
            # kernels use aligned vector loads (a misaligned int8 weight crashed torch._weight_int8pack_mm).
            state[name] = t.clone()
    model.load_state_dict(state, strict=False, assign=True)
    model.embed_tokens.dtype = dtype
    tie_quantized_head(model)
    model.inv_freq = rope_inv_freq(config).to(device)
    return model.eval()


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, tied tensors once (what the model holds in memory)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
