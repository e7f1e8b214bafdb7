"""The teacher's top-k log-probs at every labelled position, computed once and stored in a safetensors file.

Distilling several students (or resuming, or re-running with another α/T) from one teacher repeats the teacher's
forward pass; the cache does it once. A file holds, for a set of samples, the top-k log-probs (temperature 1, over
the full vocabulary) and their ids at each labelled position, in the sample's row-major position order:

    values [M, k] float32, ids [M, k] int32, offsets [S+1] int64 (rows of sample i: offsets[i]:offsets[i+1]),
    sample_index [S] int64 (index of each cached sample in the training list)

and metadata naming the teacher, the data hash and k. A file whose teacher, data or k differ is refused; a matching
file missing some samples is extended. Writes are atomic (temporary file + rename).
This module is not the loss (train/kd_loss.py) and knows nothing of how the teacher was loaded.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from slimlm.errors import InputError
from slimlm.train.batch import IGNORE, Sample, collate
from slimlm.train.kd_loss import TopKTeacher, labelled_rows

FORMAT = "slimlm-teacher-topk-v1"


class TeacherCacheError(InputError):
    """A cache file that does not belong to this teacher, data or top_k; the message says what to do."""


def data_hash(samples: Sequence[Sample]) -> str:
    """sha256 of every sample's input ids, labels and segment ids, in order (what the teacher outputs depend on)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(repr((s.input_ids, s.labels, s.segment_ids)).encode())
    return h.hexdigest()


def teacher_id(*parts: str | Path | None) -> str:
    """An id for a teacher: each given path with its weight files' names, sizes and mtimes (cheap, no hashing)."""
    out = []
    for part in parts:
        if part is None:
            continue
        p = Path(part)
        files = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")) if p.is_dir() else [p] if p.exists() else []
        stamp = ",".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)
        out.append(f"{p.resolve() if p.exists() else part}[{stamp}]")
    return "|".join(out)


@dataclass
class TopKCache:
    values: torch.Tensor  # [M, k] float32 log-probs
    ids: torch.Tensor  # [M, k] int32
    offsets: torch.Tensor  # [S+1] int64
    sample_index: torch.Tensor  # [S] int64
    meta: dict[str, str]
    _rows: dict[int, tuple[int, int]] | None = field(default=None, repr=False, compare=False)  # lookup memo

    def rows_of(self) -> dict[int, tuple[int, int]]:
        off = self.offsets.tolist()
        return {int(i): (off[j], off[j + 1]) for j, i in enumerate(self.sample_index.tolist())}

    def lookup(self, indices: Sequence[int]) -> TopKTeacher:
        """The rows of these samples, concatenated in this order (= the batch's labelled-position order)."""
        if self._rows is None:
            self._rows = self.rows_of()
        rows = self._rows
        missing = [i for i in indices if i not in rows]
        if missing:
            raise TeacherCacheError(f"samples {missing[:5]} are not in the teacher cache; rebuild it for this run")
        sel = torch.cat([torch.arange(*rows[i]) for i in indices]) if indices else torch.zeros(0, dtype=torch.long)
        return TopKTeacher(self.values.index_select(0, sel), self.ids.index_select(0, sel))


def read_cache(path: str | Path) -> TopKCache:
    """The cache in `path`; a truncated or foreign file raises one error naming it
    (CheckpointError/TeacherCacheError)."""
    from slimlm.checkpoint.hf import load_safetensors, safetensors_metadata

    meta = safetensors_metadata(path)  # checks the header against the file first
    if meta.get("format") != FORMAT:
        raise TeacherCacheError(
            f"{path} is not a slimlm teacher cache (format {meta.get('format')!r}); delete it "
            "or choose another --teacher-cache-path"
        )
    t = load_safetensors(path)
    missing = [k for k in ("values", "ids", "offsets", "sample_index") if k not in t]
    if missing:
        raise TeacherCacheError(f"{path} lacks {', '.join(missing)}; delete it so that it is rebuilt")
    return TopKCache(t["values"], t["ids"], t["offsets"], t["sample_index"], meta)


def write_cache(path: str | Path, cache: TopKCache) -> None:
    """Atomic: a crash leaves the old file or the new one."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {
            "values": cache.values.contiguous(),
            "ids": cache.ids.contiguous(),
            "offsets": cache.offsets,
            "sample_index": cache.sample_index,
        },
        str(tmp),
        metadata=cache.meta,
    )
    os.replace(tmp, path)


@torch.no_grad()
def teacher_topk(
    teacher: nn.Module,
    samples: Sequence[Sample],
    top_k: int,
    batch_size: int = 8,
    pad_id: int = 0,
    chunk_size: int = 512,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sample: (top-k log-probs [n_i, k] float32, ids [n_i, k] int32) at its labelled positions."""
    device = next(teacher.parameters()).device
    out = []
    for i in range(0, len(samples), batch_size):
        part = list(samples[i : i + batch_size])
        b = collate(part, pad_id)
        seg = b["segment_ids"].to(device) if "segment_ids" in b else None
        h, _ = labelled_rows(teacher.hidden(b["input_ids"].to(device), segment_ids=seg), b["labels"])  # [N, D]
        vals, ids = [], []
        for start in range(0, h.shape[0], chunk_size):
            logp = torch.log_softmax(teacher.lm_head(h[start : start + chunk_size]).float(), dim=-1)  # [n, V]
            v, j = logp.topk(top_k, dim=-1)
            vals.append(v.cpu())
            ids.append(j.to(torch.int32).cpu())
        vals, ids = torch.cat(vals), torch.cat(ids)
        counts = [sum(1 for y in s.labels if y != IGNORE) for s in part]
        out += list(zip(vals.split(counts), ids.split(counts)))
    return out


def build_or_load(
    path: str | Path,
    teacher: nn.Module,
    samples: Sequence[Sample],
    needed: Sequence[int],
    top_k: int,
    teacher_name: str,
    batch_size: int = 8,
    pad_id: int = 0,
) -> tuple[TopKCache, int]:
    """The cache at `path` covering samples[i] for i in `needed`, building or extending it; returns (cache, built).

    `built` counts the samples whose teacher outputs were computed now (0: everything came from the file).
    Raises TeacherCacheError if the file was made for another teacher, other data or another top_k.
    """
    path = Path(path)
    meta = {"format": FORMAT, "teacher": teacher_name, "data_sha256": data_hash(samples), "top_k": str(top_k)}
    old = read_cache(path) if path.is_file() else None
    if old is not None:
        diff = [k for k in ("teacher", "data_sha256", "top_k") if old.meta.get(k) != meta[k]]
        if diff:
            raise TeacherCacheError(
                f"teacher cache {path} was built for a different {' and '.join(diff)} ("
                + "; ".join(f"{k}: {old.meta.get(k)!r} != {meta[k]!r}" for k in diff)
                + "); delete it or pass another teacher_cache_path"
            )
    have = old.rows_of() if old is not None else {}
    todo = sorted({int(i) for i in needed} - set(have))
    if not todo:
        return old, 0
    fresh = teacher_topk(teacher, [samples[i] for i in todo], top_k, batch_size, pad_id)
    cache = _merge(old, todo, fresh, meta, top_k)
    write_cache(path, cache)
    return cache, len(todo)


def _merge(
    old: TopKCache | None,
    todo: list[int],
    fresh: list[tuple[torch.Tensor, torch.Tensor]],
    meta: dict[str, str],
    top_k: int,
) -> TopKCache:
    vals = [old.values] if old is not None else [torch.zeros(0, top_k)]
    ids = [old.ids] if old is not None else [torch.zeros(0, top_k, dtype=torch.int32)]
    counts = (old.offsets.diff().tolist() if old is not None else []) + [v.shape[0] for v, _ in fresh]
    index = (old.sample_index.tolist() if old is not None else []) + todo
    vals += [v for v, _ in fresh]
    ids += [j for _, j in fresh]
    offsets = torch.tensor([0] + counts, dtype=torch.long).cumsum(0)
    return TopKCache(torch.cat(vals), torch.cat(ids), offsets, torch.tensor(index, dtype=torch.long), meta)


__all__ = [
    "TeacherCacheError",
    "TopKCache",
    "build_or_load",
    "data_hash",
    "read_cache",
    "teacher_id",
    "teacher_topk",
    "write_cache",
]
