"""The engine's KV cache: a fixed number of slots, one running sequence per slot.

Each slot is one row of max_len key/value positions per layer (fp16 by default for a quantized fp32 model on a
CPU: see kv_cache_dtype), so a sequence's keys stay contiguous and a forward
over slots [a, a + n) reads the cache as a view, without gathering. Admission is by free slot, and a request is
admitted only if its prompt + max_tokens fit a slot, so a running sequence can never run out of cache.

Attention reads only the filled positions: a forward's key length is the longest row's position + 1, not max_len.
Rows in the forward that have no work this step (free slots, or a request waiting for its next prefill chunk) are
*idle*: their keys are not written, and their query attends to position 0 only (its output is thrown away), so an
idle row neither costs attention over empty slots nor disturbs real entries. Positions past a row's length hold
stale keys (a finished request's, or rejected speculative tokens): every query sees only positions <= its own,
and each position is written before a query at or past it runs, so stale keys are never read.
"""

from __future__ import annotations

import torch

from slimlm.errors import InputError
from slimlm.kv_cache import heads_list, kv_heads_per_layer
from slimlm.model import Transformer

KV_CACHE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def kv_cache_dtype(name: str, model: torch.nn.Module) -> torch.dtype:
    """The cache's element type for `model`: fp32 | fp16 | bf16, or auto = fp16 for slimlm's fp32 Transformer on a
    CPU with quantized weights (`slimlm serve`'s default, int8: half the bytes the decode step reads and stores, as
    llama.cpp's default cache; the model's attention upcasts what it reads), else the model's dtype — an unquantized
    fp32 model stays exact, and an ONNX Runtime graph's cache inputs are typed."""
    if name == "auto":
        narrow = (
            isinstance(model, Transformer)
            and model.dtype == torch.float32
            and model.device.type == "cpu"
            and bool(model.quantization)
        )
        return torch.float16 if narrow else model.dtype
    if name not in KV_CACHE_DTYPES:
        raise InputError(f"kv_cache_dtype must be auto or one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    return KV_CACHE_DTYPES[name]


class SlotKVCache:
    def __init__(
        self,
        n_layers: int,
        n_slots: int,
        n_kv_heads: int | list[int],
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        # n_kv_heads: one count for every layer, or a list with each layer's (structurally pruned models).
        shapes = [(n_slots, h, max_len, head_dim) for h in heads_list(n_kv_heads, n_layers)]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.n_slots, self.max_len = n_slots, max_len
        self.free = list(range(n_slots))

    @classmethod
    def for_model(cls, model: torch.nn.Module, n_slots: int, max_len: int, dtype: str = "auto") -> SlotKVCache:
        """A cache for `model`, its elements `dtype` (see kv_cache_dtype)."""
        c = model.config
        return cls(
            c.n_layers, n_slots, kv_heads_per_layer(c), c.head_dim, max_len, kv_cache_dtype(dtype, model), model.device
        )

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

    def batch(self, positions: torch.Tensor, row_offset: int = 0, idle: torch.Tensor | None = None) -> SlotBatch:
        """A view for one forward over slots [row_offset, row_offset + B) with tokens at positions [B, T].

        idle [B] bool marks rows with no work this step (None: every row works).
        """
        return SlotBatch(self, row_offset, positions, idle)


class SlotBatch:
    """What the model reads and writes for one forward; passed as `cache` with cache_pos = positions [B, T]."""

    def __init__(self, cache: SlotKVCache, row_offset: int, positions: torch.Tensor, idle: torch.Tensor | None):
        B = positions.shape[0]
        self.cache, self.rows = cache, slice(row_offset, row_offset + B)
        self.positions = positions  # [B, T]
        self.idle = idle if idle is not None and bool(idle.any()) else None  # [B] bool, or None: no idle row
        live = positions if self.idle is None else positions[~self.idle]
        self._kv_len = int(live.max()) + 1  # keys [0, kv_len) hold everything a working query may see
        if self.idle is not None:
            b = torch.arange(B, device=positions.device)
            self._write_rows = b[~self.idle][:, None]  # [W, 1]
            self._write_pos = positions[~self.idle]  # [W, T]
        # One row, or rows all at the same position, need no mask for a single new token; neither does a whole
        # prompt from position 0 (plain causal).
        T = positions.shape[1]
        uniform = self.idle is None and bool((positions[:, -1] == positions[0, -1]).all())
        self._maskless = uniform and (T == 1 or (T == self._kv_len and int(positions[0, 0]) == 0))
        self._same_pos = int(positions[0, 0]) if uniform and T == 1 else None  # decode at one shared position

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's cache rows of this batch (k, v) [B, Hkv, S, hd], views."""
        return self.cache.k[i][self.rows], self.cache.v[i][self.rows]

    def filled_len(self, cache_pos: torch.Tensor) -> int:
        return self._kv_len

    def positions_and_mask(
        self, cache_pos: torch.Tensor, sliding_window: int | None = None, kv_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """RoPE positions [B, T] (idle rows: 0) and the mask [B, 1, T, S] (None where SDPA needs none)."""
        if kv_len is not None and self._maskless and sliding_window is None:
            return cache_pos, None
        S = kv_len if kv_len is not None else self.cache.max_len
        q = cache_pos[:, :, None]  # [B, T, 1]
        k = torch.arange(S, device=cache_pos.device)[None, None, :]  # [1, 1, S]
        mask = k <= q
        if sliding_window is not None:
            mask = mask & (k > q - sliding_window)
        if self.idle is None:
            return cache_pos, mask[:, None]
        idle = self.idle[:, None, None]
        mask = torch.where(idle, k == 0, mask)  # an idle query sees position 0 only: finite, and thrown away
        return torch.where(self.idle[:, None], 0, cache_pos), mask[:, None]

    def update(
        self, layer: int, cache_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write working rows' k, v [B, Hkv, T, hd] at their positions; return the rows' caches [B, Hkv, S, hd]."""
        K, V = self.cache.k[layer][self.rows], self.cache.v[layer][self.rows]
        k, v = k.to(K.dtype), v.to(V.dtype)  # rounded to the cache's type (no copy when they match)
        if self.idle is None:
            p = self._same_pos
            if p is not None:  # every row writes the same single position: a plain slice, no index_put
                K[:, :, p : p + 1] = k
                V[:, :, p : p + 1] = v
                return K, V
            b = torch.arange(K.shape[0], device=k.device)[:, None]  # [B, 1], broadcast against cache_pos [B, T]
            # Advanced indices on dims 0 and 2 put the indexed dims first: the target is [B, T, Hkv, hd].
            K[b, :, cache_pos] = k.transpose(1, 2)
            V[b, :, cache_pos] = v.transpose(1, 2)
            return K, V
        work = ~self.idle
        K[self._write_rows, :, self._write_pos] = k[work].transpose(1, 2)
        V[self._write_rows, :, self._write_pos] = v[work].transpose(1, 2)
        return K, V
