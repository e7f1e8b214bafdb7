"""MergeRecipe: a `slimlm merge-models` recipe, in mergekit's YAML layout so that mergekit recipes carry over.

    merge_method: ties                 # linear, task_arithmetic, ties, dare_linear, dare_ties, slerp
    base_model: path/to/base           # HF folder, alias or hub id; needed by all but linear
    models:
      - model: path/to/math-tuned
        parameters: {weight: 0.6, density: 0.5}
      - model: path/to/chat-tuned
        parameters: {weight: 0.4, density: 0.5}
    parameters: {normalize: true, lambda: 1.0}   # method-wide (and defaults for the per-model ones)
    dtype: float32                     # compute inputs in this dtype; also the output's unless out_dtype is set

A parameter value is a number, a gradient (a list, interpolated over the layers: layer i of N reads it at
i / (N - 1); embeddings, final norm and head read it at 0), or a list of `{filter: SUBSTRING, value: ...}`
entries, the first whose filter is in the tensor's name winning (no filter: matches all), exactly as in mergekit.
Per-model parameters take precedence over the top-level `parameters`.

mergekit's `slices`, `modules`, `tokenizer` (vocabulary union) and `chat_template` are refused with a message
saying so: every model here must have the same tensors and shapes. This module validates; it reads no weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimlm.recipe import RecipeError, read_yaml

DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
UNSUPPORTED = {
    "slices": "layer slices (frankenmerges) are not supported: merge whole models with 'models:'",
    "modules": "per-module definitions are not supported: list whole models under 'models:'",
    "tokenizer": "vocabulary merging is not supported: all models must share one vocabulary (omit 'tokenizer:')",
    "chat_template": "setting a chat template is not supported: edit tokenizer_config.json of the result",
}
KNOWN = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "name"}


@dataclass
class ModelEntry:
    model: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeRecipe:
    merge_method: str
    models: list[ModelEntry]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None  # None: compute in fp32 and save in the inputs' dtype
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # None or "base": the base model's (else the first model's) tokenizer files

    def non_base(self) -> list[ModelEntry]:
        """The models that are merged into the base (all of them for linear, which has no base)."""
        if not self.method().needs_base:
            return list(self.models)
        return [m for m in self.models if m.model != self.base_model]

    def method(self):
        from slimlm.merge.methods import MERGE_METHODS

        return MERGE_METHODS[self.merge_method]

    def validate(self) -> None:
        """Check everything that can be checked without reading weights; raise one RecipeError listing all errors."""
        errors = _check(self)
        if errors:
            raise RecipeError("merge recipe: " + "; ".join(errors))


def _check(r: MergeRecipe) -> list[str]:
    from slimlm.merge.methods import MERGE_METHODS

    if r.merge_method not in MERGE_METHODS:
        return [f"merge_method {r.merge_method!r} is not supported; choose one of {', '.join(MERGE_METHODS)}"]
    method, errors = r.method(), []
    if not r.models:
        errors.append("'models:' is empty: list the models to merge as '- model: PATH'")
    if method.needs_base and not r.base_model:
        errors.append(f"{r.merge_method} needs 'base_model:' (the model the task vectors are taken from)")
    if r.merge_method == "linear" and r.base_model and r.base_model not in [m.model for m in r.models]:
        errors.append("linear has no base: list the model under 'models:' with a weight instead of 'base_model:'")
    others = r.non_base()
    if method.n_models is not None and r.base_model and len(others) != method.n_models:
        errors.append(
            f"{r.merge_method} merges the base with exactly {method.n_models} other model(s); "
            f"the recipe has {len(others)}"
        )
    known = set(method.per_model) | set(method.shared)
    for where, params in [("parameters", r.parameters)] + [
        (f"models[{i}].parameters", m.parameters) for i, m in enumerate(r.models)
    ]:
        for name in sorted(set(params) - known):
            errors.append(
                f"{where}: unknown parameter {name!r} for {r.merge_method}; valid: {', '.join(sorted(known)) or 'none'}"
            )
    for name, default in method.per_model.items():
        missing = [m.model for m in others if default is None and name not in m.parameters and name not in r.parameters]
        if missing:
            errors.append(f"models {missing} need parameters.{name} (or set it for all under top-level parameters)")
    for name, default in method.shared.items():
        if default is None and name not in r.parameters:
            errors.append(
                f"{r.merge_method} needs parameters.{name} at the top level (e.g. 'parameters: {{{name}: 0.5}}')"
            )
    for d in ("dtype", "out_dtype"):
        if getattr(r, d) is not None and getattr(r, d) not in DTYPES:
            errors.append(f"{d} {getattr(r, d)!r} is not supported; choose float32, bfloat16 or float16")
    if r.tokenizer_source not in (None, "base"):
        errors.append("tokenizer_source: only 'base' is supported (the base model's tokenizer files are copied)")
    return errors


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """A parameter's value for one tensor (mergekit's rules): scalar; gradient over t in [0, 1]; or the first
    {filter, value} whose filter is a substring of the name (None if none matches)."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(not isinstance(e, dict) for e in setting):
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return setting[int(t * (len(setting) - 1))]  # booleans and strings pick, numbers interpolate
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate_setting(cond.get("value"), tensor_name, t)
    return None


def resolve(name: str, scopes: list[dict[str, Any]], default: Any, tensor_name: str, t: float) -> Any:
    """The first scope (highest precedence first) that gives `name` a value for this tensor, else `default`."""
    for scope in scopes:
        if name in scope:
            value = evaluate_setting(scope[name], tensor_name, t)
            if value is not None:
                return value
    if default is None:
        raise RecipeError(
            f"parameter {name!r} has no value for tensor {tensor_name} (its filters match none): "
            "add an entry without 'filter:' as a catch-all"
        )
    return default


def _setting_errors(where: str, setting: Any) -> list[str]:
    """Shape errors of one parameter setting (numbers, booleans, lists, {filter, value})."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (int, float, bool)):
        return []
    if not isinstance(setting, list):
        return [f"{where}: expected a number, a list (gradient) or {{filter, value}} entries, got {setting!r}"]
    errors = []
    for e in setting:
        if isinstance(e, dict):
            bad = set(e) - {"filter", "value"}
            if bad or "value" not in e:
                errors.append(f"{where}: each conditional entry is {{filter: SUBSTRING, value: ...}}, got {e!r}")
            else:
                errors += _setting_errors(where, e["value"])
        elif not isinstance(e, (int, float, bool)):
            errors.append(f"{where}: gradient entries must be numbers, got {e!r}")
    return errors


def from_mapping(values: Any, source: str = "recipe") -> MergeRecipe:
    """Build and validate a MergeRecipe from parsed YAML."""
    if not isinstance(values, dict):
        raise RecipeError(f"{source}: expected a mapping with merge_method and models, got {type(values).__name__}")
    errors = [f"'{k}': {why}" for k, why in UNSUPPORTED.items() if k in values]
    errors += [
        f"unknown key {k!r}; valid keys: {', '.join(sorted(KNOWN))}"
        for k in sorted(set(values) - KNOWN - set(UNSUPPORTED))
    ]
    if "merge_method" not in values:
        errors.append("missing 'merge_method:' (linear, task_arithmetic, ties, dare_linear, dare_ties or slerp)")
    models = []
    for i, m in enumerate(values.get("models") or []):
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m or set(m) - {"model", "parameters"}:
            errors.append(f"models[{i}]: expected '- model: PATH' with optional 'parameters:', got {m!r}")
            continue
        params = m.get("parameters") or {}
        if not isinstance(params, dict):
            errors.append(f"models[{i}].parameters: expected a mapping, got {params!r}")
            continue
        errors += [e for k, v in params.items() for e in _setting_errors(f"models[{i}].parameters.{k}", v)]
        models.append(ModelEntry(str(m["model"]), dict(params)))
    params = values.get("parameters") or {}
    if not isinstance(params, dict):
        errors.append(f"parameters: expected a mapping, got {params!r}")
        params = {}
    errors += [e for k, v in params.items() for e in _setting_errors(f"parameters.{k}", v)]
    if errors:
        raise RecipeError(f"{source}: " + "; ".join(errors))
    base = values.get("base_model")
    recipe = MergeRecipe(
        merge_method=str(values["merge_method"]),
        models=models,
        base_model=None if base is None else str(base),
        parameters=dict(params),
        dtype=values.get("dtype"),
        out_dtype=values.get("out_dtype"),
        tokenizer_source=values.get("tokenizer_source"),
    )
    errors = _check(recipe)
    if errors:
        raise RecipeError(f"{source}: " + "; ".join(errors))
    return recipe


def load_merge_recipe(path: str | Path) -> MergeRecipe:
    """Read and validate a merge recipe (YAML, mergekit's layout)."""
    values = read_yaml(path, f"{path}: no such recipe file")
    return from_mapping(values, str(path))
