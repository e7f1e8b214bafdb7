"""Task accuracy on a JSONL instruction set: greedy answers scored by exact match or a bundled task's metric.

A thin layer over slimlm.train.evaluate (the same scoring fine-tuning reports), adding input checks and a
`limit`. Records are chat records whose last message is the assistant's reference answer (what
`slimlm data task NAME` writes); `metric` names a bundled task in slimlm.tasks.TASKS (e.g. extract_json, which
compares parsed JSON), else the score is exact string match after stripping whitespace.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch


def task_metric_names() -> list[str]:
    """Names accepted as `metric`: the bundled tasks."""
    from slimlm.tasks import TASKS

    return sorted(TASKS)


def task_accuracy(model: torch.nn.Module, tokenizer: Any, path: str | Path, metric: str | None = None,
                  limit: int | None = None, max_new_tokens: int = 64) -> dict[str, Any]:
    """{"accuracy", "n", "metric", "file", "seconds"}: the fraction of the first `limit` records answered right."""
    from slimlm.train.evaluate import chat_eval_set, generation_accuracy

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such task file (JSONL chat records; `slimlm data task NAME` writes some)")
    if metric is not None and metric not in task_metric_names():
        raise ValueError(f"unknown task metric {metric!r}; bundled tasks: {', '.join(task_metric_names())}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of records, got {limit}")
    records = chat_eval_set(path)[:limit]
    if not records:
        raise ValueError(f"{path}: no chat record ending with an assistant message to score")
    t0 = time.perf_counter()
    res = generation_accuracy(model, tokenizer, records, task=metric, max_new_tokens=max_new_tokens)
    return {"accuracy": res["exact_match"], "n": res["n"], "metric": metric or "exact_match", "file": str(path),
            "max_new_tokens": max_new_tokens, "seconds": time.perf_counter() - t0}
