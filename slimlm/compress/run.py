"""Run a compression chain: stage 0 (the model, with its adapter merged), then each stage in order, saving and
measuring the model after every one and rewriting the ledger as it goes.

Folders in `out`: `0-base/`, `1-prune-.../`, ... (each a loadable model folder), `work/` (per-stage scratch: training
logs, teacher caches), `ledger.json`, `ledger.md`, `ledger.png`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch.nn as nn

from slimlm.compress.chain import CompressRecipe
from slimlm.compress.ledger import add_recovery, ledger_markdown, measure_model, write_ledger
from slimlm.compress.stages import STAGE_KINDS, StageContext, stage_name
from slimlm.recipe import RecipeError, to_dict


def save_stage_model(model: nn.Module, folder: Path, tokenizer: Any) -> Path:
    """Save any stage's model, quantized (packed) or not (HF folder), atomically."""
    if model.quantization:
        from slimlm.checkpoint.quantized import save_quantized

        return save_quantized(model, folder, tokenizer.hf)
    from slimlm.checkpoint.hf import save_hf_folder

    return save_hf_folder(model, folder, tokenizer.hf, sorted(tokenizer.stop_token_ids))


def _start(recipe: CompressRecipe, out: Path):
    """Stage 0: the model (adapter merged into it when the recipe names one), saved to out/0-base."""
    from slimlm.llm import load

    folder = out / "0-base"
    if recipe.adapter:
        from slimlm.peft.merge import merge_to_folder

        merge_to_folder(recipe.model, recipe.adapter, folder, recipe.dtype)
        llm = load(str(folder), dtype=recipe.dtype)
    else:
        llm = load(recipe.model, dtype=recipe.dtype)
        save_stage_model(llm.model, folder, llm.tokenizer)
    return llm.model.eval(), llm.tokenizer, folder


def compress(recipe: CompressRecipe, progress: bool = True) -> list[dict[str, Any]]:
    """Run every stage of `recipe`; returns the ledger rows (also written to recipe.out)."""
    recipe.validate()
    stages = recipe.parsed_stages()
    quantized_at = [i for i, (kind, _) in enumerate(stages) if kind == "quantize"]
    if quantized_at and quantized_at[0] != len(stages) - 1:
        raise RecipeError(
            f"stages[{quantized_at[0]}]: quantize must be the last stage (the others need full-precision weights)"
        )
    out = Path(recipe.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tokenizer, base = _start(recipe, out)
    seconds = time.perf_counter() - t0  # loading (and merging the adapter); measuring is not counted
    rows = [{"stage": "0-base", **measure_model(model, tokenizer, base, recipe.measure), "seconds": seconds}]
    add_recovery(rows)
    write_ledger(out, rows, to_dict(recipe))
    prev = base
    for i, (kind, spec) in enumerate(stages, start=1):
        name = stage_name(i, kind, spec)
        print(f"== stage {name} ==", flush=True)
        t0 = time.perf_counter()
        ctx = StageContext(tokenizer, base, prev, out / "work" / name, recipe.dtype, progress)
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        model, info = STAGE_KINDS[kind].run(model, spec, ctx)
        seconds = time.perf_counter() - t0
        prev = save_stage_model(model.eval(), out / name, tokenizer)
        rows.append(
            {"stage": name, **measure_model(model, tokenizer, prev, recipe.measure), "seconds": seconds, "info": info}
        )
        add_recovery(rows)
        write_ledger(out, rows, to_dict(recipe))
        print(ledger_markdown(rows[-1:]).splitlines()[-1], flush=True)
    return rows
