"""Export a model to ONNX (the HF/Optimum decoder layout with a KV cache) and check it in ONNX Runtime.

`export_onnx` writes a folder: model.onnx (one graph for prefill and decode, dynamic batch and lengths; see
export/decoder.py for its inputs and outputs), config.json, generation_config.json, the tokenizer files and
slimlm_export.json (layout, quantization, the parity measured right after export). Quantized models keep their
codes: int8 and int4 layers become MatMulNBits nodes (export/onnx_ops.py), the int8 embedding a Gather on the
int8 table, so the file is about as small as the quantized safetensors.

Uses torch.onnx's dynamo exporter (torch.export -> onnxscript). Needs the `export` extra: onnx, onnxscript and
onnxruntime.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from slimlm.errors import InputError
from slimlm.export.decoder import ExportDecoder, example_inputs, io_names
from slimlm.export.ort import METADATA_FILE, OrtSession, left_padded
from slimlm.model import Transformer

ONNX_FILE = "model.onnx"
LAYOUT = "hf-decoder-with-past"  # the input/output names and shapes of export/decoder.py
PROBE = "ONNX Runtime runs the same decoder: the quick brown fox jumps over the lazy dog."


def require_onnx() -> None:
    """Import-check the export extra, with the install command in the message."""
    missing = []
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise InputError(
            f"ONNX export needs {', '.join(missing)}: pip install 'slimlm[export]' "
            "(or pip install onnx onnxscript onnxruntime)"
        )


def export_form(model: Transformer, int8_compute: bool = True) -> tuple[Transformer, dict[str, int]]:
    """A fp32 copy of `model` with quantized layers in their export forms (MatMulNBits), and what was swapped."""
    from slimlm.export.onnx_ops import swap_quantized_for_export_

    m = copy.deepcopy(model).eval()
    counts = swap_quantized_for_export_(m, int8_compute)
    return m.float(), counts


def export_onnx(
    model: Transformer, tokenizer: Any, out: str | Path, check: bool = True, int8_compute: bool = True
) -> dict[str, Any]:
    """Write `model` (plain or quantized by slimlm, fp32 activations) as an ONNX folder; returns the metadata.

    int8_compute (quantized models): MatMulNBits nodes get accuracy_level 4, ORT's fast CPU path, which quantizes
    activations to int8 per block; False keeps fp32 arithmetic on the stored codes (exact, but ORT 1.32's CPU
    kernels for that are slow: see export/onnx_ops.py).
    check=True runs a probe through ONNX Runtime and PyTorch (prefill of two left-padded rows, then two decode
    steps) and records the largest logit difference; the export-form model (same codes, fp32 arithmetic) is the
    reference, and for quantized models the difference to slimlm's own kernels is recorded as well.
    """
    from slimlm.checkpoint.atomic import atomic_folder
    from slimlm.export.onnx_ops import custom_translation_table

    require_onnx()
    t0 = time.perf_counter()
    form, swapped = export_form(model, int8_compute)
    decoder = ExportDecoder(form).eval()
    inputs, outputs = io_names(form.config.n_layers)
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    total = torch.export.Dim("total")
    shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past} for _ in inputs[3:]),
    }
    with torch.no_grad():
        program = torch.onnx.export(
            decoder,
            example_inputs(form),
            dynamic_shapes=shapes,
            input_names=inputs,
            output_names=outputs,
            dynamo=True,
            optimize=True,
            verbose=False,
            custom_translation_table=custom_translation_table(),
        )
    meta = {
        "format": "onnx",
        "layout": LAYOUT,
        "file": ONNX_FILE,
        "inputs": inputs,
        "outputs": outputs,
        "quantization": model.quantization,
        "swapped_layers": swapped,
        "int8_compute": bool(swapped) and int8_compute,
        "n_layers": form.config.n_layers,
        "export_s": 0.0,
    }
    with atomic_folder(out) as tmp:
        program.save(str(tmp / ONNX_FILE), external_data=False)
        write_export_files(form, tokenizer, tmp)
        meta["export_s"] = round(time.perf_counter() - t0, 1)
        meta["onnx_bytes"] = (tmp / ONNX_FILE).stat().st_size
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2))
        if check:
            meta["parity"] = check_parity(tmp, form, tokenizer, original=model)
            (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def write_export_files(model: Transformer, tokenizer: Any, folder: Path) -> None:
    """config.json, generation_config.json and the tokenizer files next to an exported model."""
    from slimlm.checkpoint.hf import write_model_files

    write_model_files(folder, model.config, tokenizer.hf if tokenizer is not None else None)


@torch.no_grad()
def check_parity(
    folder: str | Path, reference: Transformer, tokenizer: Any = None, original: Transformer | None = None
) -> dict[str, float]:
    """Max |logit difference| between ONNX Runtime and PyTorch over a prefill and two decode steps."""
    session = OrtSession(folder)
    vocab = reference.config.vocab_size
    ids = tokenizer.encode(PROBE) if tokenizer is not None else list(range(1, 17))
    ids = [i % vocab for i in ids][:32]
    short = ids[: max(1, len(ids) // 2)]
    out = {"max_logit_diff": _rollout_diff(session, reference, [ids, short])}
    if original is not None and original.quantization:
        out["max_logit_diff_vs_slimlm_kernels"] = _rollout_diff(session, original, [ids, short])
    return out


def _rollout_diff(session, model: Transformer, prompts: list[list[int]], steps: int = 2) -> float:
    """Left-padded prefill, then greedy decode steps (tokens from ORT); max |Δ logit| vs ExportDecoder(model)."""
    reference = ExportDecoder(model)
    ids, mask = left_padded(prompts, pad_id=0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ort_past = session.empty_past(len(prompts))
    ref_past = [torch.from_numpy(p).to(model.dtype) for p in ort_past]
    worst = 0.0
    for _ in range(steps + 1):
        logits, ort_past = session.run(ids, mask, pos, ort_past)
        ref_logits, *ref_past = reference(ids, mask, pos, *ref_past)
        worst = max(worst, float((logits - ref_logits.float()).abs().max()))
        ids = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        pos = pos[:, -1:] + 1
    return worst
