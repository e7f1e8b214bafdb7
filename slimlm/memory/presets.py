"""`slimlm estimate --params` sizes: "7B" and the like, each naming one of config.py's model presets.

The presets themselves (the architecture fields of published models, as literals) live in slimlm.config.PRESETS,
so `preset_config("7B")` builds a ModelConfig without a download. Configs only: no weights, no formulas.
"""

from __future__ import annotations

from slimlm.config import PRESETS, ConfigError, ModelConfig
from slimlm.memory.query import MemoryQueryError

SIZE_PRESETS = {
    "135M": "smollm2-135m",
    "360M": "smollm2-360m",
    "1B": "llama-3.2-1b",
    "1.7B": "smollm2-1.7b",
    "3B": "llama-3.2-3b",
    "7B": "llama-2-7b",
    "8B": "llama-3-8b",
    "13B": "llama-2-13b",
    "70B": "llama-2-70b",
}


def preset_config(name: str) -> ModelConfig:
    """The ModelConfig of a preset: a size ("7B", as `--params`) or a config.py preset name ("llama-3-8b")."""
    key = SIZE_PRESETS.get(name.upper(), name.lower())
    try:
        return ModelConfig.from_name(key)
    except ConfigError:
        raise MemoryQueryError(
            f"unknown preset {name!r}; sizes: {', '.join(SIZE_PRESETS)}; names: {', '.join(PRESETS)}"
        ) from None
