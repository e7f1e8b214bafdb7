"""The ledger of a compression chain: what each stage's model measures, relative to stage 0.

One row per stage: perplexity (built-in held-out corpus), task accuracy, size on disk, parameters, sparsity,
prefill/decode tokens/s, and recovery against stage 0 (accuracy_i / accuracy_0 and ppl_0 / ppl_i, in %; 100 % =
as good as the starting model). Written as ledger.json (atomic), ledger.md (a Markdown table) and ledger.png.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from slimlm.compress.chain import MeasureConfig


def sparsity_of(model: torch.nn.Module) -> float:
    """Fraction of exact zeros in the decoder blocks' float weight matrices (0 for quantized layers)."""
    zeros = total = 0
    for name, p in model.named_parameters():
        if name.startswith("layers.") and p.dim() == 2:
            zeros += int((p == 0).sum())
            total += p.numel()
    return zeros / total if total else 0.0


def measure_model(model: torch.nn.Module, tokenizer: Any, folder: Path, m: MeasureConfig) -> dict[str, Any]:
    """Every ledger metric of one stage's model (saved in `folder`)."""
    from slimlm.eval.speed import SpeedConfig, disk_size, measure_speed

    # Parameters from the shapes: quantized layers hold buffers, not parameters.
    row: dict[str, Any] = {
        "folder": str(folder),
        "size_bytes": disk_size(folder),
        "parameters": model.config.num_params(),
        "sparsity": sparsity_of(model),
        "layers": model.config.n_layers,
    }
    if m.ppl_tokens:
        from slimlm.eval.corpus import builtin_corpus
        from slimlm.eval.perplexity import perplexity

        res = perplexity(
            model,
            tokenizer,
            builtin_corpus("heldout"),
            seq_len=m.ppl_seq_len,
            stride=m.ppl_seq_len,
            max_tokens=m.ppl_tokens,
            progress=False,
        )
        row["ppl"] = res["ppl"]
    if m.task:
        from slimlm.eval.task_accuracy import task_accuracy

        row["accuracy"] = task_accuracy(model, tokenizer, m.task, m.task_metric, m.task_limit, m.max_new_tokens)[
            "accuracy"
        ]
    if m.speed:
        s = measure_speed(model, SpeedConfig(m.speed_prompt, m.speed_new, repeats=m.speed_repeats))
        row["prefill_tokens_per_s"], row["decode_tokens_per_s"] = s["prefill_tokens_per_s"], s["decode_tokens_per_s"]
    return row


def add_recovery(rows: list[dict[str, Any]]) -> None:
    """Recovery % and speed-up of every row against rows[0], in place."""
    base = rows[0]
    for r in rows:
        if "accuracy" in r and base.get("accuracy"):
            r["accuracy_recovery_pct"] = 100 * r["accuracy"] / base["accuracy"]
        if "ppl" in r and "ppl" in base:
            r["ppl_recovery_pct"] = 100 * base["ppl"] / r["ppl"]
        if "decode_tokens_per_s" in r and "decode_tokens_per_s" in base:
            r["decode_speedup"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        r["size_ratio"] = base["size_bytes"] / r["size_bytes"]


COLUMNS = [  # (key, header, format)
    ("stage", "stage", "{}"),
    ("ppl", "ppl", "{:.3f}"),
    ("ppl_recovery_pct", "ppl rec.", "{:.1f}%"),
    ("accuracy", "accuracy", "{:.1%}"),
    ("accuracy_recovery_pct", "acc. rec.", "{:.1f}%"),
    ("size_bytes", "size MiB", "{}"),
    ("size_ratio", "smaller", "{:.2f}x"),
    ("parameters", "params M", "{}"),
    ("sparsity", "sparsity", "{:.1%}"),
    ("prefill_tokens_per_s", "prefill tok/s", "{:.0f}"),
    ("decode_tokens_per_s", "decode tok/s", "{:.1f}"),
    ("decode_speedup", "decode x", "{:.2f}x"),
    ("seconds", "stage s", "{:.0f}"),
]


def _cell(key: str, fmt: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "size_bytes":
        return f"{value / 2**20:,.1f}"
    if key == "parameters":
        return f"{value / 1e6:.1f}"
    return fmt.format(value)


def ledger_markdown(rows: list[dict[str, Any]]) -> str:
    """The ledger as a Markdown table (columns present in any row)."""
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(k, f, r.get(k)) for k, _, f in cols) + " |")
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_ledger(out: Path, rows: list[dict[str, Any]], recipe: dict[str, Any]) -> None:
    """ledger.json, ledger.md and ledger.png in `out` (rewritten after every stage, so a crash keeps the rest)."""
    _atomic_write(out / "ledger.json", json.dumps({"recipe": recipe, "stages": rows}, indent=2))
    _atomic_write(out / "ledger.md", ledger_markdown(rows))
    plot_ledger(rows, out / "ledger.png")


def plot_ledger(rows: list[dict[str, Any]], path: Path) -> None:
    """Per-stage bars of perplexity, accuracy, size and decode speed, and size vs accuracy (or perplexity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["stage"] for r in rows]
    panels = [
        (k, t)
        for k, t in [
            ("ppl", "perplexity (held-out)"),
            ("accuracy", "task accuracy"),
            ("size_bytes", "size on disk (MiB)"),
            ("decode_tokens_per_s", "decode tokens/s"),
        ]
        if all(k in r for r in rows)
    ]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 3.6))
    for ax, (key, title) in zip(axes, panels):
        vals = [r[key] / 2**20 if key == "size_bytes" else r[key] for r in rows]
        ax.bar(range(len(rows)), vals, color="tab:blue")
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        if key == "ppl" and max(vals) > 10 * min(vals):
            ax.set_yscale("log")  # a broken intermediate stage (e.g. right after pruning) would flatten the rest
    quality = "accuracy" if all("accuracy" in r for r in rows) else "ppl" if all("ppl" in r for r in rows) else None
    ax = axes[-1]
    if quality:
        xs, ys = [r["size_bytes"] / 2**20 for r in rows], [r[quality] for r in rows]
        ax.plot(xs, ys, "o-")
        for x, y, n in zip(xs, ys, names):
            ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("size on disk (MiB)")
        ax.set_ylabel(quality)
        ax.set_title(f"size vs {quality}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
