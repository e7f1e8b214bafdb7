"""TorchScript export: the decoder (export/decoder.py layout) traced into one .pt file that `torch.jit.load` runs
without slimlm's Python code (C++ via libtorch, or Python with only torch installed).

Quantized models keep slimlm's own layers, whose kernels are ATen ops (torch._weight_int8pack_mm,
torch._weight_int4pack_mm_for_cpu, torch._int_mm), so the file stays int8/int4 and runs the same kernels. Tracing
records one path through the code; the parity check afterwards runs shapes other than the traced ones (another
batch size, prompt length and past length) to show the graph is not specialised to them. PyTorch marks
TorchScript as in maintenance; ONNX (export/onnx.py) is the portable format for other runtimes.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from slimlm.export.decoder import ExportDecoder, example_inputs, io_names
from slimlm.model import Transformer

TORCHSCRIPT_FILE = "model.pt"


@torch.no_grad()
def export_torchscript(model: Transformer, tokenizer: Any, out: str | Path, check: bool = True) -> dict[str, Any]:
    """Trace `model` (plain or quantized) and write out/model.pt + config + tokenizer; returns the metadata."""
    from slimlm.checkpoint.atomic import atomic_folder
    from slimlm.export.onnx import METADATA_FILE, write_export_files

    t0 = time.perf_counter()
    decoder = ExportDecoder(model.eval()).eval()
    example = example_inputs(model, batch=2, seq=3, past=2)
    decoder(*example)  # builds the int4 kernel layout once, so the trace records only the matmul
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice and tracer warnings about shape ints
        traced = torch.jit.trace(decoder, example, check_trace=False)
    inputs, outputs = io_names(model.config.n_layers)
    meta = {
        "format": "torchscript",
        "layout": "hf-decoder-with-past",
        "file": TORCHSCRIPT_FILE,
        "inputs": inputs,
        "outputs": outputs,
        "quantization": model.quantization,
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    with atomic_folder(out) as tmp:
        traced.save(str(tmp / TORCHSCRIPT_FILE))
        write_export_files(model, tokenizer, tmp)
        if check:
            meta["parity"] = check_torchscript(tmp / TORCHSCRIPT_FILE, model)
        meta["export_s"] = round(time.perf_counter() - t0, 1)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2))
    return meta


@torch.no_grad()
def check_torchscript(path: str | Path, model: Transformer) -> dict[str, float]:
    """Max |logit difference| between the loaded file and the PyTorch model, at shapes the trace did not see.

    The reference runs torch's own kernels, as the traced file does (it must run without slimlm): slimlm's int8 CPU
    kernel (slimlm/kernels) keeps fp32 activations where torch's int8 kernel rounds them to bf16.
    """
    from slimlm import kernels

    loaded = torch.jit.load(str(path))
    reference = ExportDecoder(model)
    worst = 0.0
    for batch, seq, past in ((1, 7, 0), (3, 1, 5), (2, 4, 9)):
        inputs = example_inputs(model, batch, seq, past)
        with kernels.disabled():
            want = reference(*inputs)
        got = loaded(*inputs)
        worst = max(worst, max(float((g.float() - w.float()).abs().max()) for g, w in zip(got, want)))
    return {"max_logit_diff": worst}
