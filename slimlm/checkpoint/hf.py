"""HF-format checkpoints: read and write folders of `config.json` + `*.safetensors` (+ tokenizer files).

Our module names are HF's without the leading `model.`, so the name map is a literal table of patterns.
Only safetensors are read: pickled `.bin` weights are never unpickled.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from slimlm.checkpoint.atomic import atomic_folder
from slimlm.checkpoint.materialize import CheckpointError, build_model
from slimlm.config import ConfigError, ModelConfig
from slimlm.model import Transformer

# HF name pattern -> slimlm name pattern; {} is a layer index.
HF_TO_SLIMLM = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    **{f"model.layers.{{}}.{m}.{p}": f"layers.{{}}.{m}.{p}"
       for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
       for p in ("weight", "bias")},
    "model.layers.{}.input_layernorm.weight": "layers.{}.input_layernorm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.post_attention_layernorm.weight",
}
SLIMLM_TO_HF = {v: k for k, v in HF_TO_SLIMLM.items()}
IGNORED_HF_KEYS = re.compile(r".*rotary_emb\.inv_freq$")  # buffers some old exports saved; recomputed here
_LAYER = re.compile(r"\.(\d+)\.")


def _convert(name: str, table: dict[str, str]) -> str | None:
    m = _LAYER.search(name)
    pattern = name[:m.start()] + ".{}." + name[m.end():] if m else name
    target = table.get(pattern)
    return target.format(m.group(1)) if (target and m) else target


def hf_to_slimlm_name(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `layers.3.self_attn.q_proj.weight`; unknown names raise."""
    out = _convert(name, HF_TO_SLIMLM)
    if out is None:
        raise CheckpointError(f"unknown tensor {name!r} in HF checkpoint; slimlm maps only Llama-family "
                              "decoder weights (embed, q/k/v/o, gate/up/down, norms, lm_head)")
    return out


def slimlm_to_hf_name(name: str) -> str:
    out = _convert(name, SLIMLM_TO_HF)
    if out is None:
        raise CheckpointError(f"tensor {name!r} has no HF name; merge or remove adapters before saving an HF folder")
    return out


def read_hf_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; point --model at an HF model folder")
    try:
        return ModelConfig.from_hf(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download or fix the file") from None
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder: those named by model.safetensors.index.json, else every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{folder}: shards {', '.join(absent)} named in {index.name} are missing; "
                                  "download the whole model folder")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = list(folder.glob("*.bin")) + list(folder.glob("*.pt"))
        hint = " (it has pickled .bin/.pt weights, which slimlm does not unpickle: convert them to safetensors)" if bins else ""
        raise CheckpointError(f"{folder} has no *.safetensors weights{hint}")
    return files


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors_header(f: Path, handle) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset where tensor data begins; checks the file size."""
    size = f.stat().st_size
    raw = handle.read(8)
    n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
    if n < 2 or 8 + n > size:
        raise CheckpointError(f"{f} has no valid safetensors header; the file is truncated or corrupt, download it again")
    try:
        header = json.loads(handle.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{f} has a corrupt safetensors header; download it again") from None
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{f} is truncated ({size:,} bytes, its header describes {8 + n + end:,}); "
                              "download it again")
    return header, 8 + n


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
                if info.get("dtype") not in SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{f}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
                begin, end = info["data_offsets"]
                handle.seek(data_start + begin)
                buf = bytearray(end - begin)
                handle.readinto(buf)
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                tensor = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
                yield hf_to_slimlm_name(key), tensor.view(info["shape"])


def load_hf_folder(folder: str | Path, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> tuple[ModelConfig, Transformer]:
    """Load config and weights from an HF model folder."""
    folder = Path(folder)
    config = read_hf_config(folder)
    quant = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    if quant.get("quant_method") == "slimlm":  # packed int8/int4 weights written by quantize.save_quantized
        from slimlm.quantize.model import load_quantized

        return config, load_quantized(folder, quant, dtype, device)
    if quant:
        raise CheckpointError(f"{folder}: {quant.get('quant_method')!r}-quantized checkpoints are not supported; "
                              "load the unquantized model and quantize it with slimlm (slimlm quantize)")
    files = safetensors_files(folder)
    return config, build_model(config, iter_hf_tensors(files), dtype, device, str(folder))


def _stop_ids(eos: Any) -> list[int]:
    return [eos] if isinstance(eos, int) else list(eos or [])


def write_model_files(folder: Path, config: ModelConfig, tokenizer: Any = None, eos_token_ids: list[int] | None = None,
                      **extra: Any) -> None:
    """config.json (HF keys + `extra`), generation_config.json and the tokenizer files (an HF tokenizer object)."""
    hf_config = {**config.to_hf(), **extra}
    eos = eos_token_ids or _stop_ids(config.eos_token_id)
    eos_value = eos[0] if len(eos) == 1 else eos
    if eos:
        hf_config["eos_token_id"] = eos_value
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": eos_value if eos else None}
    (folder / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None}, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def save_hf_folder(model: Transformer, folder: str | Path, tokenizer: Any = None,
                   eos_token_ids: list[int] | None = None, dtype: torch.dtype | None = None) -> Path:
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
