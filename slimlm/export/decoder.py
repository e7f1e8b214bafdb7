"""The decoder as exported graphs see it: the HF/Optimum KV-cache layout, in plain PyTorch.

`ExportDecoder` wraps a Transformer with the interface that ONNX (and TorchScript) consumers expect from a
causal LM with a cache, the one HF Optimum, ONNX Runtime GenAI and transformers.js use:

  inputs   input_ids [B, T] int64, attention_mask [B, P+T] int64 (1 = a real token; left padding allowed),
           position_ids [B, T] int64, past_key_values.{i}.key / .value [B, Hkv_i, P, hd]  (P = 0 for a prefill)
  outputs  logits [B, T, V], present.{i}.key / .value [B, Hkv_i, P+T, hd] (the past with the new keys appended)

Batch, T and P are dynamic. The attention mask is causal over the P+T keys and hides keys whose attention_mask is
0. This module changes no weights and knows nothing of files; onnx.py and torchscript.py write it out.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimlm.errors import InputError
from slimlm.kv_cache import kv_heads_per_layer
from slimlm.model import Transformer, rope_cos_sin


class PastConcatCache:
    """Duck-types the cache the blocks write to: appends each layer's new k/v to its past, keeps the result."""

    def __init__(self, past: list[torch.Tensor]):
        self.past = past  # [k0, v0, k1, v1, ...], each [B, Hkv, P, hd]
        self.present: list[torch.Tensor] = []

    def update(self, layer: int, cache_pos, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.cat([self.past[2 * layer], k], dim=2)  # [B, Hkv, P+T, hd]
        v = torch.cat([self.past[2 * layer + 1], v], dim=2)
        self.present += [k, v]
        return k, v


def check_exportable(model: Transformer) -> None:
    """Refuse what the exported layout cannot express, with what to do instead."""
    if model.config.sliding_window is not None:
        raise InputError(
            "sliding-window attention (Mistral-style) is not supported by the export yet: its mask "
            "differs per query over the past; export a model without sliding_window"
        )
    peft = model.peft
    if peft is not None:
        raise InputError(
            f"the model has an unmerged {peft.method} adapter: merge it first (export --adapter merges "
            "LoRA/DoRA/QLoRA/BitFit adapters; prefix, prompt and bottleneck adapters cannot be merged "
            "and are not exported)"
        )


class ExportDecoder(nn.Module):
    """Transformer -> the graph interface above. forward(input_ids, attention_mask, position_ids, *past)."""

    def __init__(self, model: Transformer):
        super().__init__()
        check_exportable(model)
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        m = self.model
        T, S = input_ids.shape[1], attention_mask.shape[1]  # S = P + T
        q_slot = torch.arange(T, device=input_ids.device) + (S - T)  # [T] where each new token sits among the keys
        k_slot = torch.arange(S, device=input_ids.device)  # [S]
        causal = k_slot[None, :] <= q_slot[:, None]  # [T, S]
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]  # [B, 1, T, S]
        # A left-padding query would see no key at all (SDPA then returns NaN); let every query see itself.
        mask = mask | (k_slot[None, :] == q_slot[:, None])[None, None]
        x = m.embed_tokens(input_ids)  # [B, T, D]
        cos, sin = rope_cos_sin(m.inv_freq, position_ids, x.dtype)
        cache = PastConcatCache(list(past))
        for i, layer in enumerate(m.layers):
            x = layer(x, cos, sin, mask, cache, i, None)
        return (m.lm_head(m.norm(x)), *cache.present)


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the exported graph, in order."""
    kv = [f"{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]
    return (
        ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{n}" for n in kv],
        ["logits"] + [f"present.{n}" for n in kv],
    )


def example_inputs(model: Transformer, batch: int = 2, seq: int = 3, past: int = 2) -> tuple[torch.Tensor, ...]:
    """Inputs of the graph's shapes (non-zero past, so tracing sees the concat; values are irrelevant)."""
    c = model.config
    ids = torch.randint(0, c.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = [torch.zeros(batch, h, past, c.head_dim, dtype=model.dtype) for h in kv_heads_per_layer(c) for _ in "kv"]
    return (ids, mask, pos, *kv)
