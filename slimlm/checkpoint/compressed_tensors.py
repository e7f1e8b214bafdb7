"""compressed-tensors folders on disk: write slimlm's int8 models in the layout transformers and vLLM load as
quantized, and read such folders (slimlm's own or llm-compressor's) back. What the layout holds and how each
scheme maps onto slimlm's int8 layers is in quantize/compressed_tensors.py, which converts layers and configs;
this module reads and writes the files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from slimlm.checkpoint.atomic import atomic_folder
from slimlm.checkpoint.hf import (
    IGNORED_HF_KEYS,
    hf_to_slimlm_name,
    load_safetensors,
    read_hf_config,
    safetensors_files,
    safetensors_metadata,
    slimlm_to_hf_name,
    write_model_files,
)
from slimlm.config import ModelConfig
from slimlm.errors import CheckpointError
from slimlm.model import Transformer, rope_inv_freq
from slimlm.quantize.compressed_tensors import (
    CT_METHOD,
    block_layers,
    build_layer,
    check_ct_format,
    compressed_layer,
    ct_quantization_config,
    head_metadata,
    model_scheme,
    parse_ct_config,
    saved_head,
    scheme_of,
)
from slimlm.quantize.schemes import linears_of_block, quantize_embeddings_


def ct_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """HF-named tensors of a compressed-tensors folder: compressed block linears, dense norms, embedding and head."""
    dtype = model.embed_tokens.dtype
    state = {}
    for name, layer in block_layers(model).items():
        state.update({f"{name}.{k}": v for k, v in compressed_layer(layer, dtype).items()})
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
    check_ct_format(model.quantization["scheme"], CT_METHOD)
    config = ct_quantization_config(model)
    state = ct_state_dict(model)
    metadata = {
        "format": "pt",
        "slimlm_quantization": json.dumps(model.quantization),
        "slimlm_head": json.dumps(head_metadata(model)),
    }
    with atomic_folder(folder) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata=metadata)
        torch_dtype = str(model.embed_tokens.dtype).removeprefix("torch.")
        write_model_files(tmp, model.config, tokenizer, torch_dtype=torch_dtype, quantization_config=config)
    return Path(folder)


def _read_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, meta = {}, {}
    for f in safetensors_files(folder):
        tensors.update(load_safetensors(f))
        meta.update(safetensors_metadata(f))
    return tensors, meta


def load_compressed_tensors(
    folder: str | Path,
    quant: dict[str, Any],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: ModelConfig | None = None,
) -> Transformer:
    """A compressed-tensors int8 folder as a slimlm quantized model (int8 layers; embedding and head per-row int8)."""
    folder = Path(folder)
    where = str(folder / "config.json")
    ct = parse_ct_config(quant, where)
    config = config or read_hf_config(folder)
    tensors, meta = _read_tensors(folder)
    with torch.device("meta"):
        model = Transformer(config)
    layers = {}
    for i, block in enumerate(model.layers):
        for parent, attr, _ in linears_of_block(block):
            part = "self_attn" if parent is block.self_attn else "mlp"
            name = f"model.layers.{i}.{part}.{attr}"
            scheme = scheme_of(ct, name)
            if scheme is None:
                raise CheckpointError(
                    f"{where}: layer {name} is not quantized; slimlm reads folders whose every "
                    "decoder projection is int8"
                )
            layers[name] = build_layer(tensors, scheme, scheme.format or ct.format, name, where, dtype)
            setattr(parent, attr, layers[name])
    scheme_name, dynamic = model_scheme(layers, where)
    _load_dense_(model, tensors, where, dtype)
    head = saved_head(meta, where)
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


def _load_dense_(model: Transformer, tensors: dict[str, torch.Tensor], where: str, dtype: torch.dtype) -> None:
    """Norms, embedding and (untied) head from the dense tensors; anything else left over is an error."""
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
        raise CheckpointError(
            f"{where}: the folder's dense tensors do not fit this config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    model.load_state_dict(dense, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
