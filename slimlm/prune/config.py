"""PruneConfig: what `slimlm prune` and a compression chain's prune stage do, one field per flag / recipe key.

`slimlm prune` builds it from its flags (`recipe.add_command_flags`), `slimlm compress` from a YAML stage
(`recipe.from_dict`); both then call `prune_by_config`. This module holds no pruning code itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slimlm.errors import InputError

METHODS = ("magnitude", "wanda", "2:4", "4:8")
STRUCTURES = ("mlp", "heads", "layers")


@dataclass
class PruneConfig:
    """The settings of `slimlm prune` (see `slimlm prune --help`); set exactly one of method and structured."""

    # unstructured (magnitude, wanda) or N:M (2:4, 4:8) zeros (no speed-up on dense kernels)
    method: str | None = field(default=None, metadata={"choices": METHODS})
    # remove MLP channels, KV groups of heads, or layers (real removal)
    structured: str | None = field(default=None, metadata={"choices": STRUCTURES})
    sparsity: float = 0.5  # --method magnitude/wanda: fraction of weights zeroed
    # layer: every linear pruned to --sparsity; global: one magnitude threshold over all linears
    scope: str = field(default="layer", metadata={"choices": ("layer", "global")})
    nm_score: str = field(default="wanda", metadata={"choices": ("magnitude", "wanda")})  # --method 2:4/4:8: scores
    ratio: float = 0.25  # --structured mlp/heads: fraction of MLP channels / KV groups removed
    # --structured mlp/heads: rank units over all layers (layers lose different counts; only slimlm loads the
    # result) instead of the same count per layer
    non_uniform: bool = False
    multiple_of: int = 8  # --structured mlp: kept channels rounded to this
    n_drop: int = 4  # --structured layers: layers removed (lowest influence)
    # calibration text for wanda and --structured; None: the built-in corpus's calibration split (never the
    # held-out one)
    calib_file: str | None = None
    calib_samples: int = 32  # calibration sequences
    calib_seq_len: int = 512  # tokens per calibration sequence

    def validate(self) -> None:
        """Raise InputError naming the first bad setting (before the slow load)."""
        from slimlm.prune.structured import check_ratio
        from slimlm.prune.unstructured import check_sparsity

        if (self.method is None) == (self.structured is None):
            raise InputError(
                "set exactly one of method (magnitude, wanda, 2:4, 4:8) and structured (mlp, heads, layers)"
            )
        if self.method is not None and self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.structured is not None and self.structured not in STRUCTURES:
            raise InputError(f"unknown structure {self.structured!r}; choose one of {', '.join(STRUCTURES)}")
        if self.method in ("magnitude", "wanda"):
            check_sparsity(self.sparsity)
            if self.scope == "global" and self.method != "magnitude":
                raise InputError("--scope global is for --method magnitude (Wanda compares weights within a row)")
        if self.structured in ("mlp", "heads"):
            check_ratio(self.ratio, "MLP channels" if self.structured == "mlp" else "KV groups")
        if self.multiple_of < 1:
            raise InputError(f"--multiple-of must be >= 1, got {self.multiple_of}")

    @property
    def needs_calibration(self) -> bool:
        """Whether the scores need activations (wanda, and every structured removal)."""
        if self.structured:
            return True
        return self.method == "wanda" or (self.method in ("2:4", "4:8") and self.nm_score == "wanda")


def prune_by_config(model: Any, cfg: PruneConfig, calib: Any) -> dict:
    """Prune `model` in place as `cfg` says (calib: calibration token ids, when cfg.needs_calibration); returns
    the pruning API's summary."""
    from slimlm import prune

    if cfg.method in ("magnitude", "wanda"):
        return prune.prune_unstructured_(model, cfg.method, cfg.sparsity, calib, cfg.scope)
    if cfg.method:
        return prune.prune_nm_(model, cfg.method, cfg.nm_score, calib)
    if cfg.structured == "mlp":
        return prune.prune_mlp_channels_(model, cfg.ratio, calib, not cfg.non_uniform, cfg.multiple_of)
    if cfg.structured == "heads":
        return prune.prune_heads_(model, cfg.ratio, calib, not cfg.non_uniform)
    return prune.prune_layers_(model, cfg.n_drop, calib)
