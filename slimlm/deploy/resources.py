"""The memory a serving pod asks for, from slimlm.memory's estimate when the model's config is at hand.

Only arithmetic on the model's config: no weights are read. A hub id's config would need the network, so it falls
back to a fixed default that the README says to check (or pass --memory).
"""

from __future__ import annotations

import math

from slimlm.deploy.config import DeployConfig

FALLBACK_MEMORY = "4Gi"
RUNTIME_BYTES = 512 * 2**20  # Python + torch + tokenizer (~400 MiB of RSS measured by slimlm.memory's notes) + slack
CPU_MAX_BATCH = 16  # slimlm serve's --max-batch auto on a CPU
KV_TOKENS = 2048  # cache slots per sequence assumed; `serve --max-seq-len auto` shrinks its own to fit memory
MARGIN = 1.25


def memory_quantity(cfg: DeployConfig) -> str:
    """`cfg.memory`, else the estimate for serving `cfg.model` on a CPU, as a Kubernetes quantity (e.g. 2304Mi)."""
    if cfg.memory is not None:
        return cfg.memory
    need = estimated_bytes(cfg)
    if need is None:
        return FALLBACK_MEMORY
    return f"{math.ceil(need / 2**20 / 256) * 256}Mi"  # whole 256 MiB steps: readable, stable under small changes


def estimated_bytes(cfg: DeployConfig) -> int | None:
    """Peak bytes of `slimlm serve` for the model (fp32 while loading, fp16 KV cache), with a margin; None for a
    hub id (its config is not local)."""
    from slimlm.memory import MemoryQuery, estimate_memory
    from slimlm.memory.cli import model_config

    kind = cfg.model_kind()
    if kind == "hub" or (cfg.mount and not _exists(cfg.model)):
        return None
    config = model_config(cfg.model)
    est = estimate_memory(
        config, MemoryQuery(mode="infer", dtype="fp32", batch=CPU_MAX_BATCH, seq=256, kv_cache_tokens=KV_TOKENS)
    )
    kv_fp16_saving = est.row("KV cache") // 2  # serve's --kv-cache-dtype auto is fp16 under int8 weights on a CPU
    return int((est.total - kv_fp16_saving + RUNTIME_BYTES) * MARGIN)


def _exists(path: str) -> bool:
    from pathlib import Path

    return Path(path).expanduser().exists()
