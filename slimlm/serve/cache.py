"""The serving engine's KV cache: a fixed number of slots, one running sequence per slot.

Each slot is one row of max_len key/value positions per layer, so a sequence's keys stay contiguous and a decode
step over slots [0, n) reads the cache as a view, without gathering. Admission is by free slot, and a request is
admitted only if its prompt + max_tokens fit a slot, so a running sequence can never run out of cache. The last
position of every row is scratch: rows in [0, n) that are not decoding this step (free, or waiting for their next
prefill chunk) write their dummy token there and attend only to it, leaving real entries untouched.
"""

from __future__ import annotations

import torch

from slimlm.kv_cache import heads_list, kv_heads_per_layer


class SlotKVCache:
    def __init__(self, n_layers: int, n_slots: int, n_kv_heads: int | list[int], head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        # n_kv_heads: one count for every layer, or a list with each layer's (structurally pruned models).
        # +1: the scratch position
        shapes = [(n_slots, h, max_len + 1, head_dim) for h in heads_list(n_kv_heads, n_layers)]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.n_slots, self.max_len = n_slots, max_len
        self.free = list(range(n_slots))

    @classmethod
    def for_model(cls, model: torch.nn.Module, n_slots: int, max_len: int) -> "SlotKVCache":
        c = model.config
        return cls(c.n_layers, n_slots, kv_heads_per_layer(c), c.head_dim, max_len, model.dtype, model.device)

    @property
    def scratch(self) -> int:
        return self.max_len

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def allocate(self) -> int | None:
        """The lowest free slot (keeps busy slots packed at the front, so decode batches stay small), or None."""
        if not self.free:
            return None
        self.free.sort()
        return self.free.pop(0)

    def release(self, slot: int) -> None:
        if slot in self.free:
            raise ValueError(f"slot {slot} is already free")
        self.free.append(slot)

    def usage(self) -> float:
        """Fraction of slots in use (vllm:kv_cache_usage_perc)."""
        return 1.0 - len(self.free) / self.n_slots

    def batch(self, n_rows: int, positions: torch.Tensor, row_offset: int = 0) -> "SlotBatch":
        """A view for one forward over slots [row_offset, row_offset + n_rows) with tokens at positions [B, T]."""
        return SlotBatch(self, row_offset, n_rows, positions)


class SlotBatch:
    """What the model reads and writes for one forward; passed as `cache` with cache_pos = positions [B, T].

    Row b is slot row_offset + b. A position equal to the cache's scratch index marks a row with no work this step.
    """

    def __init__(self, cache: SlotKVCache, row_offset: int, n_rows: int, positions: torch.Tensor):
        self.cache, self.rows = cache, slice(row_offset, row_offset + n_rows)
        self.positions = positions  # [B, T]
        self.idle = positions[:, -1] == cache.scratch  # [B]
        # Eager attention reads keys [0, kv_len); idle rows need the scratch position too.
        self._kv_len = cache.scratch + 1 if bool(self.idle.any()) else int(positions.max()) + 1

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's cache rows of this batch (k, v) [B, Hkv, S, hd], views."""
        return self.cache.k[i][self.rows], self.cache.v[i][self.rows]

    def filled_len(self, cache_pos: torch.Tensor) -> int:
        return self._kv_len

    def positions_and_mask(self, cache_pos: torch.Tensor, sliding_window: int | None = None,
                           kv_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE positions [B, T] (idle rows: 0) and the mask [B, 1, T, S]: each query sees its own earlier keys."""
        S = kv_len if kv_len is not None else self.cache.scratch + 1
        q = cache_pos[:, :, None]  # [B, T, 1]
        k = torch.arange(S, device=cache_pos.device)[None, None, :]  # [1, 1, S]
        mask = k <= q
        if sliding_window is not None:
            mask = mask & (k > q - sliding_window)
        idle = self.idle[:, None, None]
        mask = torch.where(idle, k == self.cache.scratch, mask & (k < self.cache.scratch))
        positions = torch.where(self.idle[:, None], 0, cache_pos)
        return positions, mask[:, None]

    def update(self, layer: int, cache_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, T, hd] at each row's positions; return the rows' caches [B, Hkv, S, hd] (views)."""
        K, V = self.cache.k[layer][self.rows], self.cache.v[layer][self.rows]
        b = torch.arange(K.shape[0], device=k.device)[:, None]  # [B, 1], broadcast against cache_pos [B, T]
        # Advanced indices on dims 0 and 2 put the indexed dims first: the target is [B, T, Hkv, hd].
        K[b, :, cache_pos] = k.transpose(1, 2)
        V[b, :, cache_pos] = v.transpose(1, 2)
        return K, V
