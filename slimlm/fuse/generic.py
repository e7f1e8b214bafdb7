"""Fold eval-mode BatchNorm into the Conv or Linear layer before it, in any nn.Module, in place.

In eval mode BatchNorm is a fixed per-channel affine map, y = (x - mean) / sqrt(var + eps) * gamma + beta, so a
Conv/Linear followed by it equals one Conv/Linear with W' = W * s[:, None, ...] and b' = (b - mean) * s + beta,
s = gamma / sqrt(var + eps) (torch.nn.utils.fusion does the arithmetic). A following ReLU stays as it is: the
module's own forward code keeps calling it, now on the fused layer's output.

Finding the pairs: torch.fx traces the module's forward, so arbitrary code (a ResNet block's skip connection, a
functional ReLU) is understood; a pair is folded only when the Conv/Linear output feeds nothing but the BatchNorm
and each of the two layers is called once. Modules fx cannot trace (Python control flow on tensor values) fall back
to layers adjacent inside plain nn.Sequential containers, and the report says so. The folded layer takes the
Conv/Linear's slot and the BatchNorm's slot becomes nn.Identity, so the original forward code runs unchanged.

Train mode refuses: a training BatchNorm normalizes with each batch's own statistics, which no fixed weights can
reproduce. This file knows nothing of Llama models (see fuse/llama.py).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from slimlm.errors import InputError
from slimlm.fuse.report import FusionReport

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
RELUS = (nn.ReLU, torch.relu, torch.nn.functional.relu, torch.relu_)


def fold_conv_bn_(module: nn.Module) -> FusionReport:
    """Fold every Conv1d/2d/3d -> BatchNorm pair of `module` (eval mode) into the conv, in place."""
    return _fold_bn_(module, CONVS, fuse_conv_bn_eval)


def fold_linear_bn_(module: nn.Module, example_inputs: Sequence[torch.Tensor] | None = None) -> FusionReport:
    """Fold every Linear -> BatchNorm1d pair of `module` (eval mode) into the linear, in place.

    This is exact only when the linear's output is [N, features], so that BatchNorm1d normalizes the linear's
    output features (on [N, C, L] it would normalize dim 1 instead). Pass `example_inputs` (the module's forward
    arguments) to check each pair's output shape; without them that is assumed, and the report says so.
    """
    return _fold_bn_(module, (nn.Linear,), fuse_linear_bn_eval, example_inputs)


def _check_eval(module: nn.Module) -> None:
    training = [
        name or type(module).__name__ for name, m in module.named_modules() if isinstance(m, BATCHNORMS) and m.training
    ]
    if training:
        raise InputError(
            f"BatchNorm {training[0]!r} is in training mode: it normalizes with each batch's own "
            "statistics, which no fixed weights reproduce; call module.eval() before folding"
        )


def _fx_pairs(module: nn.Module, kinds: tuple[type, ...], report: FusionReport) -> list[tuple[str, str, bool]]:
    """(producer, batchnorm, then_relu) qualified names from the fx graph; unfoldable BatchNorms -> report."""
    graph = torch.fx.symbolic_trace(module).graph
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(module.get_submodule(node.target), BATCHNORMS):
            continue
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(module.get_submodule(src.target), kinds)
        ):
            report.skipped[node.target] = f"its input is not the output of a {'/'.join(k.__name__ for k in kinds)}"
        elif len(src.users) > 1:
            report.skipped[node.target] = f"{src.target}'s output is also used elsewhere, which needs it unnormalized"
        elif calls[src.target] > 1 or calls[node.target] > 1:
            report.skipped[node.target] = "a layer of the pair is called more than once in forward"
        else:
            then_relu = len(node.users) == 1 and _is_relu(module, next(iter(node.users)))
            pairs.append((src.target, node.target, then_relu))
    return pairs


def _is_relu(module: nn.Module, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(module.get_submodule(node.target), nn.ReLU)
    return node.op in ("call_function", "call_method") and node.target in (*RELUS, "relu", "relu_")


def _sequential_pairs(module: nn.Module, kinds: tuple[type, ...]) -> list[tuple[str, str, bool]]:
    """Producer -> BatchNorm neighbours inside plain nn.Sequential containers (whose forward chains children)."""
    pairs = []
    for prefix, seq in module.named_modules():
        if type(seq) is not nn.Sequential:
            continue
        children = list(seq.named_children())
        for k, ((a, ma), (b, mb)) in enumerate(itertools.pairwise(children)):
            if isinstance(ma, kinds) and isinstance(mb, BATCHNORMS):
                then_relu = k + 2 < len(children) and isinstance(children[k + 2][1], nn.ReLU)
                pairs.append((f"{prefix}.{a}" if prefix else a, f"{prefix}.{b}" if prefix else b, then_relu))
    return pairs


def _output_dims(module: nn.Module, names: list[str], example_inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    """{layer name: ndim of its output} from one forward pass over example_inputs."""
    dims: dict[str, int] = {}
    hooks = [
        module.get_submodule(n).register_forward_hook(lambda m, args, out, n=n: dims.__setitem__(n, out.dim()))
        for n in names
    ]
    try:
        with torch.no_grad():
            module(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return dims


def _set(module: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, attr, new)


def _fold_bn_(module: nn.Module, kinds: tuple[type, ...], fuse_fn, example_inputs=None) -> FusionReport:
    _check_eval(module)
    report = FusionReport()
    try:
        pairs = _fx_pairs(module, kinds, report)
    except Exception as e:  # noqa: BLE001 - fx raises TraceError, TypeError, ...: any failure means "untraceable"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        report.notes.append(
            f"torch.fx could not trace {type(module).__name__} ({reason}); only pairs adjacent "
            "inside nn.Sequential containers were considered"
        )
        pairs = _sequential_pairs(module, kinds)
    if kinds == (nn.Linear,) and pairs:
        if example_inputs is None:
            report.notes.append("assumed each folded Linear's output is [N, features]; pass example_inputs to check")
        else:
            dims = _output_dims(module, [p for p, _, _ in pairs], example_inputs)
            for p, bn, _ in [t for t in pairs if dims.get(t[0]) != 2]:
                report.skipped[bn] = (
                    f"{p}'s output has {dims.get(p)} dims, so BatchNorm1d does not normalize its features"
                )
            pairs = [t for t in pairs if dims.get(t[0]) == 2]
    for prod_name, bn_name, then_relu in pairs:
        prod, bn = module.get_submodule(prod_name), module.get_submodule(bn_name)
        out = prod.out_channels if isinstance(prod, CONVS) else prod.out_features
        if bn.running_mean is None:
            report.skipped[bn_name] = (
                "it keeps no running statistics (track_running_stats=False), so even in eval "
                "mode it normalizes with batch statistics"
            )
        elif bn.num_features != out:
            report.skipped[bn_name] = f"it has {bn.num_features} features, {prod_name} makes {out}"
        else:
            _set(module, prod_name, fuse_fn(prod.eval(), bn))  # a conv's mode changes nothing; torch asserts it
            _set(module, bn_name, nn.Identity())
            report.fused.append(f"{prod_name} <- {prod_name} + {bn_name}" + (" (then ReLU)" if then_relu else ""))
    return report
