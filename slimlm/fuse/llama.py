"""Exact fusion passes for slimlm's Llama-family Transformer, each a plain function that edits the model in place.

- `merge_adapters_`: fold a LoRA/DoRA/QLoRA/BitFit adapter into the base weights (slimlm.peft.merge_adapter).
- `fold_norms_`: RMSNorm gains into the linears that read the norm: RMSNorm(x)·g followed by W is
  RMSNorm_nogain(x) @ (W·diag(g))^T, so W's columns absorb g and the gain becomes 1.
- `fuse_qkv_`: q/k/v into one `qkv_proj` ([q | k | v] rows); `fuse_gate_up_`: gate/up into one `gate_up_proj`.
Each returns a FusionReport (what it fused, what it skipped and why). `fuse_model_` runs a chosen set in the order
of FUSION_PASSES (merge first: the others need plain linears, and folding a norm past an adapter is not exact).

Exactness: every pass is the same arithmetic regrouped, equal to fp32 round-off (tests/test_fuse.py). In bf16 the
folded weights W·diag(g) are rounded once more, so `norms` is exact only to bf16 round-off there (reported).

What this is not: a kernel library. The fused layers are ordinary nn.Linear / slimlm quantized layers, so their
speed is whatever one larger GEMM gains over several (bench/bench_fuse.py measures it). A fused model is for
inference: fuse last, after fine-tuning, pruning and quantizing, which all expect the separate projections. Saved
to a folder it writes the unfused HF names (see fuse/rows.py); merged adapters and folded gains persist as weights,
while qkv/gate_up are re-done after loading.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from slimlm.errors import InputError
from slimlm.fuse.report import FusionReport
from slimlm.fuse.rows import (
    NOT_CONCATENABLE,
    CannotFuse,
    concat_rows,
    keep_unfused_names,
)
from slimlm.model import RMSNorm, Transformer


def _fuse_group(parent: nn.Module, fused: str, names: tuple[str, ...], where: str, report: FusionReport) -> None:
    """Replace parent's projections `names` by one child `fused` computing their outputs side by side."""
    if getattr(parent, fused, None) is not None:
        report.skipped[f"{where}.{fused}"] = "already fused"
        return
    layers = [getattr(parent, n) for n in names]
    try:
        new = concat_rows(layers).train(parent.training)
    except CannotFuse as e:
        report.skipped[f"{where}.{fused}"] = str(e)
        return
    setattr(parent, fused, new)
    for n in names:
        setattr(parent, n, None)
    keep_unfused_names(parent, fused, [(n, lin.out_features) for n, lin in zip(names, layers)])
    report.fused.append(f"{where}.{fused} <- {' + '.join(names)} ({type(new).__name__}, {new.out_features} rows)")


def fuse_qkv_(model: Transformer) -> FusionReport:
    """Every block's q_proj, k_proj, v_proj -> one qkv_proj whose output splits into [q | k | v] (GQA sizes)."""
    report = FusionReport()
    for i, block in enumerate(model.layers):
        _fuse_group(block.self_attn, "qkv_proj", ("q_proj", "k_proj", "v_proj"), f"layers.{i}.self_attn", report)
    return report


def fuse_gate_up_(model: Transformer) -> FusionReport:
    """Every block's gate_proj, up_proj -> one gate_up_proj whose output halves are [gate | up]."""
    report = FusionReport()
    for i, block in enumerate(model.layers):
        _fuse_group(block.mlp, "gate_up_proj", ("gate_proj", "up_proj"), f"layers.{i}.mlp", report)
    return report


def _readers(parent: nn.Module, fused: str, names: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """The linears that read a norm's output: the fused one if fused, else the separate ones."""
    if getattr(parent, fused, None) is not None:
        return [(fused, getattr(parent, fused))]
    return [(n, getattr(parent, n)) for n in names]


def _cannot_fold(readers: list[tuple[str, nn.Module]]) -> str | None:
    """Why the gain cannot be folded into these linears exactly (None: it can)."""
    for name, lin in readers:
        kind = type(lin).__name__
        if type(lin) is nn.Linear:
            continue
        if hasattr(lin, "qweight"):
            return (
                f"{name} is quantized ({kind}): folding the gain would need re-quantizing W·diag(g), which "
                "changes the rounding; fold norms before quantizing"
            )
        return f"{name} is a {kind}: " + NOT_CONCATENABLE.get(kind, "only plain nn.Linear readers are folded")
    return None


@torch.no_grad()
def _fold(norm: nn.Module, readers: list[tuple[str, nn.Module]], where: str, report: FusionReport) -> None:
    """Scale the readers' input columns by the norm's gain and set the gain to 1, or report why not."""
    if type(norm) is not RMSNorm:
        report.skipped[where] = f"is a {type(norm).__name__}, not an RMSNorm"
        return
    g = norm.weight  # [dim]
    if bool((g == 1).all()):
        report.skipped[where] = "gain is already 1 (folded before, or never trained)"
        return
    reason = _cannot_fold(readers)
    if reason:
        report.skipped[where] = reason
        return
    for _, lin in readers:  # W [out, dim] · diag(g): column j times g[j], computed in fp32
        lin.weight.copy_((lin.weight.float() * g.float()[None, :]).to(lin.weight.dtype))
    # The gain stays as a parameter of ones (multiplying by 1.0 is exact) rather than being removed: the model
    # then still has every tensor an HF checkpoint names, and saves as an ordinary HF folder. It costs one
    # elementwise multiply per norm ([B, T, dim]); bench/bench_fuse.py's `norms` row measures what folding gains.
    g.fill_(1.0)
    report.fused.append(f"{where} gain -> {', '.join(n for n, _ in readers)}")


@torch.no_grad()
def fold_norms_(model: Transformer, untie_head: bool = False) -> FusionReport:
    """Fold each block's two RMSNorm gains into q/k/v (or qkv) and gate/up (or gate_up), and the final norm's gain
    into lm_head.

    The LM head is folded only if it is not tied to the embedding (the embedding must keep the raw rows), or if
    `untie_head=True`, which gives the head its own vocab x dim copy (reported with its size). Quantized or adapted
    readers are skipped with the reason: merge adapters first, and fold before quantizing.
    """
    report = FusionReport()
    for i, block in enumerate(model.layers):
        _fold(
            block.input_layernorm,
            _readers(block.self_attn, "qkv_proj", ("q_proj", "k_proj", "v_proj")),
            f"layers.{i}.input_layernorm",
            report,
        )
        _fold(
            block.post_attention_layernorm,
            _readers(block.mlp, "gate_up_proj", ("gate_proj", "up_proj")),
            f"layers.{i}.post_attention_layernorm",
            report,
        )
    _fold_final_norm(model, untie_head, report)
    dtype = model.layers[0].input_layernorm.weight.dtype if len(model.layers) else torch.float32
    if report.fused and dtype != torch.float32:
        report.notes.append(
            f"weights are {str(dtype).removeprefix('torch.')}: the folded W·diag(g) was rounded to "
            "that dtype, so the result is exact to its round-off, not fp32's"
        )
    return report


def _fold_final_norm(model: Transformer, untie_head: bool, report: FusionReport) -> None:
    head = model.lm_head
    tied = getattr(head, "weight", None) is model.embed_tokens.weight
    if tied and _cannot_fold([("lm_head", head)]) is None and not bool((model.norm.weight == 1).all()):
        mib = head.weight.numel() * head.weight.element_size() / 2**20
        if not untie_head:
            report.skipped["norm"] = (
                f"lm_head is tied to the embedding; untie_head=True (CLI --untie-head) folds "
                f"the gain into an own copy of the head, costing vocab x dim = {mib:,.1f} MiB"
            )
            return
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config = dataclasses.replace(model.config, tie_word_embeddings=False)
        report.notes.append(f"lm_head untied from the embedding to fold the final norm: +{mib:,.1f} MiB")
    _fold(model.norm, [("lm_head", head)], "norm", report)


def merge_adapters_(model: Transformer) -> FusionReport:
    """Merge the attached adapter into the base weights (LoRA, DoRA, QLoRA, BitFit); others are reported skipped."""
    from slimlm.peft import PeftError, merge_adapter
    from slimlm.peft.lora import lora_layers, lora_selection, merge_lora, unload_lora

    report = FusionReport()
    state = model.peft
    if state is None:
        names = sorted(lora_selection(model).names) if lora_layers(model) else []
        if len(names) > 1:  # attached with apply_lora for per-row serving; merging would add them all up
            report.skipped["lora"] = (
                f"{len(names)} LoRA adapters are attached ({', '.join(names)}); merging "
                "would sum them: unload all but one first"
            )
        elif names:
            merge_lora(model, names)
            unload_lora(model)
            report.fused.append(f"LoRA adapter {names[0]!r} merged into the base weights")
        else:
            report.notes.append("no adapter attached: nothing to merge")
        return report
    try:
        merge_adapter(model)
    except PeftError as e:
        report.skipped[state.method] = str(e)
        return report
    report.fused.append(f"{state.method} adapter merged into the base weights")
    if state.nf4_base:
        report.notes.append("the NF4 base was dequantized: the merged projections are dense")
    return report


# Name -> pass, in the order fuse_model_ runs them (merge first; norms before or after qkv/gate_up is the same).
FUSION_PASSES: dict[str, Callable[[Transformer], FusionReport]] = {
    "merge": merge_adapters_,
    "norms": fold_norms_,
    "qkv": fuse_qkv_,
    "gate_up": fuse_gate_up_,
}


def parse_passes(passes: str | list[str] | tuple[str, ...]) -> list[str]:
    """'qkv,gate_up' or a list -> the names in run order; ValueError naming unknown ones and the choices."""
    names = [p.strip() for p in passes.split(",")] if isinstance(passes, str) else [p.strip() for p in passes]
    names = [p for p in names if p]
    unknown = [p for p in names if p not in FUSION_PASSES]
    if unknown or not names:
        raise InputError(f"unknown fusion pass(es) {unknown or names}; choose from {', '.join(FUSION_PASSES)}")
    return [p for p in FUSION_PASSES if p in names]


def fuse_model_(
    model: Transformer, passes: str | list[str] | tuple[str, ...] = tuple(FUSION_PASSES), untie_head: bool = False
) -> dict[str, FusionReport]:
    """Run the chosen passes in FUSION_PASSES order (whatever order they are given in); {pass: its report}."""
    if not isinstance(model, Transformer):
        raise TypeError(
            f"fuse_model_ works on slimlm.model.Transformer, not {type(model).__name__}; for other "
            "modules use slimlm.fuse.fold_conv_bn_ / fold_linear_bn_"
        )
    reports = {}
    for name in parse_passes(passes):
        reports[name] = fold_norms_(model, untie_head) if name == "norms" else FUSION_PASSES[name](model)
    return reports
