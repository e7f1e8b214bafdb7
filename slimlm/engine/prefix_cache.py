"""Automatic prefix caching: KV blocks of earlier sequences, found again by the hash of their tokens.

As in vLLM's automatic prefix caching, a sequence is cut into blocks of `block_size` tokens and block i is named by
a hash of (block i-1's hash, the adapter, block i's tokens), so one hash stands for the whole prefix up to the end
of its block, and a prefix cached for one LoRA adapter is never used for another. A new request looks up its
prompt's blocks in order and stops at the first miss; the hit blocks' keys and values are copied into its cache
slot, and prefill starts after them. The last prompt token is always computed (its logits pick the first token).

Unlike vLLM, whose slots *are* blocks shared in place, the engine's slots are contiguous rows (engine/cache.py:
decode attends over a view, with no gather), so the cache here is a separate pool and a hit costs one copy —
about a millisecond for a few hundred tokens of SmolLM2, against tens to hundreds of milliseconds of prefill.
Blocks are stored when a request's prompt is in the cache and again, with its generated tokens, when it finishes
(a chat's next turn then hits its history). When the pool is full the least recently used block is evicted; a
lookup touches a chain from its last block to its first, so chains lose their tails before their heads.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

import torch

from slimlm.engine.cache import SlotKVCache
from slimlm.errors import InputError


def block_hashes(tokens: Sequence[int], block_size: int, adapter: Hashable = None) -> list[int]:
    """Chained hashes of every full block of `tokens` (a partial last block has none)."""
    hashes, h = [], hash(("slimlm-prefix", adapter))
    for i in range(0, len(tokens) - block_size + 1, block_size):
        h = hash((h, tuple(tokens[i : i + block_size])))
        hashes.append(h)
    return hashes


class PrefixCache:
    """A pool of `n_blocks` KV blocks (per layer: k, v [n_blocks, Hkv, block_size, hd]) with an LRU index."""

    def __init__(self, cache: SlotKVCache, n_blocks: int, block_size: int = 16):
        if n_blocks < 1 or block_size < 1:
            raise InputError(f"prefix cache needs n_blocks >= 1 and block_size >= 1, got {n_blocks}, {block_size}")
        self.block_size, self.n_blocks = block_size, n_blocks
        self.k = [
            torch.empty(n_blocks, t.shape[1], block_size, t.shape[3], dtype=t.dtype, device=t.device) for t in cache.k
        ]
        self.v = [torch.empty_like(t) for t in self.k]
        self.index: OrderedDict[int, int] = OrderedDict()  # block hash -> pool block, least recently used first
        self.free = list(range(n_blocks))
        self.queries = self.hits = 0  # prompt tokens looked up / found (vllm:prefix_cache_queries / _hits)

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def lookup(self, tokens: Sequence[int], adapter: Hashable = None) -> list[int]:
        """Pool blocks holding the longest cached prefix of `tokens`, leaving at least the last token to compute."""
        usable = (len(tokens) - 1) // self.block_size
        found = []
        for h in block_hashes(tokens[: usable * self.block_size], self.block_size, adapter):
            block = self.index.get(h)
            if block is None:
                break
            found.append((h, block))
        for h, _ in reversed(found):  # tails first, so the chain's head ends most recently used
            self.index.move_to_end(h)
        self.queries += len(tokens)
        self.hits += len(found) * self.block_size
        return [b for _, b in found]

    def load(self, blocks: list[int], cache: SlotKVCache, slot: int) -> int:
        """Copy pool blocks into positions [0, n) of a cache slot; returns n (tokens now in the slot)."""
        if not blocks:
            return 0
        n, ids = len(blocks) * self.block_size, torch.tensor(blocks, device=self.k[0].device)
        for pool, rows in ((self.k, cache.k), (self.v, cache.v)):
            for p, r in zip(pool, rows):
                # [nb, Hkv, bs, hd] -> [Hkv, nb * bs, hd]
                r[slot, :, :n] = p[ids].transpose(0, 1).reshape(p.shape[1], n, p.shape[3])
        return n

    def store(self, tokens: Sequence[int], cache: SlotKVCache, slot: int, adapter: Hashable = None) -> None:
        """Add every full block of `tokens` (whose keys/values are in positions [0, len) of the slot) not yet cached."""
        for i, h in enumerate(block_hashes(tokens, self.block_size, adapter)):
            if h in self.index:
                self.index.move_to_end(h)
                continue
            block = self._take_block()
            a = i * self.block_size
            for pool, rows in ((self.k, cache.k), (self.v, cache.v)):
                for p, r in zip(pool, rows):
                    p[block] = r[slot, :, a : a + self.block_size]
            self.index[h] = block

    def _take_block(self) -> int:
        if self.free:
            return self.free.pop()
        _, block = self.index.popitem(last=False)  # evict the least recently used
        return block

    def clear(self) -> None:
        self.free = list(range(self.n_blocks))
        self.index.clear()
