"""CompressRecipe: a model, what to measure, and the ordered stages of a `slimlm compress` chain, from YAML.

    model: smollm2-135m
    adapter: runs/demo/lora/adapter        # optional: merged into the model first (stage 0 is the merged model)
    out: runs/compress
    measure:
      ppl_tokens: 8192                     # held-out tokens of the built-in corpus (0: skip perplexity)
      task: runs/demo/task/test.jsonl      # optional JSONL chat records scored by exact match
      task_metric: extract_json
      task_limit: 100
    stages:
      - prune: {method: wanda, sparsity: 0.5}
      - distill: {data: runs/demo/task/train.jsonl, steps: 100}
      - quantize: {scheme: int4, method: gptq}

Each stage is a one-key mapping: the stage's kind and its settings, which are the fields of that kind's dataclass
(STAGE_KINDS in compress/stages.py), checked here with errors that name the stage and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimlm.recipe import RecipeError, from_dict, read_yaml


@dataclass
class MeasureConfig:
    ppl_tokens: int = 8192  # 0 skips perplexity
    ppl_seq_len: int = 512
    task: str | None = None
    task_metric: str | None = None
    task_limit: int = 100
    max_new_tokens: int = 64
    speed: bool = True
    speed_prompt: int = 128
    speed_new: int = 32
    speed_repeats: int = 3


@dataclass
class CompressRecipe:
    model: str = "smollm2-135m"
    adapter: str | None = None
    out: str = "runs/compress"
    dtype: str = "fp32"
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    stages: list[dict[str, Any]] = field(default_factory=list)

    def parsed_stages(self) -> list[tuple[str, Any]]:
        """[(kind, settings dataclass)] for every stage, validated; raises RecipeError naming the first bad one."""
        from slimlm.compress.stages import STAGE_KINDS

        out = []
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, dict) or len(stage) != 1:
                raise RecipeError(
                    f"stages[{i}]: each stage is a mapping with one key, the stage kind "
                    f"({', '.join(STAGE_KINDS)}), e.g. '- quantize: {{scheme: int8}}'"
                )
            ((kind, settings),) = stage.items()
            if kind not in STAGE_KINDS:
                raise RecipeError(f"stages[{i}]: unknown stage kind {kind!r}; choose one of {', '.join(STAGE_KINDS)}")
            spec = from_dict(STAGE_KINDS[kind].config, settings or {}, f"stages[{i}].{kind}.")
            if kind == "distill" and not spec.student and spec.student_layers is None:
                spec.student = "previous"  # the model the stage before left (run_distill fills the folder in)
            try:
                spec.validate()
            except ValueError as e:
                raise RecipeError(f"stages[{i}].{kind}: {e}") from None
            out.append((kind, spec))
        return out

    def validate(self) -> None:
        if not self.stages:
            raise RecipeError("the recipe has no stages; add e.g. '- quantize: {scheme: int8}' under 'stages:'")
        if self.dtype not in ("fp32", "bf16"):
            raise RecipeError(f"dtype must be fp32 or bf16, got {self.dtype!r}")
        m = self.measure
        if m.task is not None and not Path(m.task).is_file():
            raise RecipeError(f"measure.task: {m.task}: no such file (JSONL chat records)")
        if m.ppl_tokens < 0 or m.task_limit < 1:
            raise RecipeError("measure.ppl_tokens must be >= 0 and measure.task_limit >= 1")
        self.parsed_stages()


def load_compress_recipe(path: str | Path) -> CompressRecipe:
    """Read and validate a compress recipe (YAML)."""
    recipe = from_dict(CompressRecipe, read_yaml(path, f"{path}: no such recipe file"), "")
    recipe.validate()
    return recipe
