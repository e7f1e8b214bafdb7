"""Speed and footprint of a model: prefill and decode tokens/s, size on disk, peak resident memory.

Method (kept simple on purpose):
  - Prefill: one prompt of `prompt_tokens` token ids (drawn from the vocabulary with a fixed seed; speed does not
    depend on the text) run into a fresh static KVCache with `slimlm.generate.prefill`, the path `LLM.generate`
    uses. tokens/s = prompt_tokens / seconds.
  - Decode: after that prefill, `new_tokens` greedy steps of `decode_one_token` (or the compiled step one passes),
    each feeding back the argmax. tokens/s = new_tokens / seconds; it includes the argmax, as generation does.
  - `warmup` untimed runs first (allocator, oneDNN/cuBLAS kernel selection, torch.compile), then the median of
    `repeats` timed runs. Batch size 1. CUDA is synchronised before each clock read.
  - Peak RSS is the process's high-water mark (`resource.getrusage(RUSAGE_SELF).ru_maxrss`), so it includes
    loading the model and everything the process did before: run one model per process to compare footprints.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from slimlm.generate import DecodeFn, decode_one_token, prefill
from slimlm.kv_cache import KVCache


@dataclass
class SpeedConfig:
    prompt_tokens: int = 128  # prefill length
    new_tokens: int = 32  # decode steps timed
    warmup: int = 1  # untimed runs first
    repeats: int = 3  # timed runs; the median is reported
    seed: int = 0  # draws the prompt's token ids

    def validate(self) -> None:
        for name in ("prompt_tokens", "new_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"speed {name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"speed warmup must be >= 0, got {self.warmup}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _run_once(model: torch.nn.Module, prompt: torch.Tensor, cache: KVCache, new_tokens: int,
              decode_fn: DecodeFn) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one generation of new_tokens greedy tokens after prompt [1, T]."""
    device, T = prompt.device, prompt.shape[1]
    cache.reset()
    _sync(device)
    t0 = time.perf_counter()
    logits = prefill(model, prompt, cache, torch.arange(T, device=device))  # [1, V]
    _sync(device)
    t1 = time.perf_counter()
    for step in range(new_tokens):
        token = logits.argmax(dim=-1, keepdim=True)  # [1, 1]
        logits = decode_fn(model, token, cache, torch.tensor([T + step], device=device))
    _sync(device)
    return t1 - t0, time.perf_counter() - t1


def measure_speed(model: torch.nn.Module, config: SpeedConfig | None = None,
                  decode_fn: DecodeFn = decode_one_token) -> dict:
    """Prefill and decode tokens/s at batch size 1 (median of config.repeats after config.warmup runs).

    model: slimlm.model.Transformer; decode_fn: the decode step (LLM._decode is the compiled one after
    LLM.compile()). The model's train/eval mode is restored afterwards.
    """
    cfg = config or SpeedConfig()
    cfg.validate()
    need = cfg.prompt_tokens + cfg.new_tokens
    if need > model.config.max_seq_len:
        raise ValueError(f"prompt_tokens + new_tokens = {need} exceeds the model's context of "
                         f"{model.config.max_seq_len} tokens")
    g = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, cfg.prompt_tokens), generator=g).to(model.device)
    cache = KVCache.for_model(model, 1, need)
    was_training = model.training
    model.eval()
    try:
        for _ in range(cfg.warmup):
            _run_once(model, prompt, cache, cfg.new_tokens, decode_fn)
        runs = [_run_once(model, prompt, cache, cfg.new_tokens, decode_fn) for _ in range(cfg.repeats)]
    finally:
        model.train(was_training)
    prefill_s = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(r[1] for r in runs)
    return {"prefill_tokens_per_s": cfg.prompt_tokens / prefill_s, "decode_tokens_per_s": cfg.new_tokens / decode_s,
            "prefill_s": prefill_s, "decode_s": decode_s, **asdict(cfg),
            "dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device),
            "threads": torch.get_num_threads()}


def disk_size(path: str | Path) -> int:
    """Bytes of a file, or of every file under a folder (symlinks followed, as HF hub caches use them)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def memory_report(device: torch.device | str = "cpu") -> dict:
    """{"peak_rss_bytes"} and, on CUDA, {"cuda_peak_allocated_bytes"} (both high-water marks of this process)."""
    out = {"peak_rss_bytes": peak_rss_bytes()}
    device = torch.device(device)
    if device.type == "cuda":
        out["cuda_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out
