"""A training run's logs: `OUT/metrics.jsonl` (one JSON object per line, the record of truth) and, when enabled, the
same numbers as TensorBoard scalars under `OUT/tensorboard/`.

Only the process that trains writes them (the trainer makes one RunLog). A resumed run rewrites what follows its
checkpoint in both: metrics.jsonl drops those lines, TensorBoard is told to purge those steps (`purge_step`). This
module knows nothing about training; it writes what it is given.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line, each with a "step"."""

    def __init__(self, path: Path, keep_up_to_step: int):
        """Start the file, keeping the lines of steps <= keep_up_to_step (a resumed run rewrites what follows)."""
        self.path = path
        kept = [line for line in _read_lines(path) if _line_step(line) <= keep_up_to_step] if keep_up_to_step else []
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def _line_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line cut short by a kill: drop it


def scalar_tag(section: str, key: str) -> str:
    """The TensorBoard tag of a metrics key: train/loss, train/lr, ...; eval/loss (eval_loss), eval/exact_match."""
    return f"{section}/{key.removeprefix('eval_') if section == 'eval' else key}"


class RunLog:
    """metrics.jsonl plus (tensorboard=True) a TensorBoard SummaryWriter; use as a context manager so the event file
    is flushed and closed at the end and on error."""

    def __init__(self, out_dir: Path, keep_up_to_step: int, tensorboard: bool):
        self.metrics = MetricsLog(out_dir / "metrics.jsonl", keep_up_to_step)
        self.path = self.metrics.path
        self.writer = _summary_writer(out_dir / "tensorboard", keep_up_to_step + 1) if tensorboard else None

    def write(self, record: dict[str, Any], section: str = "train") -> None:
        """One metrics line; its numbers (bar "step") also as scalars `section/key` at that step."""
        self.metrics.write(record)
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self.writer.add_scalar(scalar_tag(section, key), value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _summary_writer(log_dir: Path, purge_step: int) -> Any:
    """A SummaryWriter whose new event file hides the steps >= purge_step of earlier files (a resumed or restarted
    run replaces them, as it does in metrics.jsonl)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(
            "TensorBoard logging needs the tensorboard package: pip install tensorboard, or set train.tensorboard false"
        ) from e
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


__all__ = ["MetricsLog", "RunLog", "scalar_tag"]
