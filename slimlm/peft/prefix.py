"""Prefix tuning (Li & Liang 2021) with HF PEFT's PREFIX_TUNING semantics and file layout.

Every layer attends to P learned key/value slots in front of the real keys/values, as if a P-token past had been
cached. Exactly as in PEFT (its prefix is a `past_key_values` cache of length P):
  - the prefix keys get no RoPE; the real tokens' positions start at P (`model.position_offset = P`);
  - every query sees all P prefix slots; among the real keys the usual causal / padding mask applies (the prefix
    also stays visible under a sliding window and to every packed segment).
The learned table holds, per virtual token, all layers' keys and values: [P, L * 2 * Hkv * hd], read as
view(P, L*2, Hkv, hd): row block 2l is layer l's keys, 2l+1 its values (PEFT's permute(2, 0, 3, 1, 4).split(2)).
With `projection=True` the table is reparameterised as PEFT's PrefixEncoder does:
Embedding(P, token_dim) -> Linear(token_dim, hidden) -> Tanh -> Linear(hidden, L*2*token_dim), token_dim = Hkv*hd.

Design: the parameters live once, in `model.prefix_encoder`; each `Attention.prefix` slot holds a `LayerPrefix`
that asks the encoder for its own layer's slice and concatenates it in front of k and v (after RoPE and after the
KV-cache update), widening the mask. The cache itself holds only real tokens, so generation, left padding and
compiled decoding need nothing special.

Adapter folder (HF PEFT's layout, loadable by `peft.PeftModel.from_pretrained`):
  adapter_config.json: {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": P,
    "num_layers": L, "num_attention_heads": Hkv (PEFT's GQA convention: the KV heads), "token_dim": Hkv*hd,
    "num_transformer_submodules": 1, "prefix_projection", "encoder_hidden_size"}
  adapter_model.safetensors: `prompt_embeddings` [P, L*2*token_dim], the table of keys/values. For a projection
    adapter this is the encoder's *output* (as PEFT saves it), so a loaded adapter is always a plain table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimlm.peft.common import PeftError, copy_checked, freeze, prompt_learning_config_errors

PEFT_TYPE = "PREFIX_TUNING"
WEIGHTS_KEY = "prompt_embeddings"


@dataclass
class PrefixConfig:
    num_virtual_tokens: int = 20  # P, the number of prefix key/value slots per layer
    projection: bool = False  # reparameterise the table through PEFT's two-layer MLP (training only)
    encoder_hidden_size: int | None = None  # the MLP's width; None: token_dim (= n_kv_heads * head_dim), as PEFT

    def validate(self) -> None:
        """Raise one PeftError naming every bad field."""
        errors = []
        if not _positive_int(self.num_virtual_tokens):
            errors.append(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if not isinstance(self.projection, bool):
            errors.append(f"projection must be true or false, got {self.projection!r}")
        if self.encoder_hidden_size is not None and not _positive_int(self.encoder_hidden_size):
            errors.append(f"encoder_hidden_size must be a positive integer or null, got {self.encoder_hidden_size!r}")
        if errors:
            raise PeftError("invalid prefix config: " + "; ".join(errors))


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


class PrefixEncoder(nn.Module):
    """The learned key/value table, directly or through an MLP; parameter names follow PEFT's PrefixEncoder."""

    def __init__(
        self,
        num_virtual_tokens: int,
        num_layers: int,
        n_kv_heads: int,
        head_dim: int,
        projection: bool = False,
        encoder_hidden_size: int | None = None,
    ):
        super().__init__()
        self.num_virtual_tokens, self.num_layers = num_virtual_tokens, num_layers
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        token_dim = n_kv_heads * head_dim
        self.projection = projection
        # nn.Embedding / nn.Linear default inits, as PEFT's (init_weights=None) PrefixEncoder.
        if projection:
            hidden = encoder_hidden_size or token_dim
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, num_layers * 2 * token_dim)
            )
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, num_layers * 2 * token_dim)

    def table(self) -> torch.Tensor:
        """All layers' prefix keys/values [P, L * 2 * Hkv * hd] (PEFT's `prompt_embeddings`)."""
        if self.projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s prefix keys and values, each [Hkv, P, hd]."""
        width = 2 * self.n_kv_heads * self.head_dim
        cols = slice(layer * width, (layer + 1) * width)  # this layer's (k, v) columns of the table
        if self.projection:
            # Only this layer's rows of the last Linear: L layers together cost one full MLP (plus L-1 small first
            # layers), and each layer's graph is its own, so gradients are exact without caching across layers.
            h = self.transform[1](self.transform[0](self.embedding.weight))  # [P, hidden]
            last = self.transform[2]
            kv = F.linear(h, last.weight[cols], last.bias[cols])  # [P, 2 * Hkv * hd]
        else:
            kv = self.embedding.weight[:, cols]
        kv = kv.view(-1, 2, self.n_kv_heads, self.head_dim).permute(1, 2, 0, 3)  # [2, Hkv, P, hd]
        return kv[0], kv[1]


class LayerPrefix(nn.Module):
    """The module in `Attention.prefix`: (k, v, mask, T) -> (k, v, mask) with the P prefix slots in front.

    k, v: [B, Hkv, S, hd] (after RoPE and the cache update); mask: None (causal when T > 1, all visible when
    T == 1) or bool [B or 1, 1, T, S]. Returns k, v [B, Hkv, P + S, hd] and mask None or bool [., 1, T, P + S].
    """

    def __init__(self, encoder: PrefixEncoder, layer: int):
        super().__init__()
        # A plain reference, not a submodule: the parameters are registered once, at model.prefix_encoder, not
        # repeated under every layer's name.
        object.__setattr__(self, "encoder", encoder)
        self.layer = layer

    def forward(
        self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, T: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        B, S = k.shape[0], k.shape[2]
        pk, pv = self.encoder.layer_kv(self.layer)  # [Hkv, P, hd]
        P = pk.shape[1]
        k = torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)  # [B, Hkv, P + S, hd]
        v = torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
        if mask is None and T > 1:
            # Causal with the offset SDPA's is_causal lacks: query i sees the prefix and real keys j <= S - T + i.
            i = torch.arange(T, device=k.device)[:, None]
            j = torch.arange(S, device=k.device)[None, :]
            mask = (j <= S - T + i)[None, None]  # [1, 1, T, S]
        elif mask is None:
            return k, v, None  # one query (decode): everything is visible, prefix included
        prefix_cols = torch.ones(*mask.shape[:-1], P, dtype=torch.bool, device=mask.device)
        return k, v, torch.cat([prefix_cols, mask], dim=-1)  # [., 1, T, P + S]


def apply_prefix(model: nn.Module, cfg: PrefixConfig, tokenizer=None) -> None:
    """Freeze the model and install trainable prefixes in every attention layer (in place)."""
    cfg.validate()
    if model.prefix_encoder is not None:
        raise PeftError("this model already has prefix tuning; load a fresh base model before applying again")
    freeze(model)
    c, w = model.config, model.embed_tokens.weight
    encoder = PrefixEncoder(
        cfg.num_virtual_tokens, c.n_layers, c.n_kv_heads, c.head_dim, cfg.projection, cfg.encoder_hidden_size
    ).to(w.device, w.dtype)
    model.prefix_encoder = encoder
    for i, layer in enumerate(model.layers):
        layer.self_attn.prefix = LayerPrefix(encoder, i)
    # PEFT feeds the prefix as a P-token past, so HF numbers the real tokens from P.
    model.position_offset = cfg.num_virtual_tokens


def _encoder(model: nn.Module) -> PrefixEncoder:
    encoder = model.prefix_encoder
    if encoder is None:
        raise PeftError("the model has no prefix tuning; call apply_prefix first")
    return encoder


def prefix_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"prompt_embeddings": [P, L*2*token_dim]}: the key/value table (a projection encoder is run once)."""
    with torch.no_grad():
        return {WEIGHTS_KEY: _encoder(model).table().detach()}


def prefix_adapter_config(model: nn.Module, cfg: PrefixConfig) -> dict:
    """adapter_config.json content with HF PEFT's PrefixTuningConfig fields (GQA: heads = the KV heads)."""
    c = model.config
    token_dim = c.n_kv_heads * c.head_dim
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "num_layers": c.n_layers,
        "num_attention_heads": c.n_kv_heads,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "prefix_projection": cfg.projection,
        "encoder_hidden_size": (cfg.encoder_hidden_size or token_dim) if cfg.projection else token_dim,
    }


def prefix_config_from_adapter(d: dict) -> PrefixConfig:
    """The config to apply before loading the folder's weights.

    The file holds the key/value table even for a projection adapter (PEFT saves the encoder's output), so the
    result is always a plain table config: `projection=False`.
    """
    errors = prompt_learning_config_errors(d, PEFT_TYPE, "prefixes")
    if errors:
        raise PeftError("unsupported prefix-tuning adapter_config.json: " + "; ".join(errors))
    cfg = PrefixConfig(num_virtual_tokens=d.get("num_virtual_tokens"))
    cfg.validate()
    return cfg


def load_prefix_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a saved `prompt_embeddings` table into a model prepared by apply_prefix(projection=False)."""
    encoder = _encoder(model)
    if encoder.projection:
        raise PeftError(
            "a saved prefix is the key/value table, which cannot be loaded into a projection encoder; "
            "apply the config from prefix_config_from_adapter (projection=False) instead"
        )
    copy_checked({WEIGHTS_KEY: encoder.embedding.weight}, tensors, "prefix-tuning")
