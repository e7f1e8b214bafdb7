"""LoRA (Hu et al. 2021), rsLoRA scaling and DoRA (Liu et al. 2024), with several adapters chosen per batch row.

`LoRALinear` is injected into a projection's slot and wraps the frozen base layer (nn.Linear or NF4Linear, which
makes it QLoRA). Each named adapter adds `scaling * B(A(dropout(x)))`, with A [r, in] Kaiming-initialised and
B [out, r] zero, so training starts from the base model. DoRA also learns a magnitude m [out] and rescales the
adapted weight W' = W + scaling*B@A column-wise: y = m / ||W'|| * (W' x), the norm detached as in the paper (§4.3).

All LoRALinear layers of a model share one `AdapterSelection`: either a list of adapters applied to every row, or,
for serving, one adapter name (or None) per batch row. Files use HF PEFT's layout and key names, so PEFT (and
vLLM) load them; PEFT-trained LoRA/DoRA adapters load here, with PEFT's per-module options: rank_pattern and
alpha_pattern (r/alpha by module-name regex), layers_to_transform (+ layers_pattern), lora_bias (a bias on B) and
modules_to_save (whole modules, e.g. lm_head or embed_tokens after adding tokens, stored in full). Module names in
these options are HF's (model.layers.0.self_attn.q_proj), matched with PEFT's own rules.

modules_to_save is not an adapter on the side: it replaces the base module's weights (untying a tied embedding;
resizing the vocabulary to the file's), so it holds for every row and cannot be combined with other adapters.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimlm.peft.common import (
    ALL_LINEARS,
    PEFT_PREFIX,
    PeftError,
    copy_checked,
    freeze,
    resolve_targets,
    target_linears,
    weight_of,
)

# PEFT's adapter_config.json options that change what the adapter computes and that slimlm does not run.
UNSUPPORTED_PEFT_OPTIONS = (
    "exclude_modules",
    "trainable_token_indices",
    "layer_replication",
    "target_parameters",
    "alora_invocation_tokens",
    "use_qalora",
)


@dataclass
class LoraConfig:
    r: int = 16  # rank of the update B @ A
    alpha: float = 32.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # on the LoRA branch input, training only
    target_modules: str | list[str] = "all-linear"  # short names (q_proj, ...) or "all-linear"
    use_rslora: bool = False  # scaling alpha/sqrt(r) instead of alpha/r (Kalajdzievski 2023)
    use_dora: bool = False  # DoRA: a trained magnitude per output row times the LoRA-updated direction
    # PEFT's per-module options; keys and names are HF module names (model.layers.1.mlp.up_proj), matched as PEFT does.
    rank_pattern: dict[str, int] = field(default_factory=dict)  # regex matching the end of a name -> r
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # regex matching the end of a name -> alpha
    layers_to_transform: list[int] | None = None  # only these layer indices get LoRA
    layers_pattern: str | list[str] | None = None  # the name before the layer index (default: any); ours is "layers"
    lora_bias: bool = False  # B has a bias (trained; can merge only into a base projection that has one)
    modules_to_save: list[str] | None = None  # whole modules trained and saved in full (lm_head, embed_tokens)

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
        errors += self._option_errors()
        if errors:
            raise PeftError("; ".join(errors))

    def _option_errors(self) -> list[str]:
        errors = []
        for what, pattern, ok in (
            ("rank_pattern", self.rank_pattern, lambda v: type(v) is int and v >= 1),
            ("alpha_pattern", self.alpha_pattern, lambda v: type(v) in (int, float) and v > 0),
        ):
            if not isinstance(pattern, dict):
                errors.append(f"lora {what} must be a mapping of module-name regex to value, got {pattern!r}")
                continue
            errors += [f"lora {what}[{k!r}] = {v!r} is not valid" for k, v in pattern.items() if not ok(v)]
            for k in pattern:
                try:
                    re.compile(k)
                except re.error as e:
                    errors.append(f"lora {what} key {k!r} is not a regex ({e})")
        layers = self.layers_to_transform
        if layers is not None and not all(type(i) is int and i >= 0 for i in layers):
            errors.append(f"lora layers_to_transform must be a list of layer indices, got {layers!r}")
        if self.lora_bias and self.use_dora:
            errors.append("lora_bias does not go with use_dora (HF PEFT refuses the pair too)")
        if self.modules_to_save is not None and not all(isinstance(m, str) and m for m in self.modules_to_save):
            errors.append(f"lora modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        return errors

    @property
    def scaling(self) -> float:
        """The scaling of a module that no rank/alpha pattern matches."""
        return self.scaling_of(self.r, self.alpha)

    def scaling_of(self, r: int, alpha: float) -> float:
        return alpha / (math.sqrt(r) if self.use_rslora else r)

    def rank_alpha(self, hf_name: str) -> tuple[int, float]:
        """(r, alpha) of the module with this HF name: the first pattern key that matches its end, as PEFT's
        get_pattern_key does, else the defaults."""
        return (
            next((v for k, v in self.rank_pattern.items() if _ends_with(hf_name, k)), self.r),
            next((v for k, v in self.alpha_pattern.items() if _ends_with(hf_name, k)), self.alpha),
        )

    def transforms_layer(self, hf_name: str) -> bool:
        """Whether layers_to_transform (+ layers_pattern) selects this module (PEFT's check_target_module_exists)."""
        if not self.layers_to_transform:
            return True
        patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern or []
        regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
        match = next((m for m in (re.match(r, hf_name) for r in regexes) if m), None)
        return match is not None and int(match.group("idx")) in self.layers_to_transform

    def saves_module(self, hf_name: str) -> bool:
        """Whether modules_to_save names this module (PEFT's _set_trainable: a plain suffix match)."""
        return any(hf_name.endswith(m) for m in self.modules_to_save or ())

    def inside_saved_module(self, hf_name: str) -> bool:
        """PEFT puts no LoRA inside a module it saves whole."""
        return any(re.match(rf"(^|.*\.){m}($|\..*)", hf_name) for m in self.modules_to_save or ())


def _ends_with(name: str, pattern: str) -> bool:
    return re.match(rf"(.*\.)?({pattern})$", name) is not None


def hf_module_name(name: str) -> str:
    """HF's name of our module `name` (ours drop the leading `model.`, except lm_head which has none)."""
    return name if name == "lm_head" else f"model.{name}"


@dataclass
class AdapterSelection:
    """Which adapters the LoRALinear layers of one model apply, to every row. (Serving mixes adapters per row
    with engine/multi_lora.py's slots instead.)"""

    active: tuple[str, ...] = ("default",)
    names: set[str] = field(default_factory=set)  # every adapter attached to the model
    saved_modules: dict[str, list[str]] = field(default_factory=dict)  # adapter -> our names of modules_to_save


class LoRAAdapter(nn.Module):
    """One adapter's weights for one layer: lora_A [r, in], lora_B [out, r] (+ lora_bias [out], DoRA magnitude [out]).

    r and alpha are the config's, or its rank/alpha pattern's for this module (`hf_name`).
    """

    def __init__(self, base: nn.Module, cfg: LoraConfig, hf_name: str = ""):
        super().__init__()
        w = weight_of(base)
        r, alpha = cfg.rank_alpha(hf_name)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=cfg.lora_bias, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init
        nn.init.zeros_(self.lora_B.weight)
        if self.lora_B.bias is not None:
            nn.init.zeros_(self.lora_B.bias)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scaling = cfg.scaling_of(r, alpha)
        # DoRA magnitude starts at the column norms of W (B = 0), so the adapted layer starts equal to the base.
        self.magnitude = nn.Parameter(w.detach().float().norm(dim=1).to(w.dtype)) if cfg.use_dora else None

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A: [out, in]."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def delta_bias(self) -> torch.Tensor | None:
        """scaling * lora_B.bias [out] (PEFT scales B's whole output, bias included), or None."""
        return None if self.lora_B.bias is None else self.scaling * self.lora_B.bias

    def forward(self, x: torch.Tensor, base: nn.Module, base_out: torch.Tensor) -> torch.Tensor:
        """What this adapter adds to base_out = base(x), for x [..., in]."""
        if self.magnitude is None:
            # Scale the [..., r] intermediate, not the [..., out] result: same math, r/out of the work.
            return F.linear(self.lora_A(self.dropout(x)) * self.scaling, self.lora_B.weight, self.delta_bias())
        return self._dora(x, base, base_out)

    def add_to(self, x: torch.Tensor, base: nn.Module, base_out: torch.Tensor) -> torch.Tensor:
        """base_out + this adapter's contribution; plain LoRA folds the add into the B matmul (one addmm)."""
        if self.magnitude is not None:
            return base_out + self._dora(x, base, base_out)
        a = self.lora_A(self.dropout(x))  # [..., r]
        out = torch.addmm(
            base_out.reshape(-1, base_out.shape[-1]),
            a.reshape(-1, a.shape[-1]),
            self.lora_B.weight.T.to(a.dtype),
            alpha=self.scaling,
        ).view(base_out.shape)
        return out if self.lora_B.bias is None else out + self.delta_bias().to(out.dtype)

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
        for name in self.selection.active:
            if name in self.adapters and not self._is_merged(name):
                y = self.adapters[name].add_to(x, self.base, y)
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
            if a.lora_B.bias is not None:  # merge_lora checked that the base has a bias
                self.base.bias.add_(a.delta_bias().to(self.base.bias.dtype))
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
                if self.adapters[name].lora_B.bias is not None:
                    self.base.bias.sub_(self.adapters[name].delta_bias().to(self.base.bias.dtype))


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
    sel = lora_selection(model)
    if name in sel.names:
        raise PeftError(f"the model already has a LoRA adapter named {name!r}")
    if sel.saved_modules or (cfg.modules_to_save and sel.names):
        raise PeftError(
            "an adapter with modules_to_save replaces whole base modules for every row, so it cannot "
            "share a model with other adapters; load it on a fresh base (or merge it first)"
        )
    saved = _saved_modules(model, cfg)
    if not sel.names:
        freeze(model)
    for lname, parent, attr in target_linears(model, resolve_targets(cfg.target_modules)):
        hf_name = hf_module_name(lname)
        if not cfg.transforms_layer(hf_name) or cfg.inside_saved_module(hf_name):
            continue
        layer = getattr(parent, attr)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer, sel)
            setattr(parent, attr, layer)
        layer.adapters[name] = LoRAAdapter(layer.base, cfg, hf_name)
    if saved:
        _untie_saved(model, saved)
        sel.saved_modules[name] = saved
        for m in saved:
            model.get_submodule(m).requires_grad_(True)
    sel.names.add(name)
    sel.active = (name,)


def _saved_modules(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Our names of the modules modules_to_save names; every entry must match a module with weights."""
    if not cfg.modules_to_save:
        return []
    found = [
        n
        for n, m in model.named_modules()
        if n and cfg.saves_module(hf_module_name(n)) and any(True for _ in m.parameters())
    ]
    unmatched = [m for m in cfg.modules_to_save if not any(hf_module_name(n).endswith(m) for n in found)]
    if unmatched:
        raise PeftError(
            f"modules_to_save {unmatched} match no module with weights in this model (HF names such as "
            "lm_head, model.embed_tokens, model.norm)"
        )
    nested = [n for n in found if any(n != o and n.startswith(o + ".") for o in found)]
    return [n for n in found if n not in nested]


def _untie_saved(model: nn.Module, saved: list[str]) -> None:
    """A saved embed_tokens or lm_head of a tied model gets its own weight, as PEFT's copy of the module does."""
    config = model.config
    if not config.tie_word_embeddings:
        return
    if {"embed_tokens", "lm_head"} & set(saved):
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
        config.tie_word_embeddings = False


def lora_selection(model: nn.Module) -> AdapterSelection:
    if model.lora_selection is None:
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
    sel.active = names


def _file_key(layer_name: str, part: str) -> str:
    return f"{PEFT_PREFIX}{layer_name}.{part}"


def lora_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name` under HF PEFT keys (base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight, ...);
    modules_to_save as PEFT writes them, without the wrapper (base_model.model.lm_head.weight)."""
    out = {}
    for lname, layer in lora_layers(model):
        if name in layer.adapters:
            a = layer.adapters[name]
            out[_file_key(lname, "lora_A.weight")] = a.lora_A.weight
            out[_file_key(lname, "lora_B.weight")] = a.lora_B.weight
            if a.lora_B.bias is not None:
                out[_file_key(lname, "lora_B.bias")] = a.lora_B.bias
            if a.magnitude is not None:
                out[_file_key(lname, "lora_magnitude_vector")] = a.magnitude
    for mname in lora_selection(model).saved_modules.get(name, []):
        for pname, p in model.get_submodule(mname).named_parameters():
            out[f"base_model.model.{hf_module_name(mname)}.{pname}"] = p
    return out


def load_lora_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], name: str = "default") -> None:
    """Copy PEFT-keyed tensors into adapter `name` (after apply_lora); every key must match in name and shape.

    A saved embed_tokens/lm_head with more (or fewer) rows than the model's vocabulary resizes it: PEFT users
    resize the base's embeddings before training after adding tokens.
    """
    _resize_vocab(model, tensors, lora_selection(model).saved_modules.get(name, []))
    copy_checked(lora_state_dict(model, name), tensors, "LoRA")


def _resize_vocab(model: nn.Module, tensors: dict[str, torch.Tensor], saved: list[str]) -> None:
    rows = {
        m: tensors[k].shape[0]
        for m in ("embed_tokens", "lm_head")
        if m in saved
        and (k := f"base_model.model.{hf_module_name(m)}.weight") in tensors
        and tensors[k].shape[1:] == model.get_submodule(m).weight.shape[1:]
    }
    vocab = model.embed_tokens.weight.shape[0]
    if all(n == vocab for n in rows.values()):
        return
    if set(rows) != {"embed_tokens", "lm_head"} or len(set(rows.values())) != 1:
        raise PeftError(
            f"the adapter's modules_to_save resize the vocabulary ({rows} rows; the model has {vocab}) "
            "but not both embed_tokens and lm_head to the same size, so the other one's new rows are "
            "not in the file; train with modules_to_save=['lm_head', 'embed_tokens']"
        )
    n, w = rows["lm_head"], model.embed_tokens.weight
    model.embed_tokens = nn.Embedding(n, w.shape[1], device=w.device, dtype=w.dtype).requires_grad_(False)
    model.lm_head = nn.Linear(w.shape[1], n, bias=False, device=w.device, dtype=w.dtype).requires_grad_(False)
    model.config.vocab_size = n


def lora_adapter_config(model: nn.Module, cfg: LoraConfig) -> dict:
    """adapter_config.json fields as HF PEFT writes them for a LoRA/DoRA adapter."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(resolve_targets(cfg.target_modules)),
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": cfg.modules_to_save or None,
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
        "layers_to_transform": cfg.layers_to_transform,
        "layers_pattern": cfg.layers_pattern,
        "lora_bias": cfg.lora_bias,
    }


def lora_config_from_adapter(d: dict) -> LoraConfig:
    """LoraConfig of a PEFT adapter_config.json; settings slimlm does not implement are refused by name."""
    unsupported = [f"{k}={d[k]!r}" for k in UNSUPPORTED_PEFT_OPTIONS if d.get(k)]
    if d.get("bias", "none") != "none":  # PEFT then trains the base model's own biases, saved in full
        unsupported.append(f"bias={d['bias']!r} (training the base biases; lora_bias=True, a bias on B, does load)")
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
    layers = d.get("layers_to_transform")
    pattern = d.get("layers_pattern")
    return LoraConfig(
        r=d["r"],
        alpha=d.get("lora_alpha", 8),
        dropout=d.get("lora_dropout", 0.0),
        target_modules=targets,
        use_rslora=bool(d.get("use_rslora")),
        use_dora=bool(d.get("use_dora")),
        rank_pattern=dict(d.get("rank_pattern") or {}),
        alpha_pattern=dict(d.get("alpha_pattern") or {}),
        layers_to_transform=[layers] if type(layers) is int else layers or None,
        layers_pattern=pattern[0] if isinstance(pattern, list) and len(pattern) == 1 else pattern or None,
        lora_bias=bool(d.get("lora_bias")),
        modules_to_save=list(d.get("modules_to_save") or []) or None,
    )


def merge_lora(model: nn.Module, names: list[str] | None = None) -> None:
    """Fold adapters (default: the active ones) into the base weights; forward stays the same up to rounding."""
    names = list(names if names is not None else lora_selection(model).active)
    no_bias = [
        lname
        for lname, layer in lora_layers(model)
        if layer.base.bias is None
        and any(n in layer.adapters and layer.adapters[n].lora_B.bias is not None for n in names)
    ]
    if no_bias:  # checked before any layer changes, so a refused merge leaves the model as it was
        raise PeftError(
            f"cannot merge lora_bias into {no_bias[:3]} (+{max(len(no_bias) - 3, 0)} more): those base "
            "projections have no bias to fold it into, and a Llama-family HF config cannot give them one "
            "alone (HF PEFT refuses this merge too); keep it as an adapter and load it with --adapter"
        )
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
    model.lora_selection = None
