"""Static INT8 calibration: one activation scale per linear layer, fixed ahead of time from calibration text.

Each linear layer's input |x| is watched by an observer while the full-precision model runs over calibration
sequences; its scale is then s_x = range / 127 and `StaticInt8Linear` quantizes x with it at run time.

- `minmax` (default): range = the largest |x| seen. Nothing clips, but one outlier token stretches the grid for all.
- `percentile`: range = the p-th percentile of |x| over every calibration value (p = 99.99 by default): the rarest
  largest values clip, everything else gets a finer grid. Computed exactly, not from a histogram: with N, the
  number of values the layer will see, known ahead, only the top ceil(N * (1 - p/100)) + 1 values can decide it,
  so the observer keeps just those (a few thousand per layer).

Llama activations have outlier channels that make any per-tensor scale coarse; run compress/smoothquant.py first
(`slimlm quantize --scheme int8-static --smooth 0.65`). A few layers also see rare tokens far beyond the rest;
`dynamic_above` hands those layers to per-token dynamic scales (see calibrate_input_scales). On SmolLM2-135M,
clipping (percentile) measured worse than minmax: the rare large values carry meaning. The observed model must be
unquantized.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from slimlm.errors import InputError
from slimlm.model import Transformer
from slimlm.quantize.schemes import named_quantizable_linears

OBSERVERS = ("minmax", "percentile")


class AbsObserver:
    """Forward hook keeping the max of |x| and the exact top tail needed for the `percentile` of |x|.

    `expected` is how many values the layer will see in all (the tail's size follows from it).
    """

    def __init__(self, percentile: float | None = 99.99, expected: int = 0):
        self.percentile, self.count, self.expected = percentile, 0, expected
        self.max = torch.zeros(())
        self.keep = 1 + (0 if percentile is None else _above(expected, percentile))
        self.tail = torch.empty(0)  # the largest values seen, descending

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0].detach().abs().float().flatten()
        self.count += x.numel()
        self.max = torch.maximum(self.max, x.max())
        if self.percentile is not None:
            both = torch.cat([self.tail, x])
            self.tail = both.topk(min(self.keep, both.numel())).values

    def value(self) -> float:
        """The observed range: max |x| (minmax) or the percentile of |x| (the value with k = ceil(N(1-p)) above)."""
        if self.percentile is None:
            return float(self.max)
        k = _above(self.count, self.percentile)
        if self.count > self.expected:
            raise RuntimeError(f"the observer saw {self.count} values, more than the {self.expected} expected")
        return float(self.tail[k])


def _above(n: int, percentile: float) -> int:
    """How many of n values lie above the percentile: ceil(n * (100 - p) / 100), rounded first so that float
    noise (100 - 99.99 = 0.0100000000000051) cannot add one."""
    return math.ceil(round(n * (100 - percentile) / 100, 6))


@torch.no_grad()
def calibrate_input_scales(
    model: Transformer,
    calib_ids: torch.Tensor,
    observer: str = "minmax",
    percentile: float = 99.99,
    dynamic_above: float | None = 4.0,
    batch_size: int = 4,
) -> dict[str, float | None]:
    """{linear name: input scale (range / 127), or None} from running `model` over calib_ids [N, T].

    None marks a layer whose largest |x| is more than `dynamic_above` times the `percentile` of |x|: a few rare
    tokens reach far beyond the rest (the "massive activations" of LLMs, found in some down_proj inputs), so no single
    scale serves it — clipping them breaks the model and covering them leaves the rest ~2 bits. quantize_model_
    gives those layers per-token dynamic scales instead (same int8 GEMM). dynamic_above=None keeps every layer static.
    """
    if observer not in OBSERVERS:
        raise InputError(f"unknown observer {observer!r}; choose one of {', '.join(OBSERVERS)}")
    if not 50.0 < percentile <= 100.0:
        raise InputError(f"percentile must be in (50, 100], got {percentile}")
    if dynamic_above is not None and dynamic_above < 1:
        raise InputError(f"dynamic_above must be >= 1 (a ratio of max |x| to its percentile), got {dynamic_above}")
    if model.quantization:
        raise InputError("calibrate the full-precision model, before it is quantized")
    layers = named_quantizable_linears(model)
    bad = [n for n, layer in layers.items() if not isinstance(layer, nn.Linear)]
    if bad:
        raise InputError(f"static calibration needs plain nn.Linear layers ({bad[0]} is not): merge adapters first")
    observers = {n: AbsObserver(percentile, calib_ids.numel() * layer.in_features) for n, layer in layers.items()}
    hooks = [layers[n].register_forward_hook(obs) for n, obs in observers.items()]
    try:
        model.eval()
        for i in range(0, calib_ids.shape[0], batch_size):
            model(calib_ids[i : i + batch_size])
    finally:
        for h in hooks:
            h.remove()
    scales: dict[str, float | None] = {}
    for n, obs in observers.items():
        top, pct = float(obs.max), max(obs.value(), 1e-8)
        dynamic = dynamic_above is not None and top > dynamic_above * pct
        scales[n] = None if dynamic else max(top if observer == "minmax" else pct, 1e-8) / 127
    return scales
