"""QuantizeConfig: every quantization choice in one dataclass, and `quantize_by_recipe_`, which carries it out.

`slimlm quantize` builds one from its flags and the `slimlm compress` chain from a YAML stage; both then run
the same function: calibration text -> optional SmoothQuant -> the method (rtn, gptq, qat) or static calibration.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from typing import Any

from slimlm.compress.static_int8 import OBSERVERS
from slimlm.errors import InputError
from slimlm.model import Transformer
from slimlm.quantize.schemes import SCHEMES, check_scheme, quantize_model_

METHODS = ("rtn", "gptq", "qat")


@dataclass
class QuantizeConfig:
    """What `slimlm quantize` and a compression chain's quantize stage do: one field per flag / recipe key."""

    # int8: weight-only per channel; int8-dynamic: + activations per token; int8-static: + one calibrated
    # activation scale per layer; int4: grouped
    scheme: str = field(default="int8", metadata={"choices": SCHEMES})
    # rtn = round to nearest; gptq (int4) = data-aware, uses calibration text; qat (int4, int8) = train through
    # the rounding on calibration text, then convert
    method: str = field(default="rtn", metadata={"choices": METHODS})
    group_size: int = 64  # int4 group size: 32, 64 or 128
    # SmoothQuant alpha before quantizing (int8-dynamic/static; 0.5 is the paper's); uses calibration text
    smooth: float | None = field(default=None, metadata={"metavar": "ALPHA"})
    # int8-static: activation range from the max |x| (minmax) or a percentile of |x|
    observer: str = field(default="minmax", metadata={"choices": OBSERVERS})
    percentile: float = 99.99  # int8-static: the percentile of --observer percentile and of --dynamic-above
    # int8-static: layers whose max |x| exceeds this times the percentile run per-token dynamic (None, or 0 on
    # the command line: none)
    dynamic_above: float | None = 4.0
    qat_steps: int = 100  # qat: optimizer steps (batch --qat-batch)
    qat_lr: float = 1e-5  # qat: peak learning rate (warmup, cosine)
    qat_batch: int = 4  # qat: calibration windows per step
    # qat: kd = KL to the full-precision model (self-distillation); ce = next-token loss on the text
    qat_loss: str = field(default="kd", metadata={"choices": ("kd", "ce")})
    # calibration text for gptq, int8-static and --smooth (qat: its training text); None: the built-in corpus's
    # calibration split (never the held-out one)
    calib_file: str | None = None
    calib_samples: int = 32  # calibration sequences
    calib_seq_len: int = 512  # tokens per calibration sequence

    def validate(self) -> None:
        """Raise one ValueError naming every problem."""
        errors = []
        try:
            check_scheme(self.scheme, self.group_size)
        except ValueError as e:
            errors.append(str(e))
        if self.method not in METHODS:
            errors.append(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method == "gptq" and self.scheme != "int4":
            errors.append("method gptq is for scheme int4")
        if self.method == "qat" and self.scheme not in ("int4", "int8"):
            errors.append("method qat is for the weight-only schemes int4 and int8")
        if self.qat_loss not in ("kd", "ce"):
            errors.append(f"qat_loss must be kd or ce, got {self.qat_loss!r}")
        if self.observer not in OBSERVERS:
            errors.append(f"unknown observer {self.observer!r}; choose one of {', '.join(OBSERVERS)}")
        if self.smooth is not None and not 0 <= self.smooth <= 1:
            errors.append(f"smooth (alpha) must be in [0, 1], got {self.smooth}")
        for name in ("qat_steps", "qat_batch", "calib_samples", "calib_seq_len"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if errors:
            raise InputError("; ".join(errors))

    @property
    def needs_calibration(self) -> bool:
        return self.smooth is not None or self.method != "rtn" or self.scheme == "int8-static"


def quantize_by_recipe_(
    model: Transformer, tokenizer: Any, recipe: QuantizeConfig, progress: bool = True
) -> dict[str, Any]:
    """Quantize `model` in place as the recipe says; returns what was done (for logs and ledgers)."""
    from slimlm.eval.corpus import calibration_ids

    recipe.validate()
    info: dict[str, Any] = {"scheme": recipe.scheme, "method": recipe.method}
    calib = None
    if recipe.needs_calibration:
        extra = 1 if recipe.method == "qat" else 0  # QAT trains on windows one token longer (next-token targets)
        calib = calibration_ids(tokenizer, recipe.calib_file, recipe.calib_samples, recipe.calib_seq_len + extra)
    if recipe.smooth is not None:
        from slimlm.compress.smoothquant import smooth_model_

        info["smoothing"] = smooth_model_(model, calib, recipe.smooth)
    if recipe.method == "gptq":
        from slimlm.compress.gptq import gptq_quantize_model_

        gptq_quantize_model_(model, calib, recipe.group_size)
    elif recipe.method == "qat":
        from slimlm.compress.qat import convert_qat_, prepare_qat_, qat_train_

        teacher = copy.deepcopy(model).eval() if recipe.qat_loss == "kd" else None
        prepare_qat_(model, recipe.scheme, recipe.group_size)
        with tempfile.TemporaryDirectory(prefix="slimlm-qat-") as tmp:  # the trainer's metrics; nothing to keep
            res = qat_train_(
                model,
                calib,
                tmp,
                steps=recipe.qat_steps,
                lr=recipe.qat_lr,
                batch_size=recipe.qat_batch,
                teacher=teacher,
                progress=progress,
            )
        del teacher
        info["qat"] = {"steps": res.steps, "final_loss": res.final_loss, "tokens_per_s": res.tokens_per_s}
        convert_qat_(model)
    elif recipe.scheme == "int8-static":
        from slimlm.compress.static_int8 import calibrate_input_scales

        scales = calibrate_input_scales(model, calib, recipe.observer, recipe.percentile, recipe.dynamic_above)
        quantize_model_(model, recipe.scheme, input_scales=scales)
        info["static"] = {
            "observer": recipe.observer,
            "layers": len(scales),
            "percentile": recipe.percentile,
            "dynamic_layers": [n for n, s in scales.items() if s is None],
        }
    else:
        quantize_model_(model, recipe.scheme, recipe.group_size)
    return info


__all__ = ["METHODS", "SCHEMES", "QuantizeConfig", "quantize_by_recipe_"]
