"""The engine's fast decode step on a CPU: every decoder layer in one C++ call (kernels/decode.cpp).

For one new token per row, eager PyTorch spends more time dispatching ~1,700 small ops and module calls than
reading the weights (SmolLM2-135M int8: ~16 ms of ~25 ms per step). `FusedDecode` hands the layers' weights and the
engine's cache to torch.ops.slimlm.decode_layers once per step instead; embedding, final norm and LM head stay the
model's own modules. It computes what Transformer.forward computes (tests/test_engine_fused_decode.py checks the
logits against it), and only takes the models it can run exactly:

  CPU, fp32 activations, an fp32 or fp16 cache; projections plain nn.Linear or Int8WeightOnlyLinear without bias,
  not fused (qkv_proj/gate_up_proj), optionally wrapped in multi-LoRA slots (engine/multi_lora.py: rows with an
  adapter add their slot's (x A^T) B^T, computed in fp32 from the unrounded input); no prefix-tuning module, no
  position offset.

Everything else (GPU, bf16, other quantizations, Qwen2's biases, ...) runs the model's forward as before.
Speculative verification goes through it too: each guessed token is a row of its own at the next position of the
same slot. Its matmuls are batch-invariant (int8 weights: exact integer sums;
fp32 weights: a fixed summation order), so a request gets the same tokens alone, in any batch, and with or
without speculation. Against the model's own forward it agrees to round-off (~1e-5 of the logits with int8
weights, whose int16 activation rounding can move by one step where the two paths' norms differ in the last bit),
so a long greedy run of the two can part at a near-tie.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from slimlm import kernels
from slimlm.engine.multi_lora import SlotLoRALinear
from slimlm.model import RMSNorm, Transformer
from slimlm.quantize.int8 import Int8WeightOnlyLinear

log = logging.getLogger("slimlm.engine")

_NO_SCALE = torch.empty(0)
_NO_ROWS = torch.empty(0, dtype=torch.long)


def _projection(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | str:
    """(weight, scale) the kernel reads for one projection, or why it cannot. A multi-LoRA slot wrapper is looked
    through: its rows without an adapter are the base layer's product."""
    module = module.base if isinstance(module, SlotLoRALinear) else module
    if type(module) is nn.Linear:
        return (module.weight.detach(), _NO_SCALE) if module.bias is None else "a projection has a bias"
    if type(module) is Int8WeightOnlyLinear:
        return (module.qweight, module.scale.float()) if module.bias is None else "a projection has a bias"
    return f"projection type {type(module).__name__}"


def _lora_tensors(model: Transformer) -> list[torch.Tensor]:
    """A and B^T of every projection's LoRA slots, 14 per layer in decode.cpp's order (empty tensors where a
    projection has none); [] when the model has no slots attached."""
    if model.lora_slots is None:
        return []
    out = []
    for layer in model.layers:
        for proj in (
            layer.self_attn.q_proj,
            layer.self_attn.k_proj,
            layer.self_attn.v_proj,
            layer.self_attn.o_proj,
            layer.mlp.gate_proj,
            layer.mlp.up_proj,
            layer.mlp.down_proj,
        ):
            out += [proj.A, proj.B] if isinstance(proj, SlotLoRALinear) else [_NO_SCALE, _NO_SCALE]
    return out


def _layer_tensors(model: Transformer) -> list[torch.Tensor] | str:
    """The 16 tensors per layer that decode_layers reads (see decode.cpp), or why the model does not qualify."""
    out: list[torch.Tensor] = []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_proj is not None or mlp.gate_up_proj is not None:
            return "fused qkv/gate_up projections"
        if attn.prefix is not None:
            return "a prefix-tuning module"
        if not (type(layer.input_layernorm) is RMSNorm and type(layer.post_attention_layernorm) is RMSNorm):
            return "a norm other than RMSNorm"
        if layer.input_layernorm.eps != model.config.norm_eps:
            return "per-layer norm eps"
        tensors = [layer.input_layernorm.weight.detach()]
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            got = _projection(proj)
            if isinstance(got, str):
                return got
            tensors += got
        tensors.append(layer.post_attention_layernorm.weight.detach())
        for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            got = _projection(proj)
            if isinstance(got, str):
                return got
            tensors += got
        out += tensors
    return out


class FusedDecode:
    """One decode step for W rows with one token each: tokens, slots, positions [W] -> logits [W, V] (fp32)."""

    def __init__(self, model: Transformer, layer_tensors: list[torch.Tensor]):
        self.model, self.layer_tensors = model, layer_tensors
        self.lora_tensors = _lora_tensors(model)  # the slot buffers are filled in place: read at every call
        self.lm_head = model.lm_head  # a draft model may use a narrower head (engine/draft.py)
        # Prompt chunks go through this step too where every projection is int8: its integer tiles run prefill
        # faster than the forward (BENCHMARKS.md); fp32 weights prefill faster through torch's GEMM in the forward.
        self.prefills = all(t.dtype == torch.int8 for t in layer_tensors if t.dim() == 2)
        self.inv_freq = model.inv_freq.float()
        self.eps, self.window = model.config.norm_eps, model.config.sliding_window or 0

    @classmethod
    def for_model(cls, model: Transformer) -> FusedDecode | None:
        """The fast step for this model, or None (with the reason logged at debug level) where it does not apply."""
        why = None
        if not isinstance(model, Transformer):
            why = f"{type(model).__name__} is not slimlm's Transformer (e.g. an ONNX Runtime graph)"
        elif model.device.type != "cpu" or model.dtype != torch.float32:
            why = f"{model.device.type} {model.dtype} (the kernel is CPU fp32)"
        elif model.position_offset:
            why = "a position offset (prefix tuning)"
        elif not kernels.decode_layers_available():
            why = "slimlm's CPU kernels are unavailable or disabled"
        if why is None:
            got = _layer_tensors(model)
            if isinstance(got, str):
                why = got
            else:
                return cls(model, got)
        log.debug("fused decode off: %s", why)
        return None

    @torch.no_grad()
    def __call__(
        self,
        tokens: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
        k_cache: list[torch.Tensor],
        v_cache: list[torch.Tensor],
        lora_rows: list[int | None] | None = None,
        logits_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Write each row's key/value at (slot, position) in k_cache/v_cache [n_slots, Hkv, S, hd] per layer.

        lora_rows: each row's LoRA slot (engine/multi_lora.py) or None; None or all-None: no row uses an adapter.
        logits_rows: the rows whose logits are wanted (a prompt chunk needs its last only); None: every row."""
        m = self.model
        x = m.embed_tokens(tokens)  # [W, D]
        lora, rows = [], _NO_ROWS
        if lora_rows is not None and any(r is not None for r in lora_rows):
            lora = self.lora_tensors
            if not lora:
                raise ValueError("rows select LoRA slots, but the model had no slots when FusedDecode was made")
            rows = torch.tensor([-1 if r is None else r for r in lora_rows], dtype=torch.long)
        x = torch.ops.slimlm.decode_layers(
            x, slots, positions, self.inv_freq, self.layer_tensors, k_cache, v_cache, self.eps, self.window, lora, rows
        )
        if logits_rows is not None:
            x = x[logits_rows]
        return self.lm_head(m.norm(x)).float()  # [W or len(logits_rows), V] (V: the head's outputs)
