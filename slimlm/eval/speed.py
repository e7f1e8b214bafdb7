"""Speed and footprint of a model: prefill and decode tokens/s, size on disk, peak resident memory.

Method (kept simple on purpose):
  - Generation runs on the engine (engine/core.py), the scheduler, cache and decode step that `LLM.generate`,
    `slimlm serve` and `slimlm batch` use, fed token ids (no tokenizer), one request at a time, greedy, with
    `ignore_eos` and the prefix cache off (a repeated prompt is prefilled again, not found in the cache).
  - Prefill: one prompt of `prompt_tokens` token ids (drawn from the vocabulary with a fixed seed; speed does not
    depend on the text), from submitting the request to its first token. tokens/s = prompt_tokens / seconds.
  - Decode: the `new_tokens` tokens after the first one, from the first token to the last. tokens/s =
    new_tokens / seconds; it includes sampling, as generation does.
  - `warmup` untimed runs first (allocator, kernel selection, torch.compile), then the median of `repeats` timed
    runs. Batch size 1. CUDA is synchronised by the engine's sampling (it reads the sampled token).
  - Peak RSS is the process's high-water mark (`resource.getrusage(RUSAGE_SELF).ru_maxrss`), so it includes
    loading the model and everything the process did before: run one model per process to compare footprints.
"""

from __future__ import annotations

import resource
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from slimlm.engine.core import Engine, EngineConfig, Request
from slimlm.engine.sampling import SamplingParams
from slimlm.errors import InputError


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
                raise InputError(f"speed {name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise InputError(f"speed warmup must be >= 0, got {self.warmup}")


def _run_once(engine: Engine, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one greedy generation of 1 + new_tokens tokens after `prompt`."""
    req = Request(prompt, SamplingParams(max_new_tokens=new_tokens + 1, ignore_eos=True))
    for _ in engine.generate([req]):
        pass
    return req.t_first - req.t_arrival, req.t_last - req.t_first


def measure_speed(model: torch.nn.Module, config: SpeedConfig | None = None) -> dict:
    """Prefill and decode tokens/s at batch size 1 (median of config.repeats after config.warmup runs).

    model: slimlm.model.Transformer (or an ONNX Runtime model, export/ort.py), as slimlm.load gives it; its
    train/eval mode is restored afterwards.
    """
    cfg = config or SpeedConfig()
    cfg.validate()
    need = cfg.prompt_tokens + cfg.new_tokens + 1
    if need > model.config.max_seq_len:
        raise InputError(
            f"prompt_tokens + new_tokens + 1 = {need} exceeds the model's context of {model.config.max_seq_len} tokens"
        )
    g = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.randint(0, model.config.vocab_size, (cfg.prompt_tokens,), generator=g).tolist()
    was_training = model.training
    engine = Engine(
        model,
        None,
        EngineConfig(
            max_batch=1, max_seq_len=need, max_loras=0, prefix_cache=False, prefill_chunk=max(cfg.prompt_tokens, 1)
        ),
    )
    try:
        for _ in range(cfg.warmup):
            _run_once(engine, prompt, cfg.new_tokens)
        runs = [_run_once(engine, prompt, cfg.new_tokens) for _ in range(cfg.repeats)]
    finally:
        model.train(was_training)
    prefill_s = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(r[1] for r in runs)
    return {
        "prefill_tokens_per_s": cfg.prompt_tokens / prefill_s,
        "decode_tokens_per_s": cfg.new_tokens / decode_s,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        **asdict(cfg),
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(model.device),
        "threads": torch.get_num_threads(),
        "fused_decode": engine.fused is not None,
    }


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
