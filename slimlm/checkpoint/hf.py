"""HF-format checkpoints: read and write folders of `config.json` + `*.safetensors` (+ tokenizer files).

Our module names are HF's without the leading `model.`, so the name map is a literal table of patterns.
Only safetensors are read: pickled `.bin` weights are never unpickled.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from slimlm.checkpoint.atomic import atomic_folder
from slimlm.checkpoint.materialize import CheckpointError, build_model, check_layer_count
from slimlm.config import ConfigError, ModelConfig
from slimlm.jsonl import read_json_object
from slimlm.model import Transformer

# HF name pattern -> slimlm name pattern; {} is a layer index.
HF_TO_SLIMLM = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    **{
        f"model.layers.{{}}.{m}.{p}": f"layers.{{}}.{m}.{p}"
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
        for p in ("weight", "bias")
    },
    "model.layers.{}.input_layernorm.weight": "layers.{}.input_layernorm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.post_attention_layernorm.weight",
}
SLIMLM_TO_HF = {v: k for k, v in HF_TO_SLIMLM.items()}
IGNORED_HF_KEYS = re.compile(r".*rotary_emb\.inv_freq$")  # buffers some old exports saved; recomputed here
_LAYER = re.compile(r"\.(\d+)\.")


def _convert(name: str, table: dict[str, str]) -> str | None:
    m = _LAYER.search(name)
    pattern = name[: m.start()] + ".{}." + name[m.end() :] if m else name
    target = table.get(pattern)
    return target.format(m.group(1)) if (target and m) else target


def hf_to_slimlm_name(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `layers.3.self_attn.q_proj.weight`; unknown names raise."""
    out = _convert(name, HF_TO_SLIMLM)
    if out is None:
        raise CheckpointError(
            f"unknown tensor {name!r} in HF checkpoint; slimlm maps only Llama-family "
            "decoder weights (embed, q/k/v/o, gate/up/down, norms, lm_head)"
        )
    return out


def slimlm_to_hf_name(name: str) -> str:
    out = _convert(name, SLIMLM_TO_HF)
    if out is None:
        raise CheckpointError(f"tensor {name!r} has no HF name; merge or remove adapters before saving an HF folder")
    return out


# The config.json model_type of a packed folder: transformers prints it in its "does not recognize this architecture"
# error, so it says what the folder is and what to do instead.
QUANTIZED_MODEL_TYPE = (
    "slimlm-quantized: packed int8/int4 weights that only slimlm reads. Load this folder with "
    "slimlm.load() or `slimlm generate --model`; for transformers, llama.cpp or vLLM use the "
    "unquantized model it was made from (see `slimlm quantize --help`)"
)


def hf_config_of_quantized(hf: dict) -> dict:
    """The config.json dict of a packed folder with its real model_type back (old folders pass through)."""
    quant = hf.get("quantization_config")
    if hf.get("model_type") == QUANTIZED_MODEL_TYPE and isinstance(quant, dict) and "model_type" in quant:
        return {**hf, "model_type": quant["model_type"]}
    return hf


def read_config_json(folder: Path) -> dict:
    """config.json of an HF folder as a dict (the one read of it per load)."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; point --model at an HF model folder")
    return read_json_object(path)


def read_hf_config(folder: Path, hf: dict | None = None) -> ModelConfig:
    """The folder's ModelConfig (from `hf`, its config.json dict, when already read)."""
    try:
        return ModelConfig.from_hf(hf_config_of_quantized(hf if hf is not None else read_config_json(folder)))
    except ConfigError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder: those named by model.safetensors.index.json, else every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(
                f"{index} has no valid weight_map (tensor name -> shard file); re-download the model folder"
            )
        names = sorted(set(weight_map.values()))
        files = [folder / n for n in names]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(
                f"{folder}: shards {', '.join(absent)} named in {index.name} are missing; "
                "download the whole model folder"
            )
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = list(folder.glob("*.bin")) + list(folder.glob("*.pt"))
        hint = (
            " (it has pickled .bin/.pt weights, which slimlm does not unpickle: convert them to safetensors)"
            if bins
            else ""
        )
        raise CheckpointError(f"{folder} has no *.safetensors weights{hint}")
    return files


MAX_HEADER_BYTES = 100 * 2**20  # the reference reader's limit: a larger length prefix is corruption, not a header
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _tensor_spec_error(key: str, info: Any) -> str | None:
    """Why one header entry is not a valid tensor description (None if it is)."""
    if not isinstance(info, dict):
        return f"entry {key!r} is not a tensor description"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        return f"tensor {key!r} has unsupported dtype {dtype!r}"
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return f"tensor {key!r} has an invalid shape {shape!r}"
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        return f"tensor {key!r} has invalid data_offsets {offsets!r}"
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        span = offsets[1] - offsets[0]
        return f"tensor {key!r} ({dtype} {shape}) should span {nbytes:,} bytes, its data_offsets span {span:,}"
    return None


def check_safetensors_header(header: Any, data_bytes: int) -> str | None:
    """Why a parsed safetensors header does not describe the file (None if it does).

    The same rules as the reference reader: every tensor has a known dtype, a shape and offsets whose span is
    exactly its size, and the tensors tile the data region with no gap, overlap or trailing bytes. With these, a
    flipped bit anywhere in the header (outside `__metadata__`) or a cut anywhere in the file is caught here.
    """
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    if not isinstance(header.get("__metadata__", {}), dict):
        return "__metadata__ is not a JSON object"
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for key, info in tensors.items():
        if (problem := _tensor_spec_error(key, info)) is not None:
            return problem
    end = 0
    for key, info in sorted(tensors.items(), key=lambda kv: kv[1]["data_offsets"]):
        if info["data_offsets"][0] != end:
            return f"tensor {key!r} starts at byte {info['data_offsets'][0]:,} of the data, expected {end:,}"
        end = info["data_offsets"][1]
    if end != data_bytes:
        how = "truncated" if end > data_bytes else "followed by stray bytes"
        return f"the file is {how} (the header describes {end:,} bytes of tensor data, the file holds {data_bytes:,})"
    return None


def _parse_safetensors_header(f: Path, handle) -> tuple[dict[str, Any], int]:
    """The whole checked header (with `__metadata__`) and the offset where tensor data begins."""
    size = f.stat().st_size
    raw = handle.read(8)
    n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
    if n < 2 or 8 + n > size or n > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{f} has no valid safetensors header; the file is truncated or corrupt, download it again"
        )
    try:
        header = json.loads(handle.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{f} has a corrupt safetensors header; download it again") from None
    problem = check_safetensors_header(header, size - 8 - n)
    if problem is not None:
        raise CheckpointError(f"{f} is corrupt: {problem}; download it again")
    return header, 8 + n


def read_safetensors_header(f: Path, handle) -> tuple[dict[str, Any], int]:
    """The tensor entries of a safetensors file's header and the offset where tensor data begins.

    Raises CheckpointError naming the file if the header is unreadable or does not match the file (see
    check_safetensors_header), so a corrupt file is refused before any tensor is read.
    """
    header, data_start = _parse_safetensors_header(f, handle)
    header.pop("__metadata__", None)
    return header, data_start


def load_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file, after the header check above (errors name the file, never a traceback)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    with open(path, "rb") as handle:
        read_safetensors_header(path, handle)
    try:
        return load_file(str(path), device=device)
    except SafetensorError as e:
        raise CheckpointError(f"{path} cannot be read ({e}); the file is corrupt, download or save it again") from None


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors file ({} if none), after the header check."""
    path = Path(path)
    with open(path, "rb") as handle:
        header, _ = _parse_safetensors_header(path, handle)
    return {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}


def iter_hf_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(slimlm name, tensor) for every weight in the files, one tensor in memory at a time.

    Reads with plain file I/O instead of safetensors' memory map: mapped pages of a large fp32 file stay resident
    while it is open, which would double peak memory when loading in bf16.
    """
    for f in files:
        with open(f, "rb") as handle:
            header, data_start = read_safetensors_header(f, handle)
            for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if IGNORED_HF_KEYS.match(key):
                    continue
                begin, end = info["data_offsets"]
                handle.seek(data_start + begin)
                # torch.empty, not bytearray(n): the latter zero-fills holding the GIL, which stalls the server's
                # other engines while one model loads; readinto releases it.
                buf = torch.empty(end - begin, dtype=torch.uint8)
                handle.readinto(buf.numpy())
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                tensor = buf.view(dtype) if len(buf) else torch.empty(0, dtype=dtype)
                yield _slimlm_name_in(f, key), tensor.view(info["shape"])


def _slimlm_name_in(f: Path, key: str) -> str:
    try:
        return hf_to_slimlm_name(key)
    except CheckpointError as e:
        raise CheckpointError(f"{f}: {e}") from None


def load_hf_folder(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: ModelConfig | None = None,
) -> tuple[ModelConfig, Transformer]:
    """Load config and weights from an HF model folder of plain (unquantized) weights; `checkpoint.load_folder`
    also reads quantized ones. `config`: the folder's, when the caller has read config.json already."""
    folder = Path(folder)
    config = config or read_hf_config(folder)
    files = safetensors_files(folder)
    check_layer_count(config, tensor_names(files), folder)
    return config, build_model(config, iter_hf_tensors(files), dtype, device, str(folder))


def tensor_names(files: list[Path]) -> list[str]:
    """The tensor names in the files' headers (each header is checked; no tensor data is read)."""
    names = []
    for f in files:
        with open(f, "rb") as handle:
            names += read_safetensors_header(f, handle)[0]
    return names


def _stop_ids(eos: Any) -> list[int]:
    return [eos] if isinstance(eos, int) else list(eos or [])


def write_model_files(
    folder: Path, config: ModelConfig, tokenizer: Any = None, eos_token_ids: list[int] | None = None, **extra: Any
) -> None:
    """config.json (HF keys + `extra`), generation_config.json and the tokenizer files (an HF tokenizer object)."""
    hf_config = {**config.to_hf(), **extra}
    eos = eos_token_ids or _stop_ids(config.eos_token_id)
    eos_value = eos[0] if len(eos) == 1 else eos
    if eos:
        hf_config["eos_token_id"] = eos_value
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": eos_value if eos else None}
    (folder / "generation_config.json").write_text(
        json.dumps({k: v for k, v in gen.items() if v is not None}, indent=2)
    )
    if tokenizer is not None:
        from slimlm.tokenizer import save_tokenizer

        save_tokenizer(tokenizer, folder)  # readable by transformers 4.x too


def save_hf_folder(
    model: Transformer,
    folder: str | Path,
    tokenizer: Any = None,
    eos_token_ids: list[int] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write config.json, model.safetensors, generation_config.json (and the tokenizer) to `folder`, atomically.

    Everything is written to a temporary sibling folder first and renamed into place, so a crash leaves either the
    old folder or the new one, never half of one.
    """
    folder = Path(folder)
    config = model.config
    state = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: HF re-ties it from the embedding
        state[slimlm_to_hf_name(name)] = t.detach().to(dtype or t.dtype).contiguous().cpu()
    torch_dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    with atomic_folder(folder) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_model_files(tmp, config, tokenizer, eos_token_ids, torch_dtype=torch_dtype)
    return folder
