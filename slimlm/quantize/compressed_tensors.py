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
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimlm.model import Transformer
from slimlm.quantize.int8 import DynamicInt8Linear, Int8WeightOnlyLinear, StaticInt8Linear

FORMATS = ("compressed-tensors", "slimlm")
CT_METHOD = "compressed-tensors"
# slimlm layer class -> compressed-tensors storage format of its weights.
CT_FORMAT_OF_LAYER = {Int8WeightOnlyLinear: "pack-quantized", DynamicInt8Linear: "int-quantized",
                      StaticInt8Linear: "int-quantized"}
CT_SCHEMES = ("int8", "int8-dynamic", "int8-static")
INT4_UNFIT = ("slimlm's int4 (rtn, gptq and qat alike) stores a float zero point per group, w = (q - 8) * scale + "
              "zero, and compressed-tensors' int4 only integer zero points, w = (q - zp) * scale: the weights would "
              "change. Use --format slimlm (slimlm reads it; transformers and vLLM refuse it loudly) or an int8 scheme")


def default_format(scheme: str) -> str:
    """compressed-tensors for the schemes it represents exactly (see the module docstring), else slimlm's own."""
    return CT_METHOD if scheme in CT_SCHEMES else "slimlm"


def check_ct_format(scheme: str, fmt: str) -> None:
    """Raise ValueError if `fmt` is unknown or cannot hold `scheme` exactly (the message says why and what to do)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == CT_METHOD and scheme not in CT_SCHEMES:
        reason = INT4_UNFIT if scheme == "int4" else f"compressed-tensors holds only {', '.join(CT_SCHEMES)}"
        raise ValueError(f"--format compressed-tensors cannot hold scheme {scheme!r}: {reason}")


# ---------------------------------------------------------------------------------------------------------- writing

def _layer_args(layer: nn.Module) -> dict[str, Any]:
    """The compressed-tensors QuantizationScheme fields (weights, input_activations) of one slimlm int8 layer."""
    from compressed_tensors.quantization import QuantizationArgs

    weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel", dynamic=False)
    if isinstance(layer, Int8WeightOnlyLinear):
        return {"weights": weights, "input_activations": None}
    dynamic = isinstance(layer, DynamicInt8Linear)
    acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, dynamic=dynamic,
                            strategy="token" if dynamic else "tensor")
    return {"weights": weights, "input_activations": acts}


def _block_layers(model: Transformer) -> dict[str, nn.Module]:
    """HF module name (`model.layers.0.self_attn.q_proj`) -> slimlm layer, for every decoder-block projection."""
    from slimlm.quantize.static import named_quantizable_linears

    return {f"model.{n}": layer for n, layer in named_quantizable_linears(model).items() if n != "lm_head"}


def ct_quantization_config(model: Transformer) -> dict[str, Any]:
    """config.json's `quantization_config` for a slimlm int8 model, built with compressed-tensors' own classes.

    One config group per layer kind; a single kind targets the class `Linear`, several (int8-static with some
    per-token layers) list their layers by name.
    """
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    if any(getattr(b.self_attn, "qkv_proj", None) is not None or getattr(b.mlp, "gate_up_proj", None) is not None
           for b in model.layers):
        raise ValueError("the model has fused q/k/v or gate/up projections: save it before fusing (compressed-"
                         "tensors stores each projection by its own name; vLLM and slimlm.fuse fuse at load)")
    layers = _block_layers(model)
    bad = sorted({type(layer).__name__ for layer in layers.values() if type(layer) not in CT_FORMAT_OF_LAYER})
    if bad:
        raise ValueError(f"compressed-tensors holds slimlm's int8 layers only, not {', '.join(bad)}")
    kinds: dict[type, list[str]] = {}
    for name, layer in layers.items():
        kinds.setdefault(type(layer), []).append(name)
    groups = {}
    for i, (cls, names) in enumerate(kinds.items()):
        targets = ["Linear"] if len(kinds) == 1 else names
        groups[f"group_{i}"] = QuantizationScheme(targets=targets, format=CT_FORMAT_OF_LAYER[cls],
                                                  **_layer_args(layers[names[0]]))
    formats = {CT_FORMAT_OF_LAYER[cls] for cls in kinds}
    config = QuantizationConfig(config_groups=groups, quant_method=CT_METHOD, ignore=["lm_head"],
                                format=formats.pop() if len(formats) == 1 else "mixed-precision",
                                quantization_status="compressed")
    return {"version": compressed_tensors.__version__, **config.model_dump(exclude_none=True)}


def _compressed_layer(layer: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
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


def _head_metadata(model: Transformer) -> dict[str, Any]:
    """What slimlm needs to rebuild its own LM head: its scheme and, if static, its input scale."""
    head = model.lm_head
    meta: dict[str, Any] = {"scheme": head.scheme}
    if isinstance(head, StaticInt8Linear):
        meta["input_scale"] = float(head.input_scale)
    return meta


def ct_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """HF-named tensors of a compressed-tensors folder: compressed block linears, dense norms, embedding and head."""
    from slimlm.checkpoint.hf import slimlm_to_hf_name

    dtype = model.embed_tokens.dtype
    state = {}
    for name, layer in _block_layers(model).items():
        state.update({f"{name}.{k}": v for k, v in _compressed_layer(layer, dtype).items()})
    # Embedding and untied head dense in fp32, codes x scales exactly (whatever the model dtype): re-quantizing
    # that table per row gives back the same codes and scales, so slimlm reloads the model bit for bit (a bf16
    # table would not: measured 0.6 % logit change on a tiny bf16 model). [vocab, dim]
    emb = model.embed_tokens
    state["model.embed_tokens.weight"] = emb.qweight.float() * emb.scale.float()[:, None]
    if not model.config.tie_word_embeddings:
        state["lm_head.weight"] = model.lm_head.dequantize(torch.float32)
        if model.lm_head.bias is not None:
            state["lm_head.bias"] = model.lm_head.bias.detach().to(dtype)
    for name, t in model.state_dict().items():
        if "norm" in name:
            state[slimlm_to_hf_name(name)] = t.to(dtype)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_compressed_tensors(model: Transformer, folder: str | Path, tokenizer: Any = None) -> Path:
    """Write a slimlm int8 model as a compressed-tensors folder (config.json + model.safetensors), atomically."""
    from safetensors.torch import save_file

    from slimlm.checkpoint.atomic import atomic_folder
    from slimlm.checkpoint.hf import write_model_files

    check_ct_format(model.quantization["scheme"], CT_METHOD)
    config = ct_quantization_config(model)
    state = ct_state_dict(model)
    metadata = {"format": "pt", "slimlm_quantization": json.dumps(model.quantization),
                "slimlm_head": json.dumps(_head_metadata(model))}
    with atomic_folder(folder) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata=metadata)
        torch_dtype = str(model.embed_tokens.dtype).removeprefix("torch.")
        write_model_files(tmp, model.config, tokenizer, torch_dtype=torch_dtype, quantization_config=config)
    return Path(folder)


# ---------------------------------------------------------------------------------------------------------- reading

def parse_ct_config(quant: dict[str, Any], where: str):
    """compressed-tensors' QuantizationConfig of a config.json dict; CheckpointError naming the file if invalid."""
    from compressed_tensors.quantization import QuantizationConfig

    from slimlm.checkpoint.materialize import CheckpointError

    fields = {k: v for k, v in quant.items() if k not in ("version", "sparsity_config", "transform_config")}
    if quant.get("sparsity_config") or quant.get("transform_config"):
        raise CheckpointError(f"{where}: compressed-tensors sparsity / transforms are not supported by slimlm; "
                              "load the dense model and quantize it with slimlm")
    try:
        return QuantizationConfig.model_validate(fields)
    except Exception as e:  # pydantic's ValidationError: a many-line message, cut to its first line
        raise CheckpointError(f"{where}: invalid compressed-tensors quantization_config "
                              f"({str(e).splitlines()[0]})") from None


def _scheme_of(config, name: str):
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
    from slimlm.checkpoint.materialize import CheckpointError

    w, a = scheme.weights, scheme.input_activations
    ok_w = (w is not None and w.type == "int" and w.num_bits == 8 and w.symmetric and w.strategy == "channel"
            and not w.dynamic and scheme.output_activations is None)
    if ok_w and a is None:
        return Int8WeightOnlyLinear
    if ok_w and a.type == "int" and a.num_bits == 8 and a.symmetric:
        if a.strategy == "token" and a.dynamic is True:
            return DynamicInt8Linear
        if a.strategy == "tensor" and a.dynamic is False:
            return StaticInt8Linear
    got = f"weights {w.model_dump(exclude_none=True) if w else None}, input_activations " \
          f"{a.model_dump(exclude_none=True) if a else None}"
    raise CheckpointError(f"{where}: layer {name} has a compressed-tensors scheme slimlm has no kernel for ({got}); "
                          "slimlm reads int8 symmetric per-channel weights, with no, per-token dynamic or per-tensor "
                          "static int8 activations. Load the dense model and quantize it with slimlm")


def _codes(tensors: dict[str, torch.Tensor], fmt: str, name: str, where: str) -> torch.Tensor:
    """int8 codes [out, in] of one layer from its stored tensors (pack-quantized or int/naive-quantized)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from slimlm.checkpoint.materialize import CheckpointError

    if fmt == "pack-quantized" and f"{name}.weight_packed" in tensors:
        shape = torch.Size(tensors[f"{name}.weight_shape"].tolist())
        return unpack_from_int32(tensors[f"{name}.weight_packed"], 8, shape)
    if fmt in ("int-quantized", "naive-quantized") and tensors.get(f"{name}.weight") is not None \
            and tensors[f"{name}.weight"].dtype == torch.int8:
        return tensors[f"{name}.weight"]
    raise CheckpointError(f"{where}: layer {name} ({fmt}) lacks its int8 weight tensors "
                          f"({name}.weight_packed or an int8 {name}.weight); the folder is incomplete")


def _build_layer(tensors: dict[str, torch.Tensor], scheme, fmt: str, name: str, where: str,
                 dtype: torch.dtype) -> nn.Module:
    """slimlm's int8 layer for module `name` from its stored tensors (fmt: the scheme's or the folder's format)."""
    from slimlm.checkpoint.materialize import CheckpointError

    cls = _layer_class(scheme, name, where)
    codes = _codes(tensors, fmt, name, where)
    scale = tensors.get(f"{name}.weight_scale")
    if scale is None or scale.numel() != codes.shape[0]:
        raise CheckpointError(f"{where}: layer {name} needs a weight_scale of {codes.shape[0]} values (one per "
                              "output channel)")
    bias = tensors.get(f"{name}.bias")
    # Fresh aligned copies (see load_quantized: the int8 CPU kernels use aligned vector loads).
    args = (codes.to(torch.int8).clone(), scale.float().reshape(-1).clone(),
            None if bias is None else bias.to(dtype))
    if cls is StaticInt8Linear:
        if f"{name}.input_scale" not in tensors:
            raise CheckpointError(f"{where}: static layer {name} has no input_scale")
        return cls(*args, input_scale=tensors[f"{name}.input_scale"].float().reshape(()))
    return cls(*args)


def _model_scheme(layers: dict[str, nn.Module], where: str) -> tuple[str, list[str]]:
    """slimlm's scheme name for the loaded layers and the int8-static model's per-token (dynamic) layers."""
    from slimlm.checkpoint.materialize import CheckpointError

    kinds = {type(layer) for layer in layers.values()}
    if kinds == {Int8WeightOnlyLinear}:
        return "int8", []
    if kinds == {DynamicInt8Linear}:
        return "int8-dynamic", []
    if kinds <= {StaticInt8Linear, DynamicInt8Linear}:
        return "int8-static", sorted(n.removeprefix("model.") for n, layer in layers.items()
                                     if isinstance(layer, DynamicInt8Linear))
    raise CheckpointError(f"{where}: mixes weight-only and activation-quantized int8 layers; a slimlm model runs "
                          "one scheme")


def _read_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from slimlm.checkpoint.hf import load_safetensors, safetensors_files, safetensors_metadata

    tensors, meta = {}, {}
    for f in safetensors_files(folder):
        tensors.update(load_safetensors(f))
        meta.update(safetensors_metadata(f))
    return tensors, meta


def load_compressed_tensors(folder: str | Path, quant: dict[str, Any], dtype: torch.dtype = torch.float32,
                            device: torch.device | str = "cpu") -> Transformer:
    """A compressed-tensors int8 folder as a slimlm quantized model (int8 layers; embedding and head per-row int8)."""
    from slimlm.checkpoint.hf import read_hf_config
    from slimlm.checkpoint.materialize import CheckpointError
    from slimlm.model import rope_inv_freq
    from slimlm.quantize.model import linears_of_block, quantize_embeddings_

    folder = Path(folder)
    where = str(folder / "config.json")
    ct = parse_ct_config(quant, where)
    config = read_hf_config(folder)
    tensors, meta = _read_tensors(folder)
    with torch.device("meta"):
        model = Transformer(config)
    layers = {}
    for i, block in enumerate(model.layers):
        for parent, attr, _ in linears_of_block(block):
            part = "self_attn" if parent is block.self_attn else "mlp"
            name = f"model.layers.{i}.{part}.{attr}"
            scheme = _scheme_of(ct, name)
            if scheme is None:
                raise CheckpointError(f"{where}: layer {name} is not quantized; slimlm reads folders whose every "
                                      "decoder projection is int8")
            layers[name] = _build_layer(tensors, scheme, scheme.format or ct.format, name, where, dtype)
            setattr(parent, attr, layers[name])
    scheme_name, dynamic = _model_scheme(layers, where)
    _load_dense_(model, tensors, where, dtype)
    head = _saved_head(meta, where)
    quantize_embeddings_(model, head["scheme"], head.get("input_scale", 1.0))
    model.embed_tokens.dtype = dtype
    model.quantization = {"quant_method": "slimlm", "scheme": scheme_name, "group_size": 64}
    if dynamic:
        model.quantization["dynamic_layers"] = dynamic
    saved = json.loads(meta.get("slimlm_quantization", "{}"))  # slimlm's own record (method, calibration...)
    if saved.get("scheme") == scheme_name and saved.get("dynamic_layers", []) == dynamic:
        model.quantization = saved
    model.inv_freq = rope_inv_freq(config)
    return model.to(device).eval()


def _saved_head(meta: dict[str, str], where: str) -> dict[str, Any]:
    """slimlm's LM head scheme from the safetensors metadata; a weight-only int8 head for others' folders (closest
    to the dense head that transformers and vLLM run)."""
    from slimlm.checkpoint.materialize import CheckpointError

    head = json.loads(meta.get("slimlm_head", '{"scheme": "int8"}'))
    if head.get("scheme") not in CT_SCHEMES or (head["scheme"] == "int8-static") != ("input_scale" in head):
        raise CheckpointError(f"{where}: the safetensors metadata slimlm_head is invalid ({head}); "
                              "save the folder again")
    return head


def _load_dense_(model: Transformer, tensors: dict[str, torch.Tensor], where: str, dtype: torch.dtype) -> None:
    """Norms, embedding and (untied) head from the dense tensors; anything else left over is an error."""
    from slimlm.checkpoint.hf import IGNORED_HF_KEYS, hf_to_slimlm_name
    from slimlm.checkpoint.materialize import CheckpointError

    quantized = {n.rsplit(".", 1)[0] for n in tensors if n.rsplit(".", 1)[-1].startswith(("weight_", "input_"))}
    dense = {}
    for name, t in tensors.items():
        module = name.rsplit(".", 1)[0]
        if module in quantized or IGNORED_HF_KEYS.match(name):
            continue
        ours = hf_to_slimlm_name(name)
        # The embedding and head are re-quantized from fp32 (the stored codes x scales give back the same codes and
        # scales); everything else follows the requested dtype.
        dense[ours] = t.float() if ours in ("embed_tokens.weight", "lm_head.weight") else t.to(dtype)
    if model.config.tie_word_embeddings:
        dense.pop("lm_head.weight", None)  # some writers store the tied head too; it is the embedding
    expected = {k for k in model.state_dict() if "norm" in k or k.startswith(("embed_tokens.", "lm_head."))}
    if model.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(dense)), sorted(set(dense) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{where}: the folder's dense tensors do not fit this config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    model.load_state_dict(dense, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
