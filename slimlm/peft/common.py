"""What every PEFT method shares: freezing the base, finding target layers, counting and saving trainables.

Adapter folders follow HF PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`. Methods HF PEFT has
(LoRA, DoRA, prefix and prompt tuning) use its key names and config fields, so PEFT loads them; our own methods
(bottleneck adapters, BitFit) use the same two files with a `peft_type` of their own.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from slimlm.checkpoint.atomic import atomic_folder
from slimlm.errors import InputError

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
ALL_LINEARS = ATTENTION_LINEARS + MLP_LINEARS
PEFT_PREFIX = "base_model.model.model."  # HF PEFT key of our `layers.0.x` is base_model.model.model.layers.0.x
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class PeftError(InputError):
    """A PEFT config, adapter folder or model that does not fit; the message says what to change."""


def resolve_targets(targets: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Target linear names: a list of short names (q_proj, ...) or "all-linear" (every projection in the blocks)."""
    if targets == "all-linear":
        return ALL_LINEARS
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in ALL_LINEARS]
    if unknown or not targets:
        raise PeftError(
            f"unknown target modules {unknown or targets}; choose from {', '.join(ALL_LINEARS)} or 'all-linear'"
        )
    return tuple(targets)


def target_linears(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Module, str]]:
    """(full name, parent module, attribute) of every target projection in the decoder blocks, in layer order."""
    found = []
    for i, layer in enumerate(model.layers):
        for parent_name, parent in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for attr in targets:
                if hasattr(parent, attr):
                    found.append((f"layers.{i}.{parent_name}.{attr}", parent, attr))
    return found


def freeze(model: nn.Module) -> None:
    """Freeze every parameter; a method then unfreezes (or adds) exactly what it trains."""
    for p in model.parameters():
        p.requires_grad_(False)


@dataclass
class TrainableSummary:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Count trainable and all parameters (shared tensors once; NF4 bases by their logical element count)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for m in model.modules():  # quantized bases keep their weights in buffers
        total += getattr(m, "num_weight_elements", 0)
    return TrainableSummary(trainable, total)


def save_adapter_files(
    folder: str | Path,
    adapter_config: dict,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    tokenizer=None,
) -> Path:
    """Write adapter_config.json + adapter_model.safetensors atomically.

    `metadata` (strings) goes into the safetensors header rather than adapter_config.json, whose unknown keys
    HF PEFT warns about.
    """
    with atomic_folder(folder) as tmp:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", **(metadata or {})})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
        if tokenizer is not None:  # so a server or PEFT user finds the (chat-templated) tokenizer with the adapter
            from slimlm.tokenizer import save_tokenizer

            save_tokenizer(tokenizer, tmp)  # readable by transformers 4.x too
    return Path(folder)


def read_adapter_files(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the safetensors weights of an adapter folder (pickled .bin adapters are refused).

    Both files are checked before use (JSON object; safetensors header against the file), so a truncated or
    corrupt adapter gives one error naming the file.
    """
    from slimlm.checkpoint.hf import load_safetensors
    from slimlm.jsonl import read_json_object

    folder = Path(folder)
    cfg_path, w_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        hint = (
            " (pickled adapter_model.bin is not loaded; re-save it as safetensors)"
            if (folder / "adapter_model.bin").exists()
            else ""
        )
        raise PeftError(f"{folder}: no {ADAPTER_CONFIG}; is this an adapter folder?{hint}")
    if not w_path.is_file():
        raise PeftError(f"{folder}: no {ADAPTER_WEIGHTS}")
    return read_json_object(cfg_path), load_safetensors(w_path)


def read_adapter_metadata(folder: str | Path) -> dict[str, str]:
    """The safetensors header metadata of an adapter folder ({} for adapters saved by other tools)."""
    from slimlm.checkpoint.hf import safetensors_metadata

    return safetensors_metadata(Path(folder) / ADAPTER_WEIGHTS)


def weight_of(linear: nn.Module) -> torch.Tensor:
    """The dense weight [out, in] of a base linear (NF4 bases dequantize)."""
    return linear.dequantize() if hasattr(linear, "dequantize") else linear.weight


def copy_checked(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], method: str) -> None:
    """Copy tensors[k] into params[k] for every key, after checking that the key sets and shapes agree.

    Raises one PeftError that first says how the adapter's base differs from this model (layer count, tensor
    sizes), then names the missing keys, unexpected keys and shape mismatches.
    """
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    mismatched = [
        f"{k}: file {tuple(tensors[k].shape)}, model {tuple(params[k].shape)}"
        for k in sorted(set(params) & set(tensors))
        if tensors[k].shape != params[k].shape
    ]
    errors = []
    if missing:
        errors.append(f"missing {_some(missing)}")
    if unexpected:
        errors.append(f"unexpected {_some(unexpected)}")
    if mismatched:
        errors.append(f"shape mismatch {_some(mismatched)}")
    if errors:
        why = _base_mismatch(params, tensors, bool(mismatched))
        raise PeftError(
            f"{method} weights do not fit this model{why}: "
            + "; ".join(errors)
            + "; check that the adapter was trained on this base model with the same config"
        )
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k].to(p.dtype))


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _layer_count(keys) -> int:
    return 1 + max((int(m.group(1)) for k in keys if (m := _LAYER_INDEX.search(k))), default=-1)


def _base_mismatch(params: dict, tensors: dict, shapes_differ: bool) -> str:
    """A plain-words reason that the adapter's base model is not this one ("" if no simple reason shows)."""
    reasons = []
    file_layers, model_layers = _layer_count(tensors), _layer_count(params)
    if file_layers and model_layers and file_layers != model_layers:
        reasons.append(f"the adapter has weights for {file_layers} layers, this model has {model_layers}")
    if shapes_differ:
        reasons.append("its tensor sizes differ, so its base model has another hidden or intermediate size")
    return " (" + "; ".join(reasons) + ")" if reasons else ""


def _some(items: list[str], n: int = 4) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def prompt_learning_config_errors(d: dict, peft_type: str, what: str) -> list[str]:
    """What in a PEFT prompt-learning adapter_config.json (prefix/prompt tuning) slimlm cannot run."""
    errors = []
    if d.get("peft_type") != peft_type:
        errors.append(f"peft_type is {d.get('peft_type')!r}, expected {peft_type!r}")
    if d.get("task_type", "CAUSAL_LM") != "CAUSAL_LM":
        errors.append(f"task_type is {d.get('task_type')!r}; slimlm runs CAUSAL_LM adapters only")
    if d.get("num_transformer_submodules") not in (None, 1):
        errors.append(
            f"num_transformer_submodules is {d.get('num_transformer_submodules')}; "
            f"encoder-decoder {what} (2) do not fit a decoder-only model"
        )
    return errors
