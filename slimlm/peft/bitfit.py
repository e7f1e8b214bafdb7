"""BitFit (Ben Zaken et al. 2021): train only the bias terms (and optionally the RMSNorm gains) of the base model.

Llama has no biases, so BitFit *adds* zero-initialised biases to the target projections (the model starts as
exactly the base model); biases that exist already (Qwen2's q/k/v) are simply unfrozen. With `train_norms` the
RMSNorm gains (every block's two norms and the final norm) train too.

BitFit is mergeable: a bias is part of an ordinary linear layer, so `merge_bitfit` leaves a plain Transformer that
an HF config with `attention_bias` / `mlp_bias` describes.

Adapter folder (our own type; HF PEFT has no BitFit):
  adapter_config.json: {"peft_type": "SLIMLM_BITFIT", "targets": [...], "train_norms": bool}
  adapter_model.safetensors: slimlm parameter names, e.g. `layers.0.self_attn.q_proj.bias` [out_features],
    `layers.0.input_layernorm.weight` [dim], `norm.weight` [dim].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from slimlm.model import RMSNorm
from slimlm.peft.common import ALL_LINEARS, PeftError, copy_checked, freeze, resolve_targets, target_linears

PEFT_TYPE = "SLIMLM_BITFIT"
DEFAULT_TARGETS = ",".join(ALL_LINEARS)


@dataclass
class BitFitConfig:
    # Projections that get a trainable bias: comma-separated short names, a list, or "all-linear".
    targets: str | list[str] = DEFAULT_TARGETS
    train_norms: bool = False  # also train the RMSNorm gains

    def validate(self) -> None:
        """Raise one PeftError naming every bad field."""
        errors = []
        try:
            resolve_targets(self.targets)
        except PeftError as e:
            errors.append(f"targets: {e}")
        if not isinstance(self.train_norms, bool):
            errors.append(f"train_norms must be true or false, got {self.train_norms!r}")
        if errors:
            raise PeftError("invalid bitfit config: " + "; ".join(errors))


def _add_bias(linear: nn.Module, like: torch.Tensor) -> nn.Parameter:
    """The linear's bias, created as zeros [out_features] (dtype/device of `like`) when it has none."""
    if linear.bias is None:
        # Works for nn.Linear and NF4Linear alike: both add `self.bias` in forward when it is not None.
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=like.dtype, device=like.device))
    return linear.bias


def _norms(model: nn.Module) -> dict[str, nn.Parameter]:
    return {f"{name}.weight": m.weight for name, m in model.named_modules() if isinstance(m, RMSNorm)}


def apply_bitfit(model: nn.Module, cfg: BitFitConfig, tokenizer=None) -> None:
    """Freeze the model, then add (zero) or unfreeze the target biases, and the norm gains if cfg.train_norms."""
    cfg.validate()
    freeze(model)
    like = model.embed_tokens.weight
    for _, parent, attr in target_linears(model, resolve_targets(cfg.targets)):
        _add_bias(getattr(parent, attr), like).requires_grad_(True)
    if cfg.train_norms:
        for p in _norms(model).values():
            p.requires_grad_(True)
    # Recorded so that bitfit_state_dict and merge know the trained set without being handed the config again.
    model.bitfit_config = cfg


def _trained(model: nn.Module) -> dict[str, nn.Parameter]:
    cfg = model.bitfit_config
    if cfg is None:
        raise PeftError("the model has no BitFit applied; call apply_bitfit first")
    params = {
        f"{name}.bias": getattr(parent, attr).bias
        for name, parent, attr in target_linears(model, resolve_targets(cfg.targets))
    }
    if cfg.train_norms:
        params.update(_norms(model))
    return params


def bitfit_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained biases (and norm gains) under their slimlm parameter names."""
    return {k: p.detach() for k, p in _trained(model).items()}


def bitfit_adapter_config(model: nn.Module, cfg: BitFitConfig) -> dict:
    """adapter_config.json content: the peft_type plus the config fields (targets as a list)."""
    return {"peft_type": PEFT_TYPE, "targets": list(resolve_targets(cfg.targets)), "train_norms": cfg.train_norms}


def bitfit_config_from_adapter(d: dict) -> BitFitConfig:
    """Inverse of bitfit_adapter_config; PeftError for other adapter types or bad fields."""
    if d.get("peft_type") != PEFT_TYPE:
        raise PeftError(f"adapter_config.json has peft_type {d.get('peft_type')!r}, expected {PEFT_TYPE!r}")
    cfg = BitFitConfig(targets=list(d.get("targets", ALL_LINEARS)), train_norms=d.get("train_norms", False))
    cfg.validate()
    return cfg


def load_bitfit_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved biases / norm gains into a model prepared by apply_bitfit (same config)."""
    copy_checked(_trained(model), tensors, "BitFit")


def merge_bitfit(model: nn.Module) -> None:
    """Make the model a plain Transformer that an HF checkpoint can express (in place).

    Every q/k/v/o and gate/up/down projection gets a bias (zeros where none was trained), and the config says
    `attention_bias=True, mlp_bias=True`. HF's Qwen2 and Mistral classes cannot hold o_proj or MLP biases, so such
    models become `model_type="llama"` (the same architecture once biases are allowed everywhere); a sliding
    window, which Llama lacks, cannot be expressed and raises.
    """
    config = model.config
    if config.model_type != "llama" and config.sliding_window is not None:
        raise PeftError(
            f"cannot merge BitFit into a {config.model_type} model with a sliding window: only HF's "
            "Llama class holds biases on every projection, and it has no sliding window; "
            "keep the BitFit adapter separate instead"
        )
    like = model.embed_tokens.weight
    for _, parent, attr in target_linears(model, ALL_LINEARS):
        _add_bias(getattr(parent, attr), like)
    model.config = dataclasses.replace(config, attention_bias=True, mlp_bias=True, model_type="llama")
    model.bitfit_config = None
