"""Generation metrics for fine-tuning: answer held-out chat prompts greedily and score the answers.

A chat record's last assistant message is the reference; the messages before it are the prompt. The score is a
bundled task's metric when one is named (e.g. extract_json compares parsed JSON), else exact string match after
stripping whitespace. This is not a benchmark harness; eval/ will hold perplexity and task suites.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from slimlm.jsonl import read_lines
from slimlm.tokenizer import Messages


def chat_eval_set(path: str | Path) -> list[tuple[Messages, str]]:
    """(prompt messages, reference answer) for every chat record of a JSONL file whose last turn is the assistant's."""
    out = []
    for line in read_lines(path):  # blank lines skipped; bad bytes and bad JSON come back as line.error
        if line.error is not None:
            raise ValueError(f"{path}:{line.number}: {line.error}")
        rec = line.value
        msgs = rec.get("messages") if isinstance(rec, dict) else None
        if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            out.append((msgs[:-1], msgs[-1]["content"]))
    return out


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


@torch.no_grad()
def generate_answers(model: torch.nn.Module, tokenizer: Any, prompts: list[Messages], max_new_tokens: int = 64,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers to chat prompts (in eval mode; the model's train/eval mode is restored afterwards)."""
    from slimlm.engine.sampling import SamplingParams
    from slimlm.llm import LLM

    was_training = model.training
    model.eval()
    try:
        llm = LLM(model, tokenizer)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        answers = []
        for i in range(0, len(prompts), batch_size):
            answers += [c.text for c in llm.complete(prompts[i:i + batch_size], params, chat=True)]
        return answers
    finally:
        model.train(was_training)


def generation_accuracy(model: torch.nn.Module, tokenizer: Any, records: list[tuple[Messages, str]],
                        task: str | None = None, max_new_tokens: int = 64) -> dict[str, float]:
    """{"exact_match": fraction of records answered exactly right, "n": count}."""
    score = exact_match
    if task is not None:
        from slimlm.tasks import TASKS
        score = TASKS[task].exact_match
    answers = generate_answers(model, tokenizer, [p for p, _ in records], max_new_tokens)
    hits = sum(score(a, ref) for a, (_, ref) in zip(answers, records))
    return {"exact_match": hits / max(len(records), 1), "n": len(records)}
