"""KVCache: a static key/value cache with one row per sequence, for prefill + decode.

Rows of different prompt lengths are left-padded so that all rows write the same cache slot at each step; `start`
[B] records where each row's real tokens begin, which masks the padding and shifts RoPE positions. Shapes never
change during a generation, so a compiled decode step is reused without recompiling.
This is not the paged cache the serving engine manages.
"""

from __future__ import annotations

import torch


def kv_heads_per_layer(config) -> list[int]:
    """KV head count of each layer of a ModelConfig (they differ after structured head pruning)."""
    return [config.layer_size(i)["n_kv_heads"] for i in range(config.n_layers)]


def heads_list(n_kv_heads: int | list[int], n_layers: int) -> list[int]:
    """One KV head count per layer: a single count repeated, or a per-layer list checked against n_layers."""
    heads = list(n_kv_heads) if isinstance(n_kv_heads, (list, tuple)) else [n_kv_heads] * n_layers
    if len(heads) != n_layers:
        raise ValueError(f"n_kv_heads lists {len(heads)} layers, the cache has {n_layers}")
    return heads


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int | list[int],
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        # n_kv_heads: one count for every layer, or a list with each layer's (structurally pruned models).
        shapes = [(batch_size, h, max_len, head_dim) for h in heads_list(n_kv_heads, n_layers)]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.start = torch.zeros(batch_size, dtype=torch.long, device=device)  # first real slot per row
        self.slots = torch.arange(max_len, device=device)
        self.padded = False  # any row left-padded? (a Python bool, read only in eager mode)

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int) -> KVCache:
        c = model.config
        return cls(c.n_layers, batch_size, kv_heads_per_layer(c), c.head_dim, max_len, model.dtype, model.device)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def reset(self, start: torch.Tensor | None = None) -> None:
        """Begin new sequences; start[b] = number of left-pad slots in row b. Old entries are masked, not zeroed."""
        self.start.copy_(start if start is not None else torch.zeros_like(self.start))
        self.padded = bool(self.start.any())

    def update(
        self, layer: int, cache_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, T, hd] into slots cache_pos [T]; return the whole layer cache [B, Hkv, S, hd]."""
        self.k[layer][:, :, cache_pos] = k
        self.v[layer][:, :, cache_pos] = v
        return self.k[layer], self.v[layer]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's whole cache (k, v) [B, Hkv, S, hd] (the ONNX Runtime backend reads the past from it)."""
        return self.k[i], self.v[i]

    def filled_len(self, cache_pos: torch.Tensor) -> int:
        """Slots [0, n) hold every key that queries in cache_pos [T] may see (eager attention slices to these)."""
        return int(cache_pos[-1]) + 1

    def positions_and_mask(
        self, cache_pos: torch.Tensor, sliding_window: int | None = None, kv_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """RoPE positions [B, T] and the boolean attention mask [B, 1, T, S] for queries in slots cache_pos [T].

        With kv_len (eager mode) the mask covers slots [0, kv_len) only, and is None where SDPA needs none: one new
        token, or a whole fresh prompt (causal), with no padding and no sliding window.
        """
        positions = (cache_pos[None, :] - self.start[:, None]).clamp(min=0)
        T = cache_pos.shape[0]
        if kv_len is not None and not self.padded and sliding_window is None and (T == 1 or T == kv_len):
            return positions, None
        q = cache_pos[None, :, None]  # [1, T, 1]
        k = self.slots[None, None, :kv_len]  # [1, 1, S]
        start = self.start[:, None, None]  # [B, 1, 1]
        mask = (k <= q) & (k >= start)
        if sliding_window is not None:
            mask = mask & (k > q - sliding_window)
        # A pad query sees no real key; let it see itself so its row stays finite (NaN would leak through 0*NaN).
        mask = mask | (k == q)
        return positions, mask[:, None]
