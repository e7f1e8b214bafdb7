"""TFLite / LiteRT export through litert-torch, with a parity check in the LiteRT interpreter.

On-device runtimes want fixed shapes, so this export is not the ONNX layout (growing past) but a static cache,
batch 1, with two signatures sharing the weights:
  prefill  tokens [1, P] int32, input_pos [P] int32, k/v caches [1, Hkv, S, hd] -> logits [1, P, V], caches
  decode   tokens [1, 1] int32, input_pos [1] int32, the caches                  -> logits [1, 1, V], caches
Prompts shorter than P are right-padded; the pad tokens' cache slots are overwritten by the next decode steps
before anyone attends to them (the mask is causal by position), so the last real token's logits are exact.
Needs the `litert-torch` package (pip install litert-torch); quantized slimlm models are refused (their ATen int8
kernels have no TFLite lowering: quantize with LiteRT's own ai-edge-quantizer after export).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimlm.errors import InputError
from slimlm.kv_cache import kv_heads_per_layer
from slimlm.model import Transformer, rope_cos_sin

TFLITE_FILE = "model.tflite"


def require_litert():
    try:
        import litert_torch
    except ImportError:
        raise InputError(
            "TFLite export needs litert-torch: pip install litert-torch (it brings the LiteRT "
            "interpreter, ai-edge-litert)"
        ) from None
    return litert_torch


class StaticCache:
    """Functional static cache for tracing: index_copy the new k/v at input_pos, keep the results."""

    def __init__(self, kv: list[torch.Tensor]):
        self.kv, self.out = kv, []

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        k = self.kv[2 * layer].index_copy(2, input_pos, k)  # [1, Hkv, S, hd]
        v = self.kv[2 * layer + 1].index_copy(2, input_pos, v)
        self.out += [k, v]
        return k, v


class StaticCacheDecoder(nn.Module):
    """forward(tokens [1, T], input_pos [T], *kv) -> (logits [1, T, V], *kv updated); see the module docstring."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, *kv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        input_pos = input_pos.long()
        S = kv[0].shape[2]
        mask = (torch.arange(S)[None, :] <= input_pos[:, None])[None, None]  # [1, 1, T, S]
        x = m.embed_tokens(tokens.long())
        cos, sin = rope_cos_sin(m.inv_freq, input_pos[None], x.dtype)
        cache = StaticCache(list(kv))
        for i, layer in enumerate(m.layers):
            x = layer(x, cos, sin, mask, cache, i, input_pos)
        return (m.lm_head(m.norm(x)), *cache.out)


def static_inputs(model: Transformer, T: int, max_len: int, start: int = 0) -> tuple[torch.Tensor, ...]:
    c = model.config
    kv = [torch.zeros(1, h, max_len, c.head_dim) for h in kv_heads_per_layer(c) for _ in "kv"]
    tokens = torch.zeros(1, T, dtype=torch.int32)
    return (tokens, torch.arange(start, start + T, dtype=torch.int32), *kv)


@torch.no_grad()
def export_tflite(
    model: Transformer, tokenizer: Any, out: str | Path, prefill_len: int = 64, max_len: int = 256, check: bool = True
) -> dict[str, Any]:
    """Write out/model.tflite (prefill + decode signatures), config and tokenizer; returns the metadata."""
    from slimlm.checkpoint.atomic import atomic_folder
    from slimlm.export.decoder import check_exportable
    from slimlm.export.onnx import METADATA_FILE, write_export_files

    litert_torch = require_litert()
    if model.quantization:
        raise InputError(
            "TFLite export takes an unquantized model (slimlm's int8/int4 kernels have no TFLite "
            "lowering); quantize the .tflite with LiteRT's ai-edge-quantizer instead"
        )
    if not 1 <= prefill_len < max_len <= model.config.max_seq_len:
        raise InputError(
            f"need 1 <= prefill_len ({prefill_len}) < max_len ({max_len}) <= the model's context "
            f"({model.config.max_seq_len})"
        )
    check_exportable(model)
    t0 = time.perf_counter()
    decoder = StaticCacheDecoder(copy.deepcopy(model).float().eval()).eval()
    edge = (
        litert_torch.signature("prefill", decoder, static_inputs(model, prefill_len, max_len))
        .signature("decode", decoder, static_inputs(model, 1, max_len, prefill_len))
        .convert()
    )
    meta = {
        "format": "tflite",
        "file": TFLITE_FILE,
        "signatures": ["prefill", "decode"],
        "prefill_len": prefill_len,
        "max_len": max_len,
        "batch": 1,
    }
    with atomic_folder(out) as tmp:
        edge.export(str(tmp / TFLITE_FILE))
        write_export_files(model, tokenizer, tmp)
        if check:
            meta["parity"] = check_tflite(edge, decoder, prefill_len, max_len)
        meta["export_s"] = round(time.perf_counter() - t0, 1)
        meta["tflite_bytes"] = (tmp / TFLITE_FILE).stat().st_size
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2))
    return meta


@torch.no_grad()
def check_tflite(edge, decoder: StaticCacheDecoder, prefill_len: int, max_len: int) -> dict[str, float]:
    """Prefill a random prompt and decode two tokens in the LiteRT interpreter and in PyTorch; max |Δ logit|."""
    model = decoder.model
    g = torch.Generator().manual_seed(0)
    inputs = list(static_inputs(model, prefill_len, max_len))
    inputs[0] = torch.randint(0, model.config.vocab_size, (1, prefill_len), generator=g, dtype=torch.int32)
    worst, pos = 0.0, prefill_len
    for name in ("prefill", "decode", "decode"):
        want = decoder(*inputs)
        got = edge(*[t.numpy() for t in inputs], signature_name=name)
        got = (
            [torch.from_numpy(got[k]) for k in sorted(got, key=_output_index)]
            if isinstance(got, dict)
            else [torch.as_tensor(t) for t in got]
        )
        worst = max(worst, float((got[0] - want[0]).abs().max()))
        token = want[0][:, -1].argmax(-1, keepdim=True).to(torch.int32)
        inputs = [token, torch.tensor([pos], dtype=torch.int32), *want[1:]]
        pos += 1
    return {"max_logit_diff": worst}


def _output_index(name: str) -> int:
    digits = "".join(ch for ch in name.rsplit("_", 1)[-1] if ch.isdigit())
    return int(digits) if digits else 0
