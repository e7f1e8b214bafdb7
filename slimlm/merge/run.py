"""Run a merge recipe over HF model folders, one tensor at a time, and write the merged HF folder atomically.

Memory: the inputs are memory-mapped and read one tensor at a time (one tensor from each model); the merged
tensors are gathered into output shards of at most `shard_bytes`, each written when full. So the peak is about one
output shard plus one tensor per model, never whole input models.

Before any tensor is merged, every model is checked: same architecture (config.json `architectures` and
`model_type`), same tensor names and shapes; the errors name the model and the tensor. The output folder gets the
base model's (else the first model's) config.json, generation config and tokenizer files, as mergekit does.

This module knows nothing of the arithmetic (methods.py) or of YAML (recipe.py).
"""

from __future__ import annotations

import json
import re
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimlm.checkpoint import CheckpointError, model_folder
from slimlm.checkpoint.atomic import atomic_folder
from slimlm.checkpoint.hf import read_safetensors_header, safetensors_files
from slimlm.jsonl import read_json_object
from slimlm.merge.merge_config import DTYPES, MergeRecipe, resolve

TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class Source:
    """One input model: its folder, config.json and where each tensor lives (name -> (file, shape, dtype))."""

    name: str  # as the recipe wrote it
    folder: Path
    config: dict[str, Any]
    tensors: dict[str, tuple[Path, list[int], str]]


def open_source(name: str) -> Source:
    """Resolve a recipe's model to an HF folder and read its config and safetensors headers (no tensor data)."""
    folder = model_folder(name)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"model {name}: {folder} has no config.json; merge-models needs HF model folders")
    tensors = {}
    for f in safetensors_files(folder):
        with open(f, "rb") as handle:
            header, _ = read_safetensors_header(f, handle)
        for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            tensors[key] = (f, list(info["shape"]), info["dtype"])
    return Source(name, folder, read_json_object(folder / "config.json"), tensors)


def check_compatible(sources: list[Source]) -> None:
    """All models have one architecture and the same tensor names and shapes; else one error listing what differs."""
    ref, errors = sources[0], []
    arch = (ref.config.get("architectures"), ref.config.get("model_type"))
    for s in sources[1:]:
        other = (s.config.get("architectures"), s.config.get("model_type"))
        if other != arch:
            errors.append(f"{s.name} is {other[0]} ({other[1]}), {ref.name} is {arch[0]} ({arch[1]})")
        missing, extra = sorted(set(ref.tensors) - set(s.tensors)), sorted(set(s.tensors) - set(ref.tensors))
        if missing or extra:
            errors.append(f"{s.name} lacks tensors {missing[:5]} and has extra {extra[:5]} compared with {ref.name}")
        shapes = [k for k in ref.tensors if k in s.tensors and s.tensors[k][1] != ref.tensors[k][1]]
        errors += [
            f"{k}: shape {s.tensors[k][1]} in {s.name} but {ref.tensors[k][1]} in {ref.name}" for k in shapes[:5]
        ]
    if errors:
        raise CheckpointError(
            "models cannot be merged tensor by tensor (same architecture, names and shapes "
            "needed; vocabulary merging is not supported): " + "; ".join(errors)
        )


def layer_fraction(tensor_name: str, n_layers: int) -> float:
    """mergekit's t for gradients: layer i of N -> i / (N - 1) (1 for a single layer); other tensors 0."""
    m = _LAYER.search(tensor_name)
    if m is None:
        return 0.0
    return int(m.group(1)) / (n_layers - 1) if n_layers > 1 else 1.0


def merge_tensor(
    recipe: MergeRecipe,
    name: str,
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    t: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Resolve this tensor's parameters (per-model over top-level, filters and gradients) and apply the method."""
    method, others = recipe.method(), recipe.non_base()
    per_model = [
        {k: resolve(k, [m.parameters, recipe.parameters], d, name, t) for k, d in method.per_model.items()}
        for m in others
    ]
    shared = {k: resolve(k, [recipe.parameters], d, name, t) for k, d in method.shared.items()}
    return method.merge(base, tensors, per_model, shared, generator)


def run_merge(
    recipe: MergeRecipe, out: str | Path, *, seed: int = 0, shard_bytes: int = 5 * 2**30, recipe_text: str | None = None
) -> dict[str, Any]:
    """Merge the recipe's models into the HF folder `out` (written atomically); returns a summary dict."""
    names = list(dict.fromkeys(([recipe.base_model] if recipe.base_model else []) + [m.model for m in recipe.models]))
    sources = {n: open_source(n) for n in names}
    donor = sources[recipe.base_model or recipe.models[0].model]
    check_compatible([donor] + [s for s in sources.values() if s is not donor])
    base_src = sources[recipe.base_model] if recipe.method().needs_base else None
    inputs = [sources[m.model] for m in recipe.non_base()]
    in_dtype = getattr(torch, DTYPES[recipe.dtype]) if recipe.dtype else None
    out_name = recipe.out_dtype or recipe.dtype
    out_dtype = getattr(torch, DTYPES[out_name]) if out_name else None
    n_layers = int(donor.config.get("num_hidden_layers") or 0)
    generator = torch.Generator().manual_seed(seed) if recipe.method().random else None

    with ExitStack() as stack, atomic_folder(out) as tmp:
        from safetensors import safe_open

        handles: dict[Path, Any] = {}

        def read(src: Source, key: str) -> torch.Tensor:
            f = src.tensors[key][0]
            if f not in handles:
                handles[f] = stack.enter_context(safe_open(str(f), framework="pt"))
            x = handles[f].get_tensor(key)
            return x.to(in_dtype) if in_dtype is not None and x.is_floating_point() else x

        writer = _ShardWriter(tmp, shard_bytes)
        for key in donor.tensors:
            first = read(donor, key)
            if not first.is_floating_point():  # integer buffers are not merged: the donor's are kept
                writer.add(key, first)
                continue
            base = read(base_src, key) if base_src is not None else None
            merged = merge_tensor(
                recipe, key, base, [read(s, key) for s in inputs], layer_fraction(key, n_layers), generator
            )
            writer.add(key, merged.to(out_dtype or first.dtype).contiguous())
        n_shards = writer.finish()
        _write_side_files(tmp, donor, out_name or _dtype_name(donor), recipe_text)
    return {
        "method": recipe.merge_method,
        "models": names,
        "tensors": len(donor.tensors),
        "shards": n_shards,
        "out": str(out),
    }


def _dtype_name(src: Source) -> str:
    dt = src.config.get("torch_dtype") or src.config.get("dtype") or "float32"
    return str(dt)


def _write_side_files(folder: Path, donor: Source, dtype: str, recipe_text: str | None) -> None:
    """config.json (the donor's, with the output dtype), tokenizer and generation files, and the recipe."""
    config = dict(donor.config)
    config["torch_dtype"] = DTYPES.get(dtype, dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (donor.folder / name).is_file():
            shutil.copy(donor.folder / name, folder / name)
    if recipe_text is not None:
        (folder / "merge_recipe.yaml").write_text(recipe_text)


class _ShardWriter:
    """Collects tensors into safetensors shards of at most `limit` bytes (one shard: model.safetensors)."""

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = folder, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total = 0  # tensor bytes, the index's total_size

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > self.limit:
            self._flush()
        self.pending[key] = tensor
        self.size += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f"shard-{len(self.written)}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.total += self.size
        self.pending, self.size = {}, 0

    def finish(self) -> int:
        """Write the last shard, name the shards as HF does and write the index if there are several."""
        if self.pending or not self.written:
            self._flush()
        n = len(self.written)
        if n == 1:
            self.written[0][0].rename(self.folder / "model.safetensors")
            return 1
        weight_map = {}
        for i, (path, keys) in enumerate(self.written):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return n
