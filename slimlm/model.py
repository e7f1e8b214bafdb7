"""The Llama-family decoder in plain PyTorch: RMSNorm pre-norm blocks, RoPE, grouped-query attention, SwiGLU.

Module names follow HF transformers one level down (`layers.N.self_attn.q_proj`, `layers.N.mlp.gate_proj`), so
checkpoint and adapter keys map by a literal table (checkpoint/hf.py). This module knows nothing of files,
tokenizers or sampling; it turns token ids into logits, optionally reading and writing a KV cache.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from slimlm.config import ModelConfig
from slimlm.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and scale after casting back, exactly as HF does, so bf16 runs agree too.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] for the config's RoPE variant (default, linear, llama3)."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = config.rope_scaling or {}
    if config.rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif config.rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, head_dim] for positions [B, T]; computed in fp32 and cast like HF."""
    freqs = positions[..., None].float() * inv_freq.float()  # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # HF's half-split layout: [B, T, hd]
    return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, hd] by the angles in cos/sin [B, 1, T, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Grouped-query attention. The four projections are injected, so PEFT can put other layers in their slots."""

    def __init__(
        self,
        q_proj: nn.Module | None,
        k_proj: nn.Module | None,
        v_proj: nn.Module | None,
        o_proj: nn.Module,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        qkv_proj: nn.Module | None = None,
    ):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        # Fused alternative (fuse/llama.py): one projection whose output rows are [q | k | v], so x is read once by
        # one GEMM; when it is set, q_proj/k_proj/v_proj are None.
        self.qkv_proj = qkv_proj
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        # Prefix-tuning slot (peft/prefix.py): a module (k, v, mask, T) -> (k, v, mask) prepending learned keys/values.
        self.prefix: nn.Module | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer_idx: int = 0,
        cache_pos: torch.Tensor | None = None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split((q_dim, kv_dim, kv_dim), dim=-1)  # views of [B, T, q_dim + 2 kv_dim]
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, cache_pos, k, v)  # [B, Hkv, S, hd]
            if kv_len is not None:
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]  # only the filled slots (eager mode)
            if k.dtype != q.dtype:  # a cache that stores a narrower type (the engine's fp16 cache on a CPU)
                k, v = k.to(q.dtype), v.to(q.dtype)
        if self.prefix is not None:
            k, v, mask = self.prefix(k, v, mask, T)  # T: a None mask means causal only when T > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(
        self,
        gate_proj: nn.Module | None,
        up_proj: nn.Module | None,
        down_proj: nn.Module,
        gate_up_proj: nn.Module | None = None,
    ):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        # Fused alternative (fuse/llama.py): output rows [gate | up]; when set, gate_proj/up_proj are None.
        self.gate_up_proj = gate_up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [..., 2 * ff] -> two [..., ff] views
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, self_attn: Attention, mlp: MLP, input_layernorm: RMSNorm, post_attention_layernorm: RMSNorm):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm, self.post_attention_layernorm = input_layernorm, post_attention_layernorm

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer_idx: int,
        cache_pos: torch.Tensor | None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer_idx, cache_pos, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


def build_block(config: ModelConfig, i: int = 0) -> Block:
    """Decoder block i (its sizes from config.layer_size(i)) with plain nn.Linear projections in every slot."""
    d, hd, ab, mb = config.dim, config.head_dim, config.attention_bias, config.mlp_bias
    s = config.layer_size(i)
    h, hkv, ff = s["n_heads"], s["n_kv_heads"], s["intermediate_size"]
    attn = Attention(
        q_proj=nn.Linear(d, h * hd, bias=ab),
        k_proj=nn.Linear(d, hkv * hd, bias=ab),
        v_proj=nn.Linear(d, hkv * hd, bias=ab),
        o_proj=nn.Linear(h * hd, d, bias=ab and config.model_type == "llama"),  # Qwen2: q/k/v only
        n_heads=h,
        n_kv_heads=hkv,
        head_dim=hd,
    )
    mlp = MLP(
        gate_proj=nn.Linear(d, ff, bias=mb),
        up_proj=nn.Linear(d, ff, bias=mb),
        down_proj=nn.Linear(ff, d, bias=mb),
    )
    return Block(attn, mlp, RMSNorm(d, config.norm_eps), RMSNorm(d, config.norm_eps))


class Transformer(nn.Module):
    """Token ids [B, T] -> logits [B, T, V]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(build_block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        # Prefix tuning shifts real tokens' RoPE positions past its virtual tokens, as HF PEFT does.
        self.position_offset = 0
        self.gradient_checkpointing = False  # recompute each block in backward instead of keeping its activations
        # What other packages put on the model, declared here so code reads `model.x` instead of probing for it.
        # quantize.schemes.quantize_model_ / gptq / compressed_tensors: the scheme the weights are stored in, as
        # written to config.json's quantization_config ({"quant_method", "scheme", "group_size", ...}); None: dense.
        self.quantization: dict[str, Any] | None = None
        self.qat: dict[str, Any] | None = None  # compress.qat.prepare_qat_: {"scheme", "group_size"} until converted
        self.smoothing: dict[str, Any] | None = (
            None  # compress.smoothquant.smooth_model_: how activations were smoothed
        )
        self.peft: Any = None  # peft.apply_peft: the peft.PeftState (method, config, nf4_base) of the adapter
        self.lora_selection: Any = None  # peft.lora: the AdapterSelection of attached LoRA adapters (None: none)
        self.bitfit_config: Any = None  # peft.bitfit.apply_bitfit: the BitFitConfig whose biases train
        # peft.prefix.apply_prefix: the PrefixEncoder; a submodule once set, so its weights are in state_dict.
        self.prefix_encoder: nn.Module | None = None
        self.lora_slots: Any = None  # engine.multi_lora.LoraSlots.attach: the serving LoRA slots (not a module)
        self.tie_weights()
        if self.embed_tokens.weight.device.type != "meta":
            self.apply(init_weights)

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head when the config says so (call again after loading)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        cache_pos: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V]; see `hidden` for the arguments.

        `logits_to_keep=n` returns logits for the last n positions only (prefill needs just the last).
        """
        x = self.hidden(input_ids, cache, cache_pos, segment_ids)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(x)

    def hidden(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        cache_pos: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states [B, T, D] (training computes the loss from these in chunks).

        Without a cache the T tokens attend causally from position 0; `segment_ids` [B, T] marks packed samples,
        which then restart their positions and see only their own segment. With a cache, cache_pos says which cache
        slots these tokens occupy, in the cache's terms: [T] for KVCache, [B, T] for serve.cache.SlotBatch.
        """
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids)  # [B, T, D]
        kv_len = None
        if cache is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
            mask = None
            if segment_ids is not None:
                positions, mask = segment_positions_and_mask(segment_ids)
            if self._needs_window(T):
                mask = self._window_mask(positions) if mask is None else mask & self._window_mask(positions)
        else:
            # Eager mode attends over the filled slots only; compiled code keeps the static cache shape.
            kv_len = None if torch.compiler.is_compiling() else cache.filled_len(cache_pos)
            positions, mask = cache.positions_and_mask(cache_pos, self.config.sliding_window, kv_len)
        cos, sin = rope_cos_sin(self.inv_freq, positions + self.position_offset, x.dtype)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, cache, i, cache_pos, kv_len, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i, cache_pos, kv_len)
        return self.norm(x)

    def _needs_window(self, T: int) -> bool:
        return self.config.sliding_window is not None and T > self.config.sliding_window

    def _window_mask(self, positions: torch.Tensor) -> torch.Tensor:
        q, k = positions[:, :, None], positions[:, None, :]  # [B, T, 1], [B, 1, T]
        return ((k <= q) & (k > q - self.config.sliding_window))[:, None]

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype


def segment_positions_and_mask(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [B, T] restarting at each packed segment, and the causal same-segment mask [B, 1, T, T]."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    is_start = torch.ones_like(segment_ids, dtype=torch.bool)
    is_start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    seg_start = torch.where(is_start, idx, 0).cummax(dim=1).values  # index where each token's segment began
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = idx[0][None, :] <= idx[0][:, None]  # [T, T]
    return idx - seg_start, (same & causal)[:, None]


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Small normal init (as HF Llama) so a fresh model trains; loading overwrites it."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
