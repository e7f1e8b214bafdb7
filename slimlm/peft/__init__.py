"""Parameter-efficient fine-tuning: one registry of methods, each a small module with the same few functions.

A method module exports a config dataclass and: `apply_x(model, cfg, tokenizer)` (freeze the base, add or unfreeze
exactly what trains), `x_state_dict(model)` (trainables under the file's key names), `x_adapter_config(model, cfg)`
and `x_config_from_adapter(d)` (adapter_config.json both ways), `load_x_state_dict(model, tensors)` and, where the
method can be folded into the base weights, `merge_x(model)`. Registering a method is one entry in PEFT_METHODS.

Every method except `full` accepts an NF4 base (`nf4_base=True`); `qlora` is `lora` with it on. Merging: LoRA,
DoRA, QLoRA (base dequantized first) and BitFit merge; bottleneck adapters, prefixes and soft prompts cannot (they
are not linear in the base weights) and stay attached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimlm.peft import adapter, bitfit, lora, prefix, prompt
from slimlm.peft.common import (
    PeftError,
    TrainableSummary,
    read_adapter_files,
    read_adapter_metadata,
    save_adapter_files,
    trainable_summary,
)
from slimlm.quantize.nf4 import quantize_model_nf4_


@dataclass
class FullConfig:
    """Full fine-tuning: every parameter trains (the result is saved as a whole model folder, not an adapter)."""

    def validate(self) -> None:
        pass


def apply_full(model: nn.Module, cfg: FullConfig, tokenizer: Any = None) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


@dataclass(frozen=True)
class PeftMethod:
    config_cls: type
    apply: Callable
    state_dict: Callable | None = None
    adapter_config: Callable | None = None
    config_from_adapter: Callable | None = None
    load_state_dict: Callable | None = None
    merge: Callable | None = None
    peft_type: str = ""  # adapter_config.json "peft_type" this method writes and reads


_LORA = dict(
    config_cls=lora.LoraConfig,
    apply=lora.apply_lora,
    state_dict=lora.lora_state_dict,
    adapter_config=lora.lora_adapter_config,
    config_from_adapter=lora.lora_config_from_adapter,
    load_state_dict=lora.load_lora_state_dict,
    merge=lambda m: _merge_lora(m),
    peft_type="LORA",
)  # lambda: defined below

PEFT_METHODS: dict[str, PeftMethod] = {
    "full": PeftMethod(FullConfig, apply_full),
    "lora": PeftMethod(**_LORA),
    "qlora": PeftMethod(**_LORA),  # = lora on an NF4 base
    "adapter": PeftMethod(
        adapter.AdapterConfig,
        adapter.apply_adapter,
        adapter.adapter_state_dict,
        adapter.adapter_adapter_config,
        adapter.adapter_config_from_adapter,
        adapter.load_adapter_state_dict,
        peft_type="SLIMLM_BOTTLENECK_ADAPTER",
    ),
    "bitfit": PeftMethod(
        bitfit.BitFitConfig,
        bitfit.apply_bitfit,
        bitfit.bitfit_state_dict,
        bitfit.bitfit_adapter_config,
        bitfit.bitfit_config_from_adapter,
        bitfit.load_bitfit_state_dict,
        bitfit.merge_bitfit,
        peft_type="SLIMLM_BITFIT",
    ),
    "prefix": PeftMethod(
        prefix.PrefixConfig,
        prefix.apply_prefix,
        prefix.prefix_state_dict,
        prefix.prefix_adapter_config,
        prefix.prefix_config_from_adapter,
        prefix.load_prefix_state_dict,
        peft_type="PREFIX_TUNING",
    ),
    "prompt": PeftMethod(
        prompt.PromptConfig,
        prompt.apply_prompt,
        prompt.prompt_state_dict,
        prompt.prompt_adapter_config,
        prompt.prompt_config_from_adapter,
        prompt.load_prompt_state_dict,
        peft_type="PROMPT_TUNING",
    ),
}
METHOD_OF_PEFT_TYPE = {
    "LORA": "lora",
    "SLIMLM_BOTTLENECK_ADAPTER": "adapter",
    "SLIMLM_BITFIT": "bitfit",
    "PREFIX_TUNING": "prefix",
    "PROMPT_TUNING": "prompt",
}


@dataclass
class PeftState:
    """What was applied to a model, kept on it as `model.peft`."""

    method: str
    config: Any
    nf4_base: bool = False


def get_method(name: str) -> PeftMethod:
    if name not in PEFT_METHODS:
        raise PeftError(f"unknown fine-tuning method {name!r}; choose from {', '.join(PEFT_METHODS)}")
    return PEFT_METHODS[name]


def make_config(method: str, values: dict[str, Any] | None = None) -> Any:
    """The method's config dataclass from a dict (YAML/CLI), refusing unknown keys by name."""
    cls = get_method(method).config_cls
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise PeftError(f"{method} has no option(s) {unknown}; its options are {sorted(known) or 'none'}")
    cfg = cls(**values)
    cfg.validate()
    return cfg


def apply_peft(
    model: nn.Module, method: str, cfg: Any = None, tokenizer: Any = None, nf4_base: bool = False
) -> TrainableSummary:
    """Prepare `model` for fine-tuning with `method`; returns the trainable-parameter summary."""
    m = get_method(method)
    cfg = cfg if cfg is not None else make_config(method)
    cfg.validate()
    nf4_base = nf4_base or method == "qlora"
    if nf4_base and method == "full":
        raise PeftError("full fine-tuning trains every weight, so it cannot use an NF4 (frozen 4-bit) base")
    if model.peft is not None:
        raise PeftError(f"the model already has a {model.peft.method} adapter; load a fresh base model")
    if nf4_base:
        quantize_model_nf4_(model)
    m.apply(model, cfg, tokenizer)
    model.peft = PeftState(method, cfg, nf4_base)
    return trainable_summary(model)


def save_adapter(
    model: nn.Module,
    folder: str | Path,
    base_model: str | Path | None = None,
    tokenizer: Any = None,
    base_name: str | None = None,
) -> Path:
    """Write the model's adapter as adapter_config.json + adapter_model.safetensors (+ tokenizer), atomically.

    base_model is what the model was loaded from; adapter_config.json's base_model_name_or_path gets its resolved
    form (an alias's hub id, a folder's absolute path), so HF PEFT's AutoPeftModel finds it. base_name, if given,
    is written instead, as is (e.g. the hub id a local copy came from).
    """
    from slimlm.checkpoint import base_model_name

    state = _peft_state(model)
    m = get_method(state.method)
    if m.state_dict is None:
        raise PeftError(f"{state.method} fine-tuning has no adapter; save the whole model folder instead")
    name = base_name or (base_model_name(base_model) if base_model is not None else None)
    config = {**m.adapter_config(model, state.config), "base_model_name_or_path": name}
    metadata = {"slimlm_method": state.method, "slimlm_nf4_base": str(state.nf4_base).lower()}
    return save_adapter_files(folder, config, m.state_dict(model), metadata, tokenizer)


def read_adapter_config(folder: str | Path) -> tuple[str, Any, dict]:
    """(method, config, raw adapter_config.json) of an adapter folder, without touching the weights."""
    raw, _ = read_adapter_files(folder)
    peft_type = raw.get("peft_type")
    if peft_type not in METHOD_OF_PEFT_TYPE:
        raise PeftError(
            f"{folder}: adapter peft_type {peft_type!r} is not one slimlm loads ({', '.join(METHOD_OF_PEFT_TYPE)})"
        )
    method = read_adapter_metadata(folder).get("slimlm_method") or METHOD_OF_PEFT_TYPE[peft_type]
    where = Path(folder) / "adapter_config.json"
    try:
        cfg = get_method(method).config_from_adapter(raw)
        cfg.validate()
    except PeftError as e:
        raise PeftError(f"{where}: {e}") from None
    except (TypeError, KeyError, ValueError) as e:  # a value of the wrong type or a missing key in the file
        what = f"missing key {e}" if isinstance(e, KeyError) else f"a value has the wrong type ({e})"
        raise PeftError(f"{where}: {what}; fix the file or save the adapter again") from None
    return method, cfg, raw


def load_adapter(model: nn.Module, folder: str | Path, tokenizer: Any = None, nf4_base: bool | None = None) -> str:
    """Attach the adapter in `folder` (ours or HF PEFT's) to a base model; returns the method name.

    nf4_base: None = as it was trained (NF4 for qlora and for adapters saved with an NF4 base), False = on the
    full-precision base, True = quantize the base to NF4 first.
    """
    method, cfg, _ = read_adapter_config(folder)
    _, tensors = read_adapter_files(folder)
    if nf4_base is None:
        nf4_base = method == "qlora" or read_adapter_metadata(folder).get("slimlm_nf4_base") == "true"
    if method == "qlora" and not nf4_base:
        method = "lora"  # qlora is lora on an NF4 base
    apply_peft(model, method, cfg, tokenizer, nf4_base=nf4_base)
    try:
        get_method(method).load_state_dict(model, tensors)
    except PeftError as e:  # name the folder: the message alone does not say which adapter did not fit
        raise PeftError(f"{folder}: {e}") from None
    for p in model.parameters():
        p.requires_grad_(False)
    return method


def merge_adapter(model: nn.Module) -> None:
    """Fold the adapter into the base weights, leaving a plain Transformer (methods that cannot merge refuse)."""
    state = _peft_state(model)
    m = get_method(state.method)
    if m.merge is None:
        raise PeftError(
            f"{state.method} cannot be merged into the base weights (it is not a change of the "
            "linear weights); keep it as an adapter and load it with --adapter"
        )
    m.merge(model)
    model.peft = None


def _merge_lora(model: nn.Module) -> None:
    lora.merge_lora(model, sorted(lora.lora_selection(model).names))
    lora.unload_lora(model)


def _peft_state(model: nn.Module) -> PeftState:
    state = model.peft
    if state is None:
        raise PeftError("the model has no adapter applied")
    return state


@torch.no_grad()
def logit_drift(before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    """Max |Δ logit| and mean KL(before || after) between two logit tensors [..., V]."""
    b, a = before.float().log_softmax(-1), after.float().log_softmax(-1)
    kl = (b.exp() * (b - a)).sum(-1).mean().item()
    return {"max_logit_diff": (before.float() - after.float()).abs().max().item(), "kl": kl}


__all__ = [
    "PEFT_METHODS",
    "PeftError",
    "PeftMethod",
    "PeftState",
    "TrainableSummary",
    "apply_peft",
    "get_method",
    "load_adapter",
    "logit_drift",
    "make_config",
    "merge_adapter",
    "read_adapter_config",
    "save_adapter",
    "trainable_summary",
]
