"""GGUF export: a slimlm model as a llama.cpp/Ollama model file, and a LoRA adapter as a llama.cpp LoRA file.

Writes what llama.cpp's convert_hf_to_gguf.py / convert_lora_to_gguf.py write, with the `gguf` package: Llama
(also Mistral without sliding window) as `llama`, with q/k rows permuted to llama.cpp's interleaved RoPE layout;
Qwen2 as `qwen2` (biases, no permutation). Weights quantize with `gguf.quants.quantize`, which can make F32, F16,
BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1; the K-quants (Q4_K, ...) it can only read, so they are refused (run
llama.cpp's llama-quantize on an F16 export for those). Norms and other 1-D tensors stay F32, as llama.cpp keeps
them; with 4/5-bit types the token embedding (also the LM head when tied) is Q8_0, as llama-quantize keeps the
output layer at higher precision. A slimlm-quantized model (int8/int4) is dequantized and requantized.

The file is written under a temporary name and renamed into place. Reading GGUF is checkpoint/gguf.py's job.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimlm.checkpoint.gguf import GGUF_TO_SLIMLM
from slimlm.config import ModelConfig
from slimlm.errors import InputError

# --type name -> (GGML tensor type name, gguf.LlamaFileType name)
GGUF_TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
}
READ_ONLY_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s")
SLIMLM_TO_GGUF = {v: k for k, v in GGUF_TO_SLIMLM.items()}
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


class GGUFExportError(InputError):
    """A model or adapter that cannot be written as GGUF; the message says what to do."""


def check_type(name: str) -> str:
    """The --type value, lower-cased, or a GGUFExportError naming the choices."""
    t = name.lower()
    if t in READ_ONLY_TYPES:
        raise GGUFExportError(
            f"--type {name}: the gguf package can read K-quants but not write them; export f16 and "
            f"run llama.cpp's llama-quantize, or choose one of {', '.join(GGUF_TYPES)}"
        )
    if t not in GGUF_TYPES:
        raise GGUFExportError(f"unknown --type {name!r}; choose one of {', '.join(GGUF_TYPES)}")
    return t


def check_config(config: ModelConfig) -> str:
    """The GGUF architecture of `config`, or a GGUFExportError saying why llama.cpp could not run it."""
    if config.model_type not in GGUF_ARCH:
        raise GGUFExportError(f"model_type {config.model_type!r} has no GGUF export; slimlm writes llama and qwen2")
    if config.sliding_window is not None:
        raise GGUFExportError("sliding-window attention has no llama/qwen2 GGUF equivalent; export a model without it")
    if config.layer_sizes is not None:
        raise GGUFExportError("layers of different sizes (structured pruning) are not written to GGUF yet")
    if config.mlp_bias:
        raise GGUFExportError("MLP biases have no llama/qwen2 GGUF tensor; export a model without mlp_bias")
    return GGUF_ARCH[config.model_type]


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's `permute`: rows [H, 2, hd/2] (HF half-split RoPE) -> [H, hd/2, 2] (interleaved pairs).

    The inverse of checkpoint.gguf.unpermute_qk; w is [H * hd, ...] (a weight, bias or LoRA B).
    """
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dense_weight(module: torch.nn.Module) -> torch.Tensor:
    """The fp32 weight of a linear or embedding, dequantized if slimlm quantized it (int8, int4, NF4)."""
    if hasattr(module, "dequantize"):
        return module.dequantize(torch.float32)
    if hasattr(module, "qweight") and hasattr(module, "scale") and module.qweight.dim() == 2:  # Int8Embedding
        return module.qweight.float() * module.scale.float()[:, None]
    return module.weight.float()


def model_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(slimlm name, fp32 tensor) of every tensor a GGUF file holds, the tied LM head left out."""
    config: ModelConfig = model.config
    out = [("embed_tokens.weight", dense_weight(model.embed_tokens))]
    for i, layer in enumerate(model.layers):
        if getattr(layer.self_attn, "qkv_proj", None) is not None or getattr(layer.mlp, "gate_up_proj", None):
            raise GGUFExportError("the model has fused projections (qkv_proj/gate_up_proj): export it unfused")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out.append((f"layers.{i}.{norm}.weight", getattr(layer, norm).weight.float()))
        for part, proj in [("self_attn", p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
            ("mlp", p) for p in ("gate_proj", "up_proj", "down_proj")
        ]:
            module = getattr(getattr(layer, part), proj)
            out.append((f"layers.{i}.{part}.{proj}.weight", dense_weight(module)))
            if getattr(module, "bias", None) is not None:
                out.append((f"layers.{i}.{part}.{proj}.bias", module.bias.float()))
    out.append(("norm.weight", model.norm.weight.float()))
    if not config.tie_word_embeddings:
        out.append(("lm_head.weight", dense_weight(model.lm_head)))
    return out


def gguf_name(slimlm_name: str) -> str:
    """`layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight` (the inverse of checkpoint.gguf's map)."""
    parts = slimlm_name.split(".")
    if parts[0] == "layers":
        return SLIMLM_TO_GGUF["layers.{}." + ".".join(parts[2:])].format(parts[1])
    if slimlm_name not in SLIMLM_TO_GGUF:
        raise GGUFExportError(f"tensor {slimlm_name!r} has no GGUF name")
    return SLIMLM_TO_GGUF[slimlm_name]


def gguf_array(name: str, w: torch.Tensor, config: ModelConfig) -> np.ndarray:
    """The fp32 numpy array stored under GGUF tensor `name`: q/k rows permuted for llama."""
    a = w.detach().cpu().float().numpy()
    if config.model_type != "qwen2" and name.split(".")[-2] in ("attn_q", "attn_k"):
        a = permute_qk(a, config.n_heads if ".attn_q." in name else config.n_kv_heads)
    return np.ascontiguousarray(a)


def tensor_type(name: str, a: np.ndarray, qtype: str) -> str:
    """The GGML type tensor `name` gets: 1-D stays F32; rows that are not whole blocks fall back to F16."""
    import gguf

    ggml = GGUF_TYPES[qtype][0]
    if a.ndim == 1:
        return "F32"
    if name == "token_embd.weight" and qtype.startswith(("q4", "q5")):
        ggml = "Q8_0"
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml]][0]
    return ggml if a.shape[-1] % block == 0 else "F16"


def encode_tensor(a: np.ndarray, ggml: str) -> np.ndarray:
    """`a` (fp32) in GGML type `ggml`, as gguf.quants.quantize lays it out."""
    import gguf
    from gguf.quants import quantize

    return quantize(a, gguf.GGMLQuantizationType[ggml])


def add_model_metadata(writer: Any, config: ModelConfig, qtype: str, name: str) -> None:
    """general.* and `<arch>.*` hyper-parameters, as convert_hf_to_gguf.py writes them."""
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim != config.dim // config.n_heads:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif rope_type == "llama3":
        writer.add_rope_scaling_orig_ctx_len(int(scaling.get("original_max_position_embeddings", 8192)))
    writer.add_file_type(gguf.LlamaFileType[GGUF_TYPES[qtype][1]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def llama3_rope_factors(config: ModelConfig) -> np.ndarray | None:
    """`rope_freqs.weight`: llama.cpp's per-frequency divisors for Llama 3 RoPE scaling (as its converter makes)."""
    s = config.rope_scaling or {}
    if s.get("rope_type", s.get("type")) != "llama3":
        return None
    factor, low, high = float(s["factor"]), float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old = float(s.get("original_max_position_embeddings", 8192))
    hd = config.head_dim
    factors = []
    for freq in 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_atomic(writer: Any, out: Path) -> None:
    """Write the writer's header, metadata and tensors to a temporary sibling of `out`, then rename it over."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def export_gguf(
    model: torch.nn.Module,
    hf_tokenizer: Any,
    tokenizer_folder: str | Path,
    out: str | Path,
    qtype: str = "f16",
    pre: str | None = None,
    source: str | Path | None = None,
    name: str = "slimlm export",
    progress: bool = True,
) -> dict[str, Any]:
    """Write `model` (+ its HF tokenizer, read from `tokenizer_folder`) as a GGUF file of type `qtype`.

    pre: llama.cpp's pre-tokenizer name; None finds it (carried over from `source` if that is a .gguf file, else by
    hashing, see gguf_vocab). Returns {"path", "bytes", "type", "arch", "tokenizer_pre", "tensor_types", "export_s"}.
    """
    import gguf
    from tqdm import tqdm

    from slimlm.export.gguf_vocab import add_tokenizer, pre_tokenizer_name

    t0 = time.perf_counter()
    qtype, config, out = check_type(qtype), model.config, Path(out)
    arch = check_config(config)
    pre = pre or pre_tokenizer_name(hf_tokenizer, source)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    add_model_metadata(writer, config, qtype, name)
    add_tokenizer(writer, hf_tokenizer, Path(tokenizer_folder), config.vocab_size, pre)
    counts: dict[str, int] = {}
    factors = llama3_rope_factors(config)
    if factors is not None:
        writer.add_tensor("rope_freqs.weight", factors)
    with torch.no_grad():
        for sname, w in tqdm(
            model_tensors(model),
            desc=f"writing {out.name} ({qtype})",
            unit="tensor",
            file=sys.stderr,
            disable=not progress,
            leave=False,
        ):
            gname = gguf_name(sname)
            a = gguf_array(gname, w, config)
            ggml = tensor_type(gname, a, qtype)
            writer.add_tensor(gname, encode_tensor(a, ggml), raw_dtype=gguf.GGMLQuantizationType[ggml])
            counts[ggml] = counts.get(ggml, 0) + 1
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(writer, out)
    return {
        "path": str(out),
        "bytes": out.stat().st_size,
        "type": qtype,
        "arch": arch,
        "tokenizer_pre": pre,
        "tensor_types": counts,
        "export_s": time.perf_counter() - t0,
    }


def lora_pairs(model: torch.nn.Module) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """(GGUF base tensor name, A [r, in], B [out, r], scaling) of the one LoRA adapter attached to `model`."""
    from slimlm.peft.lora import lora_layers, lora_selection

    names = model.lora_selection.names if model.lora_selection is not None else set()
    if len(names) != 1:
        raise GGUFExportError(
            f"expected one LoRA adapter attached, found {len(names)}: gguf-lora writes LoRA "
            "adapters only (DoRA, prefix, prompt, bottleneck and BitFit adapters: merge them with "
            "`slimlm export gguf --adapter` instead)"
        )
    if lora_selection(model).saved_modules.get(next(iter(names))):
        raise GGUFExportError(
            "the adapter saves whole modules (modules_to_save); llama.cpp LoRA files cannot hold "
            "them: merge it with `slimlm export gguf --adapter` instead"
        )
    pairs = []
    for lname, layer in lora_layers(model):
        for a in layer.adapters.values():
            if a.magnitude is not None or a.lora_B.bias is not None:
                raise GGUFExportError(
                    "DoRA and lora_bias adapters have no llama.cpp LoRA form: merge them with "
                    "`slimlm export gguf --adapter` instead"
                )
            pairs.append(
                (
                    gguf_name(lname + ".weight"),
                    a.lora_A.weight.detach().float().numpy(),
                    a.lora_B.weight.detach().float().numpy(),
                    float(a.scaling),
                )
            )
    if not pairs:
        raise GGUFExportError("the adapter has no LoRA layers to write")
    return pairs


def lora_alpha(pairs: list[tuple[str, np.ndarray, np.ndarray, float]]) -> float:
    """One alpha with scaling = alpha / r for every module (llama.cpp's rule), or 0 where none exists (rsLoRA,
    alpha_pattern): llama.cpp then scales by 1 and export_gguf_lora folds each module's scaling into B."""
    alphas = [s * a.shape[0] for _, a, _, s in pairs]
    return alphas[0] if all(math.isclose(x, alphas[0], rel_tol=1e-6) for x in alphas) else 0.0


def export_gguf_lora(
    model: torch.nn.Module, out: str | Path, qtype: str = "f32", name: str = "slimlm LoRA", progress: bool = True
) -> dict[str, Any]:
    """Write the LoRA adapter attached to `model` as a llama.cpp LoRA GGUF (what convert_lora_to_gguf.py writes).

    Tensors `blk.N.attn_q.weight.lora_a` [r, in] and `.lora_b` [out, r] (q/k rows of B permuted like the base
    weights), `adapter.lora.alpha` so that llama.cpp's alpha / r equals the adapter's scaling. qtype: f32 or f16.
    """
    import gguf
    from tqdm import tqdm

    if qtype not in ("f32", "f16"):
        raise GGUFExportError(f"gguf-lora --type {qtype!r}: LoRA files are written as f32 or f16")
    config, out = model.config, Path(out)
    arch = check_config(config)
    pairs = lora_pairs(model)
    alpha = lora_alpha(pairs)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for base, a, b, scaling in tqdm(
        pairs, desc=f"writing {out.name}", unit="layer", file=sys.stderr, disable=not progress, leave=False
    ):
        if alpha == 0.0:
            b = b * scaling
        if config.model_type != "qwen2" and base.split(".")[-2] in ("attn_q", "attn_k"):
            b = permute_qk(b, config.n_heads if ".attn_q." in base else config.n_kv_heads)
        dtype = np.float32 if qtype == "f32" else np.float16
        writer.add_tensor(base + ".lora_a", np.ascontiguousarray(a, dtype=dtype))
        writer.add_tensor(base + ".lora_b", np.ascontiguousarray(b, dtype=dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(writer, out)
    return {
        "path": str(out),
        "bytes": out.stat().st_size,
        "type": qtype,
        "arch": arch,
        "alpha": alpha,
        "layers": len(pairs),
    }
