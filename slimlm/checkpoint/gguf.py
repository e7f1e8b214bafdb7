"""GGUF checkpoints (llama.cpp's format): read metadata, dequantize every tensor with the `gguf` package.

llama.cpp's converter permutes the rows of Llama q/k weights from HF's half-split RoPE layout to an interleaved
one; `unpermute_qk` undoes it so the weights fit model.py. Qwen2 GGUF files are not permuted.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimlm.checkpoint.materialize import (
    CheckpointError,
    build_model,
    check_layer_count,
)
from slimlm.config import ConfigError, ModelConfig
from slimlm.model import Transformer
from slimlm.paths import cache_root

GGUF_TO_SLIMLM = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.post_attention_layernorm.weight",
    "blk.{}.attn_q.weight": "layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "layers.{}.self_attn.o_proj.weight",
    "blk.{}.attn_q.bias": "layers.{}.self_attn.q_proj.bias",
    "blk.{}.attn_k.bias": "layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.bias": "layers.{}.self_attn.v_proj.bias",
    "blk.{}.ffn_gate.weight": "layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "layers.{}.mlp.down_proj.weight",
}
IGNORED_GGUF_KEYS = {"rope_freqs.weight"}  # llama3 RoPE factors: turned into config.rope_scaling instead
_LAYER = re.compile(r"^blk\.(\d+)\.")


def _open(path: Path):
    import gguf  # optional heavy import, only when a GGUF file is read

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise CheckpointError(
            f"{path} is not a readable GGUF file ({_one_line(e)}); it may be truncated, download it again"
        ) from None


def _one_line(e: Exception) -> str:
    """A third-party exception's message on one line (the CLI prints errors as one line)."""
    return " ".join(str(e).split())


def read_metadata(reader) -> dict[str, Any]:
    """GGUF key/values as plain Python values; tokenizer vocab arrays are skipped except their length."""
    meta = {}
    for key, field in reader.fields.items():
        if key in (
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.scores",
        ):
            meta[key] = range(len(field.data))  # only the length is needed here
            continue
        try:
            meta[key] = field.contents()
        except Exception:
            continue
    return meta


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's `permute`: rows [H, hd/2, 2] (interleaved pairs) -> [H, 2, hd/2] (half-split)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_scaling_from_rope_freqs(
    factors: np.ndarray, config: ModelConfig, old_len: int, path: Path
) -> dict[str, Any] | None:
    """Recover HF's llama3 `rope_scaling` from llama.cpp's per-frequency divisors (`rope_freqs.weight`).

    llama.cpp stores f_i = 1 (high frequencies), `factor` (low ones) or 1 / ((1 - s) / factor + s) in between, with
    s = old_len / (wavelen * (high - low)) - low / (high - low): a line in 1/wavelen whose slope and intercept
    fix the band edges. Any old_len then gives the same frequencies; the result is checked against the file.
    """
    hd = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return None
    mid = (factors > 1.0 + 1e-4) & (factors < factor - 1e-4)
    low, high = 1.0, 4.0  # Llama 3.1 defaults, used when too few frequencies fall in the smooth band
    if mid.sum() >= 2:
        smooth = (1.0 / factors[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
        slope, intercept = np.polyfit(inv[mid] / (2 * np.pi), smooth, 1)  # smooth = slope / wavelen + intercept
        width = old_len / slope
        low = -intercept * width
        high = low + width
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": float(low),
        "high_freq_factor": float(high),
        "original_max_position_embeddings": old_len,
    }
    from slimlm.model import rope_inv_freq

    trial = ModelConfig(**{**config.to_dict(), "rope_scaling": scaling})
    if not np.allclose(rope_inv_freq(trial).double().numpy(), inv / factors, rtol=1e-3):
        raise CheckpointError(
            f"{path}: rope_freqs.weight does not follow Llama-3 RoPE scaling; "
            "slimlm cannot reproduce this file's rotary frequencies"
        )
    return scaling


def slimlm_name(gguf_name: str) -> str:
    m = _LAYER.match(gguf_name)
    pattern = "blk.{}." + gguf_name[m.end() :] if m else gguf_name
    target = GGUF_TO_SLIMLM.get(pattern)
    if target is None:
        raise CheckpointError(
            f"unknown tensor {gguf_name!r} in GGUF file; slimlm reads Llama/Qwen2 decoder tensors only"
        )
    return target.format(m.group(1)) if m else target


def iter_gguf_tensors(
    reader, config: ModelConfig, path: Path, progress: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """(slimlm name, fp32 tensor) for each tensor, dequantized one at a time (a tqdm bar on stderr if `progress`)."""
    from gguf.quants import dequantize
    from tqdm import tqdm

    for t in tqdm(
        reader.tensors,
        desc=f"dequantizing {path.name}",
        unit="tensor",
        file=sys.stderr,
        disable=not progress,
        leave=False,
    ):
        if t.name in IGNORED_GGUF_KEYS:
            continue
        try:
            name = slimlm_name(t.name)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        try:
            w = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(
                f"{path}: tensor {t.name!r} of type {t.tensor_type.name} cannot be dequantized ({e})"
            ) from None
        # copy=True: F32 tensors come straight from a read-only memmap that torch must not alias.
        w = np.array(w, dtype=np.float32, copy=True).reshape([int(d) for d in reversed(t.shape)])
        if config.model_type == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            w = unpermute_qk(w, config.n_heads if "attn_q" in t.name else config.n_kv_heads)
        yield name, torch.from_numpy(np.ascontiguousarray(w))


def load_gguf(
    path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", progress: bool = False
) -> tuple[ModelConfig, Transformer]:
    """Load a GGUF file as a Transformer with dequantized weights in `dtype` (`progress`: a bar on stderr)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    reader = _open(path)
    try:
        config = ModelConfig.from_gguf(read_metadata(reader))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (TypeError, ValueError) as e:  # a metadata value of the wrong type, e.g. a string block_count
        raise CheckpointError(f"{path}: invalid model metadata ({e}); the file is corrupt, download it again") from None
    check_layer_count(config, [t.name for t in reader.tensors], path)
    config.tie_word_embeddings = not any(t.name == "output.weight" for t in reader.tensors)
    rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if rope_freqs is not None:
        meta = read_metadata(reader)
        old_len = meta.get(f"{config.model_type}.rope.scaling.original_context_length", 8192)
        config.rope_scaling = llama3_scaling_from_rope_freqs(
            np.array(rope_freqs.data, dtype=np.float64), config, int(old_len), path
        )
    return config, build_model(config, iter_gguf_tensors(reader, config, path, progress), dtype, device, str(path))


def gguf_cache_folder(path: str | Path) -> Path:
    """The HF folder a GGUF file converts to, keyed by its absolute path, size and modification time."""
    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def convert_gguf(path: str | Path, out: str | Path, progress: bool | None = None) -> Path:
    """Write the GGUF file as an HF folder (fp32 safetensors of the dequantized weights + HF tokenizer).

    Parsing GGUF (its 49k-token vocabulary above all) takes seconds on every read; the folder loads in under one.
    The conversion itself takes ~20 s for SmolLM2-135M, so it reports its steps on stderr: `progress` None means
    when stderr is a terminal (TQDM_DISABLE=1 silences the bar too).
    """
    from transformers import AutoTokenizer

    from slimlm.checkpoint.hf import save_hf_folder

    path = Path(path)
    progress = sys.stderr.isatty() if progress is None else progress
    _note(progress, f"converting {path.name} into {out} (once: later loads read that folder)")
    _, model = load_gguf(path, torch.float32, "cpu", progress)
    _note(progress, f"reading the tokenizer of {path.name}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # transformers raises many types here (ValueError, KeyError, IndexError, ...)
        raise CheckpointError(
            f"{path}: its tokenizer cannot be read ({type(e).__name__}: {_one_line(e)}); slimlm "
            "needs a GGUF file with an embedded tokenizer (tokenizer.ggml.*)"
        ) from None
    _note(progress, f"writing {out}")
    return save_hf_folder(model, out, tokenizer=tokenizer)


def _note(progress: bool, message: str) -> None:
    if progress:
        print(f"slimlm: {message}", file=sys.stderr, flush=True)
