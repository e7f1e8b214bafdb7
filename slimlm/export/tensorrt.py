"""TensorRT: build an engine from an ONNX export (export/onnx.py) where `tensorrt` and a CUDA GPU are present.

The engine gets one optimization profile covering batch 1..max_batch and 1..max_len tokens (prompt and past), and
fp16 kernels unless told otherwise. Quantized exports are refused: their MatMulNBits nodes are an ONNX Runtime
contrib op that TensorRT's ONNX parser does not know (build from an fp32 export; TensorRT-LLM / ModelOpt quantize
for TensorRT). Without CUDA + tensorrt the functions here raise one clear error; nothing is emulated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimlm.errors import InputError, SlimlmError

ENGINE_FILE = "model.plan"


def require_tensorrt():
    """The tensorrt module, or ValueError saying what is missing."""
    import torch

    try:
        import tensorrt as trt
    except ImportError:
        trt = None
    if trt is None or not torch.cuda.is_available():
        missing = " and ".join(
            m
            for m, ok in (("a CUDA GPU", torch.cuda.is_available()), ("the tensorrt package", trt is not None))
            if not ok
        )
        raise InputError(
            f"TensorRT export requires CUDA + tensorrt: {missing} not found here. Export ONNX "
            "(slimlm export onnx) and build the engine on a machine with an NVIDIA GPU "
            "(pip install tensorrt)"
        )
    return trt


def build_tensorrt_engine(
    onnx_folder: str | Path,
    out: str | Path,
    max_batch: int = 8,
    max_len: int = 2048,
    opt_len: int = 128,
    fp16: bool = True,
    workspace_gib: float = 4.0,
) -> dict[str, Any]:
    """Parse onnx_folder/model.onnx, build a serialized engine into out/model.plan (atomically); returns metadata."""
    from slimlm.checkpoint.atomic import atomic_folder
    from slimlm.export.onnx import METADATA_FILE

    onnx_folder = Path(onnx_folder)
    meta_path = onnx_folder / METADATA_FILE
    if not meta_path.is_file():
        raise InputError(f"{onnx_folder} is not a slimlm ONNX export (no {METADATA_FILE})")
    meta = json.loads(meta_path.read_text())
    if meta.get("quantization"):
        raise InputError(
            "this ONNX export is quantized (MatMulNBits, an ONNX Runtime op TensorRT cannot parse): "
            "build the engine from an unquantized export"
        )
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_folder / meta["file"])):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputError(f"TensorRT could not parse {onnx_folder / meta['file']}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    config.add_optimization_profile(_profile(builder, network, max_batch, max_len, opt_len))
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise SlimlmError("TensorRT failed to build the engine (see its log above)")
    info = {
        "format": "tensorrt",
        "file": ENGINE_FILE,
        "from_onnx": str(onnx_folder),
        "fp16": fp16,
        "max_batch": max_batch,
        "max_len": max_len,
        "tensorrt": trt.__version__,
    }
    with atomic_folder(out) as tmp:
        (tmp / ENGINE_FILE).write_bytes(bytes(engine))
        (tmp / METADATA_FILE).write_text(json.dumps({**meta, **info}, indent=2))
    return info


def _profile(builder, network, max_batch: int, max_len: int, opt_len: int):
    """min/opt/max shapes of every dynamic input: ids/positions [B, T], mask [B, P+T], past [B, Hkv, P, hd]."""
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if t.name in ("input_ids", "position_ids"):
            shapes = (1, 1), (1, opt_len), (max_batch, max_len)
        elif t.name == "attention_mask":
            shapes = (1, 1), (1, opt_len), (max_batch, max_len)
        else:  # past_key_values.*: [B, Hkv, P, hd]
            heads, hd = t.shape[1], t.shape[3]
            shapes = (1, heads, 0, hd), (1, heads, opt_len, hd), (max_batch, heads, max_len - 1, hd)
        profile.set_shape(t.name, *shapes)
    return profile
