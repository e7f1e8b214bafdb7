"""A PNG of a training run: train loss per step, eval loss and the generation metric at each eval."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_path: str | Path, png_path: str | Path, title: str = "") -> Path:
    """Draw metrics.jsonl (written by train/trainer.py) to png_path; returns the path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    train, evals = [], []
    for line in Path(metrics_path).read_text().splitlines():
        rec = json.loads(line)
        (evals if "eval_loss" in rec else train).append(rec)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1.2)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per trained token)")
    ax.set_yscale("log")
    metric = [r for r in evals if "exact_match" in r]
    if metric:
        ax2 = ax.twinx()
        ax2.plot(
            [r["step"] for r in metric],
            [100 * r["exact_match"] for r in metric],
            "s--",
            color="tab:green",
            label="eval exact match %",
        )
        ax2.set_ylabel("exact match %")
        ax2.set_ylim(0, 100)
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title(title or Path(metrics_path).parent.name)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)
