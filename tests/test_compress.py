"""`slimlm compress`: recipes are validated at the edge; the chain saves, measures and ledgers every stage."""

from __future__ import annotations

import json

import pytest
import yaml

import slimlm
from slimlm.compress.chain import CompressRecipe, load_compress_recipe
from slimlm.compress.ledger import ledger_markdown
from slimlm.compress.run import compress
from slimlm.recipe import RecipeError

MEASURE = {"ppl_tokens": 256, "ppl_seq_len": 64, "speed_prompt": 16, "speed_new": 4, "speed_repeats": 1}


def _recipe(tmp_path, model, stages, **extra):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        yaml.safe_dump(
            {"model": str(model), "out": str(tmp_path / "out"), "measure": MEASURE, "stages": stages, **extra}
        )
    )
    return path


def test_recipe_errors_name_the_stage_and_key(tiny_llama, tmp_path):
    with pytest.raises(RecipeError, match="no stages"):
        load_compress_recipe(_recipe(tmp_path, tiny_llama[0], []))
    with pytest.raises(RecipeError, match=r"stages\[0\]: unknown stage kind 'shrink'"):
        load_compress_recipe(_recipe(tmp_path, tiny_llama[0], [{"shrink": {}}]))
    with pytest.raises(RecipeError, match=r"stages\[0\].quantize.: unknown key\(s\) \['bits'\]"):
        load_compress_recipe(_recipe(tmp_path, tiny_llama[0], [{"quantize": {"bits": 4}}]))
    with pytest.raises(RecipeError, match=r"stages\[0\].quantize: unknown quantization scheme 'int3'"):
        load_compress_recipe(_recipe(tmp_path, tiny_llama[0], [{"quantize": {"scheme": "int3"}}]))
    with pytest.raises(RecipeError, match="one key, the stage kind"):
        load_compress_recipe(_recipe(tmp_path, tiny_llama[0], [{"quantize": {}, "prune": {}}]))
    with pytest.raises(RecipeError, match=r"stages\[0\]: quantize must be the last stage"):
        compress(
            CompressRecipe(
                model=str(tiny_llama[0]),
                out=str(tmp_path / "o"),
                stages=[{"quantize": {}}, {"quantize": {"scheme": "int4"}}],
            )
        )


def test_chain_writes_ledger_and_loadable_stage_folders(tiny_llama, tmp_path, capsys):
    from slimlm.cli import main

    path = _recipe(tmp_path, tiny_llama[0], [{"quantize": {"scheme": "int4", "group_size": 32}}])
    assert main(["compress", str(path), "--quiet"]) == 0
    out = tmp_path / "out"
    ledger = json.loads((out / "ledger.json").read_text())
    names = [r["stage"] for r in ledger["stages"]]
    assert names == ["0-base", "1-quantize-int4"]
    base, q = ledger["stages"]
    assert q["size_bytes"] < 0.4 * base["size_bytes"] and q["size_ratio"] > 2.5
    assert base["ppl_recovery_pct"] == 100 and q["ppl"] > 0 and q["decode_tokens_per_s"] > 0
    assert (out / "ledger.png").stat().st_size > 10_000
    assert (out / "ledger.md").read_text() == ledger_markdown(ledger["stages"])
    assert slimlm.load(str(out / "1-quantize-int4")).model.quantization["scheme"] == "int4"
    assert "| 1-quantize-int4 |" in capsys.readouterr().out


def _chat_file(path, n, seed):
    import random

    rng = random.Random(seed)
    words = "the cat sat on mat and dog ran to house red blue".split()
    recs = [
        {
            "messages": [
                {"role": "user", "content": " ".join(rng.choices(words, k=4))},
                {"role": "assistant", "content": " ".join(rng.choices(words, k=3))},
            ]
        }
        for _ in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_prune_distill_quantize_chain(tiny_llama, tmp_path):
    data = _chat_file(tmp_path / "train.jsonl", 16, 0)
    test = _chat_file(tmp_path / "test.jsonl", 4, 1)
    stages = [
        {"prune": {"structured": "mlp", "ratio": 0.25, "calib_samples": 4, "calib_seq_len": 32}},
        {"distill": {"data": str(data), "alpha": 0.5, "train": {"max_steps": 3, "batch_size": 4}}},
        {"quantize": {"scheme": "int8"}},
    ]
    recipe = load_compress_recipe(
        _recipe(tmp_path, tiny_llama[0], stages, measure={**MEASURE, "task": str(test), "task_limit": 4})
    )
    assert recipe.parsed_stages()[1][1].student == "previous"
    rows = compress(recipe, progress=False)
    assert [r["stage"] for r in rows] == ["0-base", "1-prune-mlp-0.25", "2-distill-alpha0.5", "3-quantize-int8"]
    base, pruned, distilled, quantized = rows
    assert pruned["parameters"] < base["parameters"] and distilled["parameters"] == pruned["parameters"]
    assert distilled["info"]["student"].endswith("1-prune-mlp-0.25") and distilled["info"]["steps"] == 3
    assert all("accuracy" in r and "ppl" in r for r in rows)
    assert quantized["size_bytes"] < 0.4 * pruned["size_bytes"] and quantized["parameters"] == pruned["parameters"]
    again = slimlm.load(str(tmp_path / "out" / "2-distill-alpha0.5"))
    assert again.model.config.intermediate_size < 128 or again.model.config.layer_sizes


def test_bundled_compress_recipes_parse():
    """Every recipe in recipes/compress/ maps onto CompressRecipe and its stages' dataclasses."""
    from pathlib import Path

    from slimlm.recipe import from_dict

    recipes = sorted((Path(__file__).parent.parent / "recipes" / "compress").glob("*.yaml"))
    assert recipes
    for path in recipes:
        from slimlm.compress.stages import STAGE_KINDS

        recipe = from_dict(CompressRecipe, yaml.safe_load(path.read_text()), f"{path}: ")
        # Keys and types only: the data files they name are made by the benchmarks, so no validate() here.
        for i, stage in enumerate(recipe.stages):
            ((kind, settings),) = stage.items()
            from_dict(STAGE_KINDS[kind].config, settings, f"{path}: stages[{i}].{kind}.")
