"""slimlm's packed quantized folders: a quantized model saved and reloaded as is (no re-quantization on load).

The folder's config.json carries `"quantization_config": {"quant_method": "slimlm", "scheme": ..., "group_size":
..., "model_type": "llama"}` and its safetensors hold the packed buffers (`...q_proj.qweight`, `...q_proj.scale`,
...). slimlm.load() reads it back as is. Other tools cannot load this layout (export/ writes formats they can), so
the folder is written to make them fail loudly rather than load random weights: its top-level `model_type` is
`QUANTIZED_MODEL_TYPE` (checkpoint/hf.py), which transformers' AutoConfig / AutoModelForCausalLM / pipeline (and
vLLM, which reads configs through AutoConfig) refuse with an error that quotes it, and llama.cpp's
convert_hf_to_gguf.py refuses the unknown quant_method 'slimlm'. (An unknown quant_method alone does not do it:
transformers only warns, skips it and re-initialises every weight.) The int8 schemes can instead be saved as
compressed-tensors (`save_quantized(..., format="compressed-tensors")`, checkpoint/compressed_tensors.py), which
transformers and vLLM load as quantized.

Loading follows gpt-fast's order: build the model on the meta device, convert its layers to the scheme
(quantize/schemes.py), load the state dict once.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from slimlm.checkpoint.atomic import atomic_folder
from slimlm.checkpoint.compressed_tensors import save_compressed_tensors
from slimlm.checkpoint.hf import (
    QUANTIZED_MODEL_TYPE,
    load_safetensors,
    read_hf_config,
    safetensors_files,
    write_model_files,
)
from slimlm.config import ModelConfig
from slimlm.errors import CheckpointError, InputError
from slimlm.model import Transformer, rope_inv_freq
from slimlm.quantize.compressed_tensors import CT_METHOD, check_ct_format
from slimlm.quantize.schemes import (
    check_scheme,
    named_quantizable_linears,
    quantize_model_,
    stored_tensors,
    tie_quantized_head,
)


def quantized_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """stored_tensors as contiguous CPU copies, ready for safetensors."""
    return {k: v.detach().contiguous().cpu() for k, v in stored_tensors(model).items()}


def save_quantized(model: Transformer, folder: str | Path, tokenizer=None, format: str = "slimlm") -> Path:
    """Write a quantized model as a folder (config.json with quantization_config, model.safetensors), atomically.

    format "slimlm": the packed layout above (every scheme); "compressed-tensors": the layout transformers and vLLM
    load as quantized (int8 schemes only: quantize/compressed_tensors.py; `default_format` picks per scheme).
    """
    if not model.quantization:
        raise InputError("the model is not quantized: call quantize_model_ first")
    check_ct_format(model.quantization["scheme"], format)
    if format == CT_METHOD:
        return save_compressed_tensors(model, folder, tokenizer)
    with atomic_folder(folder) as tmp:
        save_file(quantized_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        quant = {**model.quantization, "model_type": model.config.model_type}
        write_model_files(tmp, model.config, tokenizer, model_type=QUANTIZED_MODEL_TYPE, quantization_config=quant)
    return Path(folder)


def load_quantized(
    folder: str | Path,
    quantization: dict,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: ModelConfig | None = None,
) -> Transformer:
    """Rebuild a model saved by save_quantized: the layers are created empty (quantize/) and filled with the stored
    codes. `config`: the folder's, when the caller has read config.json already."""
    folder = Path(folder)
    try:
        scheme, group = quantization.get("scheme"), int(quantization.get("group_size", 64))
        check_scheme(scheme, group)
    except (TypeError, ValueError) as e:  # TypeError: a group_size that is not a number
        raise CheckpointError(f"{folder}/config.json: quantization_config: {e}") from None
    config = config or read_hf_config(folder)
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
        raise CheckpointError(
            f"{folder}: a {scheme} checkpoint of this config needs other tensors "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, t in state.items():
        if (
            tuple(t.shape) != tuple(expected[name].shape)
            or t.dtype != expected[name].dtype
            and not t.is_floating_point()
        ):
            raise CheckpointError(
                f"{folder}: tensor {name!r} is {tuple(t.shape)} {t.dtype}, expected "
                f"{tuple(expected[name].shape)} {expected[name].dtype}"
            )
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
