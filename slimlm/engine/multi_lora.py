"""Batched multi-LoRA for serving: each batch row may use a different LoRA adapter, or none, in one forward pass.

As in punica/vLLM, every target projection holds a fixed number of adapter *slots* of one `max_rank`: stacked A
[n_slots + 1, max_rank, in] and B^T [n_slots + 1, max_rank, out] (scaling folded into B, smaller ranks zero-padded,
the extra last slot always zero for rows without an adapter). A step runs every row through all slots' A at once
(one GEMM), zeroes all but each row's own slot with a one-hot row mask, and adds the result times all slots' B
(a second GEMM) — no merging, no adapter-after-adapter loop; rows without an adapter are left out of both GEMMs.
This reads each slot's weights once per step, where gathering A and B per row would copy them once per row: with 16
rows over 4 adapters, 4x less memory traffic. Loading writes into the slot buffers in place, so adapters come and go
between engine steps. `AdapterLRU` decides which adapter sits in which slot. This module does not schedule requests or
read files other than HF PEFT LoRA adapter folders; DoRA and other PEFT methods are refused (merge them and serve the
merged model).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from slimlm.errors import InputError
from slimlm.peft.common import (
    ALL_LINEARS,
    PEFT_PREFIX,
    PeftError,
    read_adapter_files,
    resolve_targets,
    target_linears,
)
from slimlm.peft.lora import lora_config_from_adapter


@dataclass
class SlotSelection:
    """Per-row slots shared by every SlotLoRALinear of a model; index None = no adapter in this step."""

    rows: torch.Tensor | None = None  # [B] slot per row, -1 = none
    index: torch.Tensor | None = None  # [B] the same with -1 mapped to the zero slot
    onehot: torch.Tensor | None = None  # [R, n_slots + 1] 1.0 at each adapter row's slot (forward multiplies by it)
    active: torch.Tensor | None = None  # [R] the rows that use an adapter; None = every row does (R = B)


class SlotLoRALinear(nn.Module):
    """A frozen base projection plus `n_slots` LoRA slots; the rows' slots are read from the shared selection."""

    def __init__(
        self,
        base: nn.Module,
        selection: SlotSelection,
        n_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()
        self.base, self.selection = base, selection
        # Not persistent: the model's state dict stays the base model's; slots are filled by LoraSlots.load.
        self.register_buffer(
            "A", torch.zeros(n_slots + 1, max_rank, base.in_features, dtype=dtype, device=device), persistent=False
        )
        # B is stored transposed, [slots, r, out]: all slots' B^T is one [slots * r, out] matrix without a copy, and
        # the fused CPU decode step (kernels/decode.cpp) adds h_j * B^T[slot, j, :] over contiguous output columns.
        self.register_buffer(
            "B", torch.zeros(n_slots + 1, max_rank, base.out_features, dtype=dtype, device=device), persistent=False
        )

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # x [B, T, in] -> y [B, T, out]
        onehot = self.selection.onehot
        if onehot is None:
            return y
        active = self.selection.active
        xa = x if active is None else x[active]  # only the rows that use an adapter: [R, T, in]
        R, T, _ = xa.shape
        S, r = self.A.shape[0], self.A.shape[1]
        h = xa.reshape(R * T, -1).to(self.A.dtype) @ self.A.view(S * r, -1).T  # every slot's x A^T: [R*T, S*r]
        h = (h.view(R, T, S, r) * onehot[:, None, :, None]).view(R * T, S * r)  # keep each row's own slot
        if active is None:
            out = torch.addmm(y.reshape(R * T, -1), h.to(y.dtype), self.B.view(S * r, -1).to(y.dtype))  # y + h B^T
            return out.view(y.shape)
        delta = (h.to(y.dtype) @ self.B.view(S * r, -1).to(y.dtype)).view(R, T, -1)  # [R, T, out]
        return y.index_add(0, active, delta)


class LoraSlots:
    """The slots of one model: load an adapter into a slot, clear it, and choose each row's slot per step."""

    def __init__(self, layers: dict[str, SlotLoRALinear], selection: SlotSelection, n_slots: int, max_rank: int):
        self.layers, self.selection, self.n_slots, self.max_rank = layers, selection, n_slots, max_rank
        self.occupied: set[int] = set()

    @classmethod
    def attach(
        cls, model: nn.Module, n_slots: int, max_rank: int, targets: str | tuple[str, ...] = ALL_LINEARS
    ) -> LoraSlots:
        """Put a SlotLoRALinear in each target projection of `model`; returns the manager (also `model.lora_slots`)."""
        errors = [
            m
            for ok, m in (
                (n_slots >= 1, f"n_slots must be >= 1, got {n_slots}"),
                (max_rank >= 1, f"max_rank must be >= 1, got {max_rank}"),
            )
            if not ok
        ]
        if model.lora_slots is not None:
            errors.append("the model already has LoRA slots attached")
        if errors:
            raise PeftError("; ".join(errors))
        # Slots compute in the model's activation dtype (the base weight may be quantized).
        sel, dtype, device = SlotSelection(), model.dtype, model.device
        layers = {}
        for name, parent, attr in target_linears(model, resolve_targets(targets)):
            layers[name] = SlotLoRALinear(getattr(parent, attr), sel, n_slots, max_rank, dtype, device)
            setattr(parent, attr, layers[name])
        model.lora_slots = cls(layers, sel, n_slots, max_rank)
        return model.lora_slots

    def load(self, slot: int, adapter: str | Path | tuple[dict, dict[str, torch.Tensor]]) -> None:
        """Write a LoRA adapter (HF PEFT folder, or (adapter_config dict, tensors)) into `slot`, in place.

        Everything is checked before anything is written, so a refused adapter leaves the slot as it was.
        """
        self._check_slot(slot)
        raw, tensors = read_adapter_files(adapter) if isinstance(adapter, (str, Path)) else adapter
        what = str(adapter) if isinstance(adapter, (str, Path)) else "adapter"
        if raw.get("peft_type") != "LORA":
            raise PeftError(f"{what}: peft_type {raw.get('peft_type')!r}; only LoRA adapters can be served from slots")
        cfg = lora_config_from_adapter(raw)
        if cfg.use_dora:
            raise PeftError(
                f"{what} is a DoRA adapter, which slots cannot run (its magnitude rescales the base "
                "output); fold it into the base with `slimlm merge` and serve the merged model"
            )
        options = [o for o in ("rank_pattern", "alpha_pattern", "lora_bias", "modules_to_save") if getattr(cfg, o)]
        if options:  # slots hold one rank and scaling per adapter and only A/B matrices
            raise PeftError(
                f"{what} uses {', '.join(options)}, which slots cannot run (per-module rank/scaling, "
                "a bias on B, whole replaced modules); fold it into the base with `slimlm merge` and "
                "serve the merged model (generate, chat and eval run it as is with --adapter)"
            )
        if cfg.r > self.max_rank:
            raise PeftError(
                f"{what} has rank {cfg.r} but the slots' max_rank is {self.max_rank}; "
                f"attach the slots with max_rank >= {cfg.r}"
            )
        pairs = self._pairs(what, tensors, cfg.r)
        with torch.no_grad():
            for name, layer in self.layers.items():
                layer.A[slot].zero_()
                layer.B[slot].zero_()
                if name in pairs:
                    a, b = pairs[name]
                    layer.A[slot, : cfg.r].copy_(a)
                    layer.B[slot, : cfg.r].copy_(b.float().T * cfg.scaling)  # copy_ casts to the slot dtype
        self.occupied.add(slot)

    def _pairs(
        self, what: str, tensors: dict[str, torch.Tensor], r: int
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{layer name: (A [r, in], B [out, r])} from PEFT keys, collecting every unknown key and bad shape."""
        found, unknown, bad = {}, [], []
        for key, t in tensors.items():
            name, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            if not key.startswith(PEFT_PREFIX) or name not in self.layers or part not in ("A.weight", "B.weight"):
                unknown.append(key)
                continue
            found.setdefault(name, {})[part[0]] = t
        for name, ab in sorted(found.items()):
            layer = self.layers[name]
            if set(ab) != {"A", "B"}:
                bad.append(f"{name} has lora_{''.join(ab)} only")
                continue
            a, b = ab["A"], ab["B"]
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                bad.append(
                    f"{name} expects in={layer.in_features}, out={layer.out_features}, "
                    f"got in={a.shape[1]}, out={b.shape[0]}"
                )
            if a.shape[0] != r or b.shape[1] != r:
                bad.append(f"{name} has rank {a.shape[0]}/{b.shape[1]} but adapter_config.json says r={r}")
        errors = []
        if unknown:
            errors.append(
                f"unknown keys {sorted(unknown)[:4]} (+{max(len(unknown) - 4, 0)} more); the slots hold "
                f"lora_A/lora_B of {sorted({n.rsplit('.', 1)[1] for n in self.layers})} only"
            )
        if bad:
            errors.append("adapter was trained for a different base model: " + "; ".join(bad[:4]))
        if errors:
            raise PeftError(f"{what}: " + "; ".join(errors))
        return {n: (ab["A"], ab["B"]) for n, ab in found.items()}

    def clear(self, slot: int) -> None:
        """Zero `slot` (rows selecting it would run the base model)."""
        self._check_slot(slot)
        with torch.no_grad():
            for layer in self.layers.values():
                layer.A[slot].zero_()
                layer.B[slot].zero_()
        self.occupied.discard(slot)

    def set_rows(self, rows: list[int | None] | None) -> None:
        """Row b of the next forwards uses slot rows[b] (None: no adapter); None or all-None skips the slots."""
        if rows is None or all(r is None for r in rows):
            self.selection.rows = self.selection.index = self.selection.onehot = self.selection.active = None
            return
        empty = sorted({r for r in rows if r is not None and r not in self.occupied})
        if empty:
            raise PeftError(
                f"rows select slots {empty}, which hold no adapter; load one first "
                f"(loaded slots: {sorted(self.occupied)})"
            )
        device = next(iter(self.layers.values())).A.device
        t = torch.tensor([-1 if r is None else r for r in rows], dtype=torch.long)
        self.selection.rows = t.to(device)
        self.selection.index = torch.where(t < 0, self.n_slots, t).to(device)  # -1 -> the always-zero slot
        dtype = next(iter(self.layers.values())).A.dtype
        onehot = torch.nn.functional.one_hot(self.selection.index, self.n_slots + 1).to(dtype)  # [B, S + 1]
        # Rows without an adapter skip the slot GEMMs entirely (their LoRA term is zero).
        uses = t >= 0
        self.selection.active = None if bool(uses.all()) else uses.nonzero()[:, 0].to(device)
        self.selection.onehot = onehot if self.selection.active is None else onehot[self.selection.active]

    @contextmanager
    def select(self, rows: list[int | None] | None):
        """set_rows for the duration of the block, then the previous selection again."""
        sel = self.selection
        previous = (sel.rows, sel.index, sel.onehot, sel.active)
        self.set_rows(rows)
        try:
            yield
        finally:
            sel.rows, sel.index, sel.onehot, sel.active = previous

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.n_slots:
            raise PeftError(f"slot {slot} out of range; this model has slots 0..{self.n_slots - 1}")


class SlotsBusy(RuntimeError):
    """Every slot holds an adapter that running requests use; the request must wait until one is released."""


class AdapterLRU:
    """Which adapter (any hashable key) sits in which slot; unpinned adapters are evicted least recently used first.

    `acquire` pins an adapter (one count per running request), `release` unpins it. Single-threaded by design:
    the engine calls it from its own loop.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise InputError(f"AdapterLRU capacity must be >= 1 (the number of LoRA slots), got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, list[int]] = OrderedDict()  # key -> [slot, pin count], LRU first

    def acquire(self, key: Hashable, loader: Callable[[int], None]) -> int:
        """The slot of `key`, pinned; on a miss `loader(slot)` fills a free or the least recently used idle slot."""
        if key in self._entries:
            self._entries.move_to_end(key)
            self._entries[key][1] += 1
            return self._entries[key][0]
        free = sorted(set(range(self.capacity)) - {s for s, _ in self._entries.values()})
        if free:
            slot = free[0]
        else:
            victim = next((k for k, (_, pins) in self._entries.items() if pins == 0), None)
            if victim is None:
                raise SlotsBusy(
                    f"all {self.capacity} LoRA slots hold adapters in use ({list(self._entries)}); "
                    f"keep the request for {key!r} waiting until one is released"
                )
            slot = self._entries.pop(victim)[0]
        loader(slot)  # if it raises, the slot simply stays free
        self._entries[key] = [slot, 1]
        return slot

    def release(self, key: Hashable) -> None:
        """Drop one pin of `key` (it stays loaded, and is evicted only when a slot is needed)."""
        entry = self._entries.get(key)
        if entry is None or entry[1] == 0:
            raise KeyError(f"release({key!r}) without a matching acquire")
        entry[1] -= 1

    def unload(self, key: Hashable) -> int:
        """Forget `key` and return its now free slot (callers may LoraSlots.clear it); pinned adapters refuse."""
        if key not in self._entries:
            raise KeyError(f"adapter {key!r} is not loaded; loaded: {list(self._entries)}")
        slot, pins = self._entries[key]
        if pins:
            raise SlotsBusy(f"adapter {key!r} is in use by {pins} running request(s); release them first")
        del self._entries[key]
        return slot

    def slot_of(self, key: Hashable) -> int | None:
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def pins(self, key: Hashable) -> int:
        return self._entries[key][1] if key in self._entries else 0

    def loaded(self) -> list[Hashable]:
        """Loaded adapter keys, least recently used first."""
        return list(self._entries)
