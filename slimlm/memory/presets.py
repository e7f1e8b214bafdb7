"""Model presets for `slimlm estimate --params`: the architecture fields of published models, as literals.

Each preset is the part of the model's HF config.json that sizes it, so `preset_config("7B")` builds a
ModelConfig without a download. These are configs only: no weights, no tokenizer, no formulas.
"""

from __future__ import annotations

from typing import Any

from slimlm.config import ModelConfig
from slimlm.memory.query import MemoryQueryError


# --params presets: the architecture fields of each model's HF config.json, as literals (built by ModelConfig.from_hf).
def _hf(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int, tied: bool = False,
        **extra: Any) -> dict[str, Any]:
    return {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": ffn, "vocab_size": vocab,
            "tie_word_embeddings": tied, "rms_norm_eps": 1e-5, **extra}

LLAMA_3_2_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}

PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": _hf(576, 30, 9, 3, 1536, 49152, True, rope_theta=100000.0, max_position_embeddings=8192),
    "smollm2-360m": _hf(960, 32, 15, 5, 2560, 49152, True, rope_theta=100000.0, max_position_embeddings=8192),
    "smollm2-1.7b": _hf(2048, 24, 32, 32, 8192, 49152, True, rope_theta=130000.0, max_position_embeddings=8192),
    "llama-3.2-1b": _hf(2048, 16, 32, 8, 8192, 128256, True, head_dim=64, rope_theta=500000.0,
                        rope_scaling=LLAMA_3_2_ROPE, max_position_embeddings=131072),
    "llama-3.2-3b": _hf(3072, 28, 24, 8, 8192, 128256, True, head_dim=128, rope_theta=500000.0,
                        rope_scaling=LLAMA_3_2_ROPE, max_position_embeddings=131072),
    "llama-2-7b": _hf(4096, 32, 32, 32, 11008, 32000, max_position_embeddings=4096),
    "llama-3-8b": _hf(4096, 32, 32, 8, 14336, 128256, rope_theta=500000.0, max_position_embeddings=8192),
    "llama-2-13b": _hf(5120, 40, 40, 40, 13824, 32000, max_position_embeddings=4096),
    "llama-2-70b": _hf(8192, 80, 64, 8, 28672, 32000, max_position_embeddings=4096),
    "llama-3-70b": _hf(8192, 80, 64, 8, 28672, 128256, rope_theta=500000.0, max_position_embeddings=8192),
}
SIZE_PRESETS = {"135M": "smollm2-135m", "360M": "smollm2-360m", "1B": "llama-3.2-1b", "1.7B": "smollm2-1.7b",
                "3B": "llama-3.2-3b", "7B": "llama-2-7b", "8B": "llama-3-8b", "13B": "llama-2-13b",
                "70B": "llama-2-70b"}


def preset_config(name: str) -> ModelConfig:
    """The ModelConfig of a preset: a size ("7B", as `--params`) or a name ("llama-3-8b")."""
    key = SIZE_PRESETS.get(name.upper(), name.lower())
    if key not in PRESETS:
        raise MemoryQueryError(f"unknown preset {name!r}; sizes: {', '.join(SIZE_PRESETS)}; "
                               f"names: {', '.join(PRESETS)}")
    return ModelConfig.from_hf(PRESETS[key])
