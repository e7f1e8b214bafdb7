"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): a small residual MLP after a sublayer's output.

Each adapted sublayer output `y` becomes `y + up(act(down(y)))`, with `down: dim -> bottleneck` and
`up: bottleneck -> dim`. `up` starts at zero, so the adapted model starts as exactly the base model.
  - houlsby: after attention (wraps `self_attn.o_proj`) and after the MLP (wraps `mlp.down_proj`);
  - pfeiffer: after the MLP only (wraps `mlp.down_proj`).
The adapter is injected into the projection's slot as `AdapterOut(base, Bottleneck)`, so attention and MLP code
never know about it. Adapters are NOT mergeable: the bottleneck is nonlinear, so it cannot be folded into the
base weights; an adapted model is saved as base + adapter folder.

Adapter folder (our own type; HF PEFT has no bottleneck adapters):
  adapter_config.json: {"peft_type": "SLIMLM_BOTTLENECK_ADAPTER", "style", "bottleneck", "activation", "dropout"}
  adapter_model.safetensors: for every wrapped projection `layers.{i}.{self_attn.o_proj|mlp.down_proj}`:
    `<projection>.adapter.down.weight` [bottleneck, dim], `<projection>.adapter.down.bias` [bottleneck],
    `<projection>.adapter.up.weight` [dim, bottleneck], `<projection>.adapter.up.bias` [dim].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from slimlm.peft.common import PeftError, copy_checked, freeze

PEFT_TYPE = "SLIMLM_BOTTLENECK_ADAPTER"
STYLES = {"houlsby": ("self_attn.o_proj", "mlp.down_proj"), "pfeiffer": ("mlp.down_proj",)}
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass
class AdapterConfig:
    style: str = "houlsby"  # houlsby: after attention and MLP; pfeiffer: after the MLP only
    bottleneck: int = 64  # width of the adapter's hidden layer
    activation: str = "gelu"  # the bottleneck nonlinearity: one of ACTIVATIONS
    dropout: float = 0.0  # on the bottleneck activations, training only

    def validate(self) -> None:
        """Raise one PeftError naming every bad field."""
        errors = []
        if self.style not in STYLES:
            errors.append(f"style must be one of {', '.join(STYLES)}, got {self.style!r}")
        if not isinstance(self.bottleneck, int) or isinstance(self.bottleneck, bool) or self.bottleneck < 1:
            errors.append(f"bottleneck must be a positive integer, got {self.bottleneck!r}")
        if self.activation not in ACTIVATIONS:
            errors.append(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            errors.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if errors:
            raise PeftError("invalid adapter config: " + "; ".join(errors))


class Bottleneck(nn.Module):
    """h [..., dim] -> up(dropout(act(down(h)))) [..., dim]; `up` is zero-initialised."""

    def __init__(self, dim: int, bottleneck: int, activation: str = "gelu", dropout: float = 0.0):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)  # default (Kaiming-uniform) init, like LoRA's A
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)  # the adapter starts as the zero function
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(h))))


class AdapterOut(nn.Module):
    """A projection slot whose output passes through a residual bottleneck: y = base(x); y + adapter(y)."""

    def __init__(self, base: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.base, self.adapter = base, adapter

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [B, T, dim]
        return y + self.adapter(y)


def _slots(model: nn.Module, style: str) -> list[tuple[str, nn.Module, str]]:
    """(full name, parent module, attribute) of every projection the style adapts, in layer order."""
    found = []
    for i, layer in enumerate(model.layers):
        for path in STYLES[style]:
            parent_name, attr = path.split(".")
            found.append((f"layers.{i}.{path}", getattr(layer, parent_name), attr))
    return found


def _adapters(model: nn.Module) -> dict[str, Bottleneck]:
    """Installed bottlenecks by the name of the projection they wrap."""
    return {name: m.adapter for name, m in model.named_modules() if isinstance(m, AdapterOut)}


def apply_adapter(model: nn.Module, cfg: AdapterConfig, tokenizer=None) -> None:
    """Freeze the model and wrap the style's projections with zero-initialised bottleneck adapters (in place)."""
    cfg.validate()
    if _adapters(model):
        raise PeftError("this model already has bottleneck adapters; load a fresh base model before applying again")
    freeze(model)
    w = model.embed_tokens.weight  # new parameters take the model's dtype and device
    for _, parent, attr in _slots(model, cfg.style):
        base = getattr(parent, attr)
        adapter = Bottleneck(base.out_features, cfg.bottleneck, cfg.activation, cfg.dropout).to(w.device, w.dtype)
        setattr(parent, attr, AdapterOut(base, adapter))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under the file's names, e.g. `layers.0.self_attn.o_proj.adapter.down.weight`."""
    return {f"{name}.adapter.{k}": t for name, a in _adapters(model).items() for k, t in a.state_dict().items()}


def adapter_adapter_config(model: nn.Module, cfg: AdapterConfig) -> dict:
    """adapter_config.json content: the peft_type plus the config fields."""
    return {"peft_type": PEFT_TYPE, **asdict(cfg)}


def adapter_config_from_adapter(d: dict) -> AdapterConfig:
    """Inverse of adapter_adapter_config; PeftError for other adapter types or bad fields."""
    if d.get("peft_type") != PEFT_TYPE:
        raise PeftError(f"adapter_config.json has peft_type {d.get('peft_type')!r}, expected {PEFT_TYPE!r}")
    fields = AdapterConfig.__dataclass_fields__
    cfg = AdapterConfig(**{k: d[k] for k in fields if k in d})
    cfg.validate()
    return cfg


def load_adapter_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved adapter tensors into a model prepared by apply_adapter (same config)."""
    if not _adapters(model):
        raise PeftError("the model has no bottleneck adapters; call apply_adapter with the folder's config first")
    copy_checked(dict(adapter_state_dict(model)), tensors, "bottleneck adapter")
