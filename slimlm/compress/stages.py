"""The stages a compression chain can run: one small function per kind, registered in STAGE_KINDS.

A stage takes the current model and a `StageContext` (the stage-0 folder, the previous stage's folder, where to
write) and returns the next model plus a dict of what it did. The chain saves and measures every returned model;
stages never measure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from slimlm.compress.quantize_workflow import QuantizeConfig, quantize_by_recipe_
from slimlm.prune.config import PruneConfig, prune_by_config
from slimlm.train.distill import DistillConfig


@dataclass
class StageContext:
    tokenizer: Any
    base_folder: Path  # stage 0: the (merged) starting model — the teacher of a distill stage
    prev_folder: Path  # the previous stage's saved model
    work_dir: Path  # scratch space of this stage (training logs, caches)
    dtype: str = "fp32"
    progress: bool = True


@dataclass
class StageKind:
    config: type  # the dataclass a recipe's settings map onto (validated by its .validate())
    run: Callable[[nn.Module, Any, StageContext], tuple[nn.Module, dict]]


def run_quantize(model: nn.Module, spec: QuantizeConfig, ctx: StageContext) -> tuple[nn.Module, dict]:
    """Quantize in place (rtn, gptq, qat, static or dynamic int8) as `slimlm quantize` does."""
    return model, quantize_by_recipe_(model, ctx.tokenizer, spec, progress=ctx.progress)


def run_prune(model: nn.Module, spec: PruneConfig, ctx: StageContext) -> tuple[nn.Module, dict]:
    """Prune in place as `slimlm prune` does (calibration text from the built-in split unless calib_file)."""
    from slimlm.eval.corpus import calibration_ids

    calib = None
    if spec.needs_calibration:
        calib = calibration_ids(ctx.tokenizer, spec.calib_file, spec.calib_samples, spec.calib_seq_len)
    return model, prune_by_config(model, spec, calib)


def run_distill(model: nn.Module, spec: DistillConfig, ctx: StageContext) -> tuple[nn.Module, dict]:
    """Distil stage 0 (the teacher) into the current model, or into `student_layers` of the teacher's layers."""
    from slimlm.llm import load
    from slimlm.train.distill import distill

    cfg = dataclasses.replace(spec, teacher=str(ctx.base_folder), teacher_adapter=None, out=str(ctx.work_dir))
    if cfg.student in (None, "", "previous"):
        cfg.student = str(ctx.prev_folder)
    res = distill(cfg, progress=ctx.progress)
    student = load(str(res.output), dtype=ctx.dtype).model
    info = {
        "student": cfg.student or f"{cfg.student_layers} layers of stage 0",
        "steps": res.train.steps,
        "final_loss": res.train.final_loss,
        "tokens_per_s": res.train.tokens_per_s,
        "alpha": cfg.alpha,
        "temperature": cfg.temperature,
        "kl": cfg.kl,
    }
    return student, info


STAGE_KINDS: dict[str, StageKind] = {
    "prune": StageKind(PruneConfig, run_prune),
    "distill": StageKind(DistillConfig, run_distill),
    "quantize": StageKind(QuantizeConfig, run_quantize),
}


def stage_name(index: int, kind: str, spec: Any) -> str:
    """A short label for tables and folder names, e.g. '2-quantize-int4-gptq'."""
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    if kind == "quantize":
        detail = fields["scheme"] + ("" if fields["method"] == "rtn" else f"-{fields['method']}")
    elif kind == "prune" and fields["method"]:
        detail = fields["method"].replace(":", "of") + (
            f"-{fields['sparsity']:g}" if ":" not in fields["method"] else ""
        )
    elif kind == "prune":
        detail = fields["structured"] + (
            f"-{fields['n_drop']}" if fields["structured"] == "layers" else f"-{fields['ratio']:g}"
        )
    else:
        detail = (
            "alpha"
            + f"{fields['alpha']:g}"
            + (f"-{fields['student_layers']}layers" if fields["student_layers"] else "")
        )
    return f"{index}-{kind}" + (f"-{detail}" if detail else "")
