"""Calibration passes shared by the pruning methods: block inputs, forward hooks and activation statistics.

Two ways to see activations: `calibration_pass` runs the whole model once with hooks (structured importance is
measured on the unpruned model), and `BlockInputs` carries the calibration activations block by block (Wanda prunes
block i on the outputs of the already-pruned blocks before it, as the paper does). This module measures; it never
changes a weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from slimlm.errors import InputError
from slimlm.model import Transformer, rope_cos_sin

LINEAR_NAMES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def linears_of_block(block: nn.Module) -> dict[str, nn.Linear]:
    """The 7 prunable linears of a decoder block by name ("self_attn.q_proj", ...); never embeddings or lm_head."""
    out = {name: block.get_submodule(name) for name in LINEAR_NAMES}
    bad = [n for n, m in out.items() if type(m) is not nn.Linear]
    if bad:
        raise InputError(
            f"pruning needs plain nn.Linear layers, but {', '.join(bad)} are "
            f"{type(out[bad[0]]).__name__}: merge adapters and prune before quantizing"
        )
    return out


def check_calib_ids(calib_ids: torch.Tensor | None, what: str) -> torch.Tensor:
    """calib_ids must be token ids [samples, tokens >= 2]; `what` names the method that needs them."""
    if calib_ids is None:
        raise InputError(f"{what} needs calibration token ids [samples, tokens] (slimlm.eval.corpus.calibration_ids)")
    if calib_ids.ndim != 2 or calib_ids.shape[1] < 2 or calib_ids.dtype != torch.long:
        raise InputError(
            f"calibration ids must be a long tensor [samples, tokens >= 2], got "
            f"{calib_ids.dtype} {tuple(calib_ids.shape)}"
        )
    return calib_ids


@contextmanager
def forward_hooks(hooks: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Register (module, hook) forward hooks for the duration of a with-block."""
    handles = [m.register_forward_hook(h) for m, h in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def calibration_pass(model: Transformer, calib_ids: torch.Tensor, batch_size: int = 4) -> None:
    """Run the model's blocks over calibration ids [n, T] (hooks registered by the caller see every batch)."""
    model.eval()
    for i in range(0, calib_ids.shape[0], batch_size):
        model.hidden(calib_ids[i : i + batch_size].to(model.device))


class InputSqNorm:
    """Forward hook: sum over calibration tokens of x_j² per input column j of a linear ([in], fp32)."""

    def __init__(self, n_in: int):
        self.sq = torch.zeros(n_in)

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, in]
        self.sq += x.pow(2).sum(dim=0).cpu()

    @property
    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens, [in]."""
        return self.sq.sqrt()


class BlockInputs:
    """Calibration activations entering the current block, in batches [b, T, D]; `advance` moves them one block on."""

    def __init__(self, model: Transformer, calib_ids: torch.Tensor, batch_size: int = 4):
        T = calib_ids.shape[1]
        positions = torch.arange(T, device=model.device).expand(1, T)
        self.cos, self.sin = rope_cos_sin(model.inv_freq, positions, model.dtype)  # [1, 1, T, hd], shared
        ids = calib_ids.to(model.device)
        with torch.no_grad():
            self.xs = [model.embed_tokens(ids[i : i + batch_size]) for i in range(0, len(ids), batch_size)]

    @torch.no_grad()
    def run(self, block: nn.Module, i: int) -> list[torch.Tensor]:
        """Outputs [b, T, D] of block i (index i) on the current inputs (hooks on the block see them)."""
        return [block(x, self.cos, self.sin, None, None, i, None) for x in self.xs]

    def advance(self, block: nn.Module, i: int) -> None:
        """Replace the inputs by block i's outputs (call after pruning it, so the next block sees its error)."""
        self.xs = self.run(block, i)
