"""Task accuracy: answer held-out chat prompts greedily and score the answers.

A chat record's last assistant message is the reference; the messages before it are the prompt (what
`slimlm data task NAME` writes). The score is a bundled task's metric when one is named (slimlm.tasks.TASKS, e.g.
extract_json compares parsed JSON), else exact string match after stripping whitespace. Fine-tuning reports
`generation_accuracy` during training; `slimlm eval --task` and the compression ledger call `task_accuracy`, which
adds input checks and a `limit`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from slimlm.engine.sampling import SamplingParams
from slimlm.errors import InputError
from slimlm.jsonl import read_lines
from slimlm.llm import LLM
from slimlm.tokenizer import Messages


def chat_eval_set(path: str | Path) -> list[tuple[Messages, str]]:
    """(prompt messages, reference answer) for every chat record of a JSONL file whose last turn is the assistant's."""
    out = []
    for line in read_lines(path):  # blank lines skipped; bad bytes and bad JSON come back as line.error
        if line.error is not None:
            raise InputError(f"{path}:{line.number}: {line.error}")
        rec = line.value
        msgs = rec.get("messages") if isinstance(rec, dict) else None
        if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            out.append((msgs[:-1], msgs[-1]["content"]))
    return out


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module, tokenizer: Any, prompts: list[Messages], max_new_tokens: int = 64, batch_size: int = 16
) -> list[str]:
    """Greedy answers to chat prompts (in eval mode; the model's train/eval mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        llm = LLM(model, tokenizer)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        answers = []
        for i in range(0, len(prompts), batch_size):
            answers += [c.text for c in llm.complete(prompts[i : i + batch_size], params, chat=True)]
        return answers
    finally:
        model.train(was_training)


def generation_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    records: list[tuple[Messages, str]],
    task: str | None = None,
    max_new_tokens: int = 64,
) -> dict[str, float]:
    """{"exact_match": fraction of records answered exactly right, "n": count}."""
    score = exact_match
    if task is not None:
        from slimlm.tasks import TASKS

        score = TASKS[task].exact_match
    answers = generate_answers(model, tokenizer, [p for p, _ in records], max_new_tokens)
    hits = sum(score(a, ref) for a, (_, ref) in zip(answers, records))
    return {"exact_match": hits / max(len(records), 1), "n": len(records)}


def task_metric_names() -> list[str]:
    """Names accepted as `metric`: the bundled tasks."""
    from slimlm.tasks import TASKS

    return sorted(TASKS)


def task_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    path: str | Path,
    metric: str | None = None,
    limit: int | None = None,
    max_new_tokens: int = 64,
) -> dict[str, Any]:
    """{"accuracy", "n", "metric", "file", "seconds"}: the fraction of the first `limit` records answered right."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such task file (JSONL chat records; `slimlm data task NAME` writes some)")
    if metric is not None and metric not in task_metric_names():
        raise InputError(f"unknown task metric {metric!r}; bundled tasks: {', '.join(task_metric_names())}")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be a positive number of records, got {limit}")
    records = chat_eval_set(path)[:limit]
    if not records:
        raise InputError(f"{path}: no chat record ending with an assistant message to score")
    t0 = time.perf_counter()
    res = generation_accuracy(model, tokenizer, records, task=metric, max_new_tokens=max_new_tokens)
    return {
        "accuracy": res["exact_match"],
        "n": res["n"],
        "metric": metric or "exact_match",
        "file": str(path),
        "max_new_tokens": max_new_tokens,
        "seconds": time.perf_counter() - t0,
    }
