"""LoRA (Hu et al. 2021), rsLoRA scaling and DoRA (Liu et al. 2024), with several adapters chosen per batch row.

`LoRALinear` is injected into a projection's slot and wraps the frozen base layer (nn.Linear or NF4Linear, which
makes it QLoRA). Each named adapter adds `scaling * B(A(dropout(x)))`, with A [r, in] Kaiming-initialised and
B [out, r] zero, so training starts from the base model. DoRA also learns a magnitude m [out] and rescales the
adapted weight W' = W + scaling*B@A column-wise: y = m / ||W'|| * (W' x), the norm detached as in the paper (§4.3).

All LoRALinear layers of a model share one `AdapterSelection`: either a list of adapters applied to every row, or,
for serving, one adapter name (or None) per batch row. Files use HF PEFT's layout and key names, so PEFT (and
vLLM) load them; PEFT-trained LoRA/DoRA adapters load here.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimlm.peft.common import (
    ALL_LINEARS, PEFT_PREFIX, PeftError, copy_checked, freeze, resolve_targets, target_linears, weight_of,
)


@dataclass
class LoraConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"  # short names (q_proj, ...) or "all-linear"
    use_rslora: bool = False  # scaling alpha/sqrt(r) instead of alpha/r (Kalajdzievski 2023)
    use_dora: bool = False

    def validate(self) -> None:
        errors = []
        if type(self.r) is not int or self.r < 1:
            errors.append(f"lora r must be >= 1, got {self.r!r} (an integer)")
        if type(self.alpha) not in (int, float) or self.alpha <= 0:
            errors.append(f"lora alpha must be > 0, got {self.alpha!r} (a number)")
        if type(self.dropout) not in (int, float) or not 0 <= self.dropout < 1:
            errors.append(f"lora dropout must be in [0, 1), got {self.dropout!r} (a number)")
        try:
            resolve_targets(self.target_modules)
        except PeftError as e:
            errors.append(str(e))
        if errors:
            raise PeftError("; ".join(errors))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass
class AdapterSelection:
    """Which adapters the LoRALinear layers of one model apply: `active` to every row, or per row (`rows`)."""
    active: tuple[str, ...] = ("default",)
    rows: list[tuple[str, torch.Tensor]] | None = None  # (adapter, row indices [n]) for each adapter in the batch
    names: set[str] = field(default_factory=set)  # every adapter attached to the model


class LoRAAdapter(nn.Module):
    """One adapter's weights for one layer: lora_A [r, in], lora_B [out, r] (+ DoRA magnitude [out])."""

    def __init__(self, base: nn.Module, cfg: LoraConfig):
        super().__init__()
        w = weight_of(base)
        self.lora_A = nn.Linear(base.in_features, cfg.r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(cfg.r, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scaling = cfg.scaling
        # DoRA magnitude starts at the column norms of W (B = 0), so the adapted layer starts equal to the base.
        self.magnitude = nn.Parameter(w.detach().float().norm(dim=1).to(w.dtype)) if cfg.use_dora else None

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A: [out, in]."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor, base: nn.Module, base_out: torch.Tensor) -> torch.Tensor:
        """What this adapter adds to base_out = base(x), for x [..., in]."""
        if self.magnitude is None:
            # Scale the [..., r] intermediate, not the [..., out] result: same math, r/out of the work.
            return self.lora_B(self.lora_A(self.dropout(x)) * self.scaling)
        return self._dora(x, base, base_out)

    def add_to(self, x: torch.Tensor, base: nn.Module, base_out: torch.Tensor) -> torch.Tensor:
        """base_out + this adapter's contribution; plain LoRA folds the add into the B matmul (one addmm)."""
        if self.magnitude is not None:
            return base_out + self._dora(x, base, base_out)
        a = self.lora_A(self.dropout(x))  # [..., r]
        out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), a.reshape(-1, a.shape[-1]),
                          self.lora_B.weight.T.to(a.dtype), alpha=self.scaling)
        return out.view(base_out.shape)

    def _dora(self, x: torch.Tensor, base: nn.Module, base_out: torch.Tensor) -> torch.Tensor:
        # As HF PEFT: with dropout active, the base term is recomputed from the dropped-out input.
        dropped = not isinstance(self.dropout, nn.Identity) and self.training
        w = weight_of(base).to(x.dtype)
        if dropped:
            x = self.dropout(x)
            base_out = F.linear(x, w)
        elif base.bias is not None:
            base_out = base_out - base.bias
        lora_w = (self.lora_B.weight @ self.lora_A.weight).to(x.dtype)  # [out, in]
        norm = (w + self.scaling * lora_w.detach()).norm(dim=1).detach()  # [out], treated as a constant
        mag_scale = (self.magnitude / norm).view(1, -1)
        return (mag_scale - 1) * base_out + mag_scale * self.lora_B(self.lora_A(x)) * self.scaling


class LoRALinear(nn.Module):
    """A frozen base projection plus named LoRA adapters; which ones apply is read from the shared selection."""

    def __init__(self, base: nn.Module, selection: AdapterSelection):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.selection = selection
        self.merged: list[tuple[str, torch.Tensor | None]] = []  # (adapter, DoRA column scale) folded into base

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        sel = self.selection
        if sel.rows is None:
            for name in sel.active:
                if name in self.adapters and not self._is_merged(name):
                    y = self.adapters[name].add_to(x, self.base, y)
            return y
        for name, idx in sel.rows:  # x [B, ..., in]: each adapter's rows go through that adapter only
            if name in self.adapters and not self._is_merged(name):
                y = y.index_add(0, idx, self.adapters[name](x[idx], self.base, y[idx]))
        return y

    def _is_merged(self, name: str) -> bool:
        return any(n == name for n, _ in self.merged)

    def merge(self, name: str) -> None:
        """Fold adapter `name` into the base weight (an NF4 base is dequantized into a dense nn.Linear first)."""
        if self._is_merged(name):
            return
        if not isinstance(self.base, nn.Linear):
            self.base = dense_linear(self.base)
        a, w = self.adapters[name], self.base.weight
        with torch.no_grad():
            merged = w.float() + a.delta_weight().float()
            scale = None
            if a.magnitude is not None:
                scale = a.magnitude.float() / merged.norm(dim=1)  # [out]
                merged = merged * scale[:, None]
            w.copy_(merged.to(w.dtype))
        self.merged.append((name, scale))

    def unmerge(self) -> None:
        """Undo every merge, newest first (exact up to float rounding)."""
        with torch.no_grad():
            while self.merged:
                name, scale = self.merged.pop()
                w = self.base.weight.float()
                if scale is not None:
                    w = w / scale[:, None]
                self.base.weight.copy_((w - self.adapters[name].delta_weight().float()).to(self.base.weight.dtype))


def dense_linear(base: nn.Module) -> nn.Linear:
    """A plain nn.Linear with the (dequantized) weight and bias of `base`."""
    w = weight_of(base).detach()
    lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if base.bias is not None:
            lin.bias.copy_(base.bias)
    lin.requires_grad_(False)
    return lin


def apply_lora(model: nn.Module, cfg: LoraConfig, tokenizer=None, name: str = "default") -> None:
    """Freeze the model and add LoRA adapter `name` to the target projections (a second call adds another)."""
    cfg.validate()
    if name in lora_selection(model).names:
        raise PeftError(f"the model already has a LoRA adapter named {name!r}")
    if not lora_selection(model).names:
        freeze(model)
    sel = lora_selection(model)
    for _, parent, attr in target_linears(model, resolve_targets(cfg.target_modules)):
        layer = getattr(parent, attr)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer, sel)
            setattr(parent, attr, layer)
        layer.adapters[name] = LoRAAdapter(layer.base, cfg)
    sel.names.add(name)
    sel.active = (name,)


def lora_selection(model: nn.Module) -> AdapterSelection:
    if not hasattr(model, "lora_selection"):
        model.lora_selection = AdapterSelection(active=())
    return model.lora_selection


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def set_active_adapters(model: nn.Module, names: str | list[str] | tuple[str, ...]) -> None:
    """Apply these adapters (in order) to every row; [] runs the base model."""
    names = (names,) if isinstance(names, str) else tuple(names)
    sel = lora_selection(model)
    unknown = [n for n in names if n not in sel.names]
    if unknown:
        raise PeftError(f"no LoRA adapter named {unknown}; attached: {sorted(sel.names)}")
    sel.active, sel.rows = names, None


@contextmanager
def adapter_rows(model: nn.Module, row_adapters: list[str | None]):
    """Within the block, batch row b uses adapter row_adapters[b] (None: the base model alone)."""
    sel = lora_selection(model)
    unknown = sorted({n for n in row_adapters if n is not None and n not in sel.names})
    if unknown:
        raise PeftError(f"no LoRA adapter named {unknown}; attached: {sorted(sel.names)}")
    device = next(model.parameters()).device
    groups = {}
    for b, n in enumerate(row_adapters):
        if n is not None:
            groups.setdefault(n, []).append(b)
    previous = sel.rows
    sel.rows = [(n, torch.tensor(rows, dtype=torch.long, device=device)) for n, rows in groups.items()]
    try:
        yield
    finally:
        sel.rows = previous


def _file_key(layer_name: str, part: str) -> str:
    return f"{PEFT_PREFIX}{layer_name}.{part}"


def lora_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name` under HF PEFT keys (base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight, ...)."""
    out = {}
    for lname, layer in lora_layers(model):
        if name in layer.adapters:
            a = layer.adapters[name]
            out[_file_key(lname, "lora_A.weight")] = a.lora_A.weight
            out[_file_key(lname, "lora_B.weight")] = a.lora_B.weight
            if a.magnitude is not None:
                out[_file_key(lname, "lora_magnitude_vector")] = a.magnitude
    return out


def load_lora_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], name: str = "default") -> None:
    """Copy PEFT-keyed tensors into adapter `name` (after apply_lora); every key must match in name and shape."""
    copy_checked(lora_state_dict(model, name), tensors, "LoRA")


def lora_adapter_config(model: nn.Module, cfg: LoraConfig) -> dict:
    """adapter_config.json fields as HF PEFT writes them for a LoRA/DoRA adapter."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": sorted(resolve_targets(cfg.target_modules)),
        "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {},
        "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None, "lora_bias": False,
    }


def lora_config_from_adapter(d: dict) -> LoraConfig:
    """LoraConfig of a PEFT adapter_config.json; settings slimlm does not implement are refused by name."""
    unsupported = [f"{k}={d[k]!r}" for k in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform")
                   if d.get(k)]
    if d.get("bias", "none") != "none":
        unsupported.append(f"bias={d['bias']!r}")
    if d.get("fan_in_fan_out"):
        unsupported.append("fan_in_fan_out=True")
    if unsupported:
        raise PeftError(f"adapter uses LoRA settings slimlm does not support: {', '.join(unsupported)}")
    targets = d.get("target_modules") or "all-linear"
    if isinstance(targets, str) and targets != "all-linear":
        raise PeftError(f"adapter target_modules is a regex ({targets!r}); slimlm needs a list of module names")
    if isinstance(targets, list):  # PEFT may store full paths ("model.layers.0.self_attn.q_proj")
        targets = sorted({t.rsplit(".", 1)[-1] for t in targets})
        if not set(targets) <= set(ALL_LINEARS):
            raise PeftError(f"adapter targets {targets}; slimlm's LoRA covers {', '.join(ALL_LINEARS)}")
    return LoraConfig(r=d["r"], alpha=d.get("lora_alpha", 8), dropout=d.get("lora_dropout", 0.0),
                      target_modules=targets, use_rslora=bool(d.get("use_rslora")), use_dora=bool(d.get("use_dora")))


def merge_lora(model: nn.Module, names: list[str] | None = None) -> None:
    """Fold adapters (default: the active ones) into the base weights; forward stays the same up to rounding."""
    names = list(names if names is not None else lora_selection(model).active)
    for _, layer in lora_layers(model):
        for n in names:
            if n in layer.adapters:
                layer.merge(n)


def unmerge_lora(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def unload_lora(model: nn.Module) -> None:
    """Put each LoRALinear's base layer back in its slot (call merge_lora first to keep the adapters' effect)."""
    for lname, layer in lora_layers(model):
        parent = model.get_submodule(lname.rsplit(".", 1)[0])
        setattr(parent, lname.rsplit(".", 1)[1], layer.base)
    if hasattr(model, "lora_selection"):
        del model.lora_selection
