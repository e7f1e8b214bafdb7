"""ModelConfig: the shape of a Llama-family decoder, and readers for HF `config.json` and GGUF metadata.

This module only describes models; it imports no torch and builds nothing (see model.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from slimlm.errors import InputError

# HF `model_type` values whose architecture is exactly what model.py implements.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_SIZE_KEYS = ("n_heads", "n_kv_heads", "intermediate_size")
LAYER_SIZES_KEY = "slimlm_layer_sizes"  # config.json key of per-layer sizes (our own; transformers ignores it)
NON_UNIFORM_NOTE = (
    "layers have different sizes (slimlm_layer_sizes, written by structured pruning): load this "
    "folder with slimlm.load; transformers cannot load it (its Llama layers are all one size)"
)


class ConfigError(InputError):
    """A model config that slimlm cannot build; the message says what to fix."""


# The config.json keys from_hf reads, by the JSON type each must have (null means "use the default").
HF_REQUIRED_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
HF_OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
HF_POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta")
HF_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window")
HF_OBJECTS = ("rope_scaling", "rope_parameters")
HF_ROPE_NUMBERS = ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _json(value: Any) -> str:
    """A value as it is spelled in config.json ("576" for a string, 576 for a number)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _is_token_ids(v: Any) -> bool:
    """None, a token id or a list of token ids (HF's eos_token_id takes all three)."""
    ids = v if isinstance(v, list) else [] if v is None else [v]
    return all(type(i) is int and i >= 0 for i in ids)


def hf_config_errors(hf: dict[str, Any]) -> list[str]:
    """Every value of an HF config.json dict that has the wrong JSON type or range, in the file's own key names.

    Checked at the edge, before any arithmetic, so `"hidden_size": "576"` is reported as such rather than as a
    TypeError from deep inside the model code.
    """
    errors = []
    for k in HF_REQUIRED_INTS + HF_OPTIONAL_INTS:
        v = hf.get(k)
        if (k in HF_REQUIRED_INTS or v is not None) and (type(v) is not int or v <= 0):
            errors.append(f'"{k}" must be a positive integer, got {_json(v)}')
    for k in HF_POSITIVE_FLOATS:
        v = hf.get(k)
        if v is not None and (type(v) not in (int, float) or not math.isfinite(v) or v <= 0):
            errors.append(f'"{k}" must be a positive number, got {_json(v)}')
    errors += [
        f'"{k}" must be true or false, got {_json(hf[k])}'
        for k in HF_BOOLS
        if hf.get(k) is not None and type(hf[k]) is not bool
    ]
    errors += [
        f'"{k}" must be an object {{...}} or null, got {_json(hf[k])}'
        for k in HF_OBJECTS
        if hf.get(k) is not None and not isinstance(hf[k], dict)
    ]
    errors += [
        f'"{k}.{key}" must be a positive number, got {_json(v)}'
        for k in HF_OBJECTS
        if isinstance(hf.get(k), dict)
        for key, v in hf[k].items()
        if key in HF_ROPE_NUMBERS and (type(v) not in (int, float) or not math.isfinite(v) or v <= 0)
    ]
    errors += [
        f'"{k}" must be a token id or a list of token ids, got {_json(hf[k])}'
        for k in ("bos_token_id", "eos_token_id")
        if not _is_token_ids(hf.get(k))
    ]
    if errors:
        return errors
    hidden, heads, kv = hf["hidden_size"], hf["num_attention_heads"], hf.get("num_key_value_heads")
    if hf.get("head_dim") is None and hidden % heads:
        errors.append(
            f'"hidden_size" ({hidden}) must be a multiple of "num_attention_heads" ({heads}), or "head_dim" must be set'
        )
    if kv is not None and heads % kv:
        errors.append(f'"num_attention_heads" ({heads}) must be a multiple of "num_key_value_heads" ({kv})')
    return errors


@dataclass
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder (RMSNorm pre-norm, RoPE, GQA, SwiGLU)."""

    vocab_size: int = 32000
    dim: int = 4096  # hidden size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32  # < n_heads means grouped-query attention
    head_dim: int | None = None  # None: dim // n_heads
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # RoPE scaling, HF style: {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    # "high_freq_factor": 4.0, "original_max_position_embeddings": 8192} or {"rope_type": "linear", "factor": 2.0}.
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral-style local attention; None = full attention
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Per-layer sizes of a structurally pruned model, [{"n_heads", "n_kv_heads", "intermediate_size"}] * n_layers;
    # None: every layer has the sizes above. Saved as "slimlm_layer_sizes" in config.json (see to_hf).
    layer_sizes: list[dict[str, int]] | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.dim // max(self.n_heads, 1)
        self.validate()

    def validate(self) -> None:
        """Collect every problem at once and raise one ConfigError naming them."""
        errors = []
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                errors.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not errors and self.n_heads % self.n_kv_heads != 0:
            errors.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim is not None and self.head_dim % 2 != 0:
            errors.append(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            errors.append(
                f"model_type {self.model_type!r} is not supported; slimlm builds {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in ROPE_TYPES:
                errors.append(f"rope_scaling type {rope_type!r} is not supported; use one of {', '.join(ROPE_TYPES)}")
            elif rope_type != "default" and "factor" not in self.rope_scaling:
                errors.append(f"rope_scaling of type {rope_type!r} needs a 'factor'")
        if not errors and self.layer_sizes is not None:
            errors += self._layer_size_errors()
        if errors:
            raise ConfigError("invalid model config: " + "; ".join(errors))

    def _layer_size_errors(self) -> list[str]:
        """Problems of layer_sizes: one entry per layer, positive sizes, the model's GQA ratio in every layer."""
        sizes = self.layer_sizes
        if not isinstance(sizes, list) or len(sizes) != self.n_layers:
            n = len(sizes) if isinstance(sizes, list) else type(sizes).__name__
            return [f"layer_sizes must list one entry per layer ({self.n_layers}), got {n}"]
        errors, ratio = [], self.n_heads // self.n_kv_heads
        for i, s in enumerate(sizes):
            if not isinstance(s, dict) or set(s) != set(LAYER_SIZE_KEYS):
                errors.append(f"layer_sizes[{i}] must have exactly the keys {', '.join(LAYER_SIZE_KEYS)}, got {s!r}")
            elif any(not isinstance(s[k], int) or s[k] < 1 for k in LAYER_SIZE_KEYS):
                errors.append(f"layer_sizes[{i}] sizes must be integers >= 1, got {s}")
            elif s["n_heads"] != ratio * s["n_kv_heads"]:
                errors.append(
                    f"layer_sizes[{i}]: n_heads ({s['n_heads']}) must be {ratio} x n_kv_heads "
                    f"({s['n_kv_heads']}), the model's GQA ratio"
                )
        return errors

    def layer_size(self, i: int) -> dict[str, int]:
        """{"n_heads", "n_kv_heads", "intermediate_size"} of layer i (the uniform sizes when layer_sizes is None)."""
        if self.layer_sizes is not None:
            return dict(self.layer_sizes[i])
        return {"n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "intermediate_size": self.intermediate_size}

    def with_layer_sizes(self, sizes: list[dict[str, int]]) -> ModelConfig:
        """A copy with these per-layer sizes: a plain uniform config when all layers agree (transformers loads it),
        else layer_sizes set and the top-level sizes those of the largest layer."""
        sizes = [dict(s) for s in sizes]
        top = {k: max(s[k] for s in sizes) for k in LAYER_SIZE_KEYS}
        if all(s == sizes[0] for s in sizes):
            return dataclasses.replace(self, n_layers=len(sizes), layer_sizes=None, **sizes[0])
        top["n_heads"] = top["n_kv_heads"] * (self.n_heads // self.n_kv_heads)
        return dataclasses.replace(self, n_layers=len(sizes), layer_sizes=sizes, **top)

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    def _layer_params(self, i: int) -> int:
        s = self.layer_size(i)
        q, kv, ff = s["n_heads"] * self.head_dim, s["n_kv_heads"] * self.head_dim, s["intermediate_size"]
        attn = self.dim * q + 2 * self.dim * kv + q * self.dim
        if self.attention_bias:
            attn += q + 2 * kv + (self.dim if self.model_type == "llama" else 0)  # Llama biases o_proj too
        mlp = 3 * self.dim * ff + (2 * ff + self.dim if self.mlp_bias else 0)
        return attn + mlp + 2 * self.dim

    def num_params(self) -> int:
        """Parameter count computed from the shapes alone (tied embeddings counted once; per-layer sizes honoured)."""
        embed = self.vocab_size * self.dim
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.dim
        return embed + sum(self._layer_params(i) for i in range(self.n_layers)) + self.dim + head

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """K and V for every layer: 2 * sum over layers of n_kv_heads * head_dim elements per token."""
        kv_heads = sum(self.layer_size(i)["n_kv_heads"] for i in range(self.n_layers))
        return 2 * kv_heads * self.head_dim * bytes_per_element

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        """A named preset, e.g. `ModelConfig.from_name("smollm2-135m")`."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from the dict of an HF `config.json` (llama, mistral and qwen2 model types)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            arch = ", ".join(hf.get("architectures") or []) or "unknown"
            raise ConfigError(
                f"config.json has model_type {model_type!r} (architectures: {arch}); "
                f"slimlm supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        missing = [k for k in HF_REQUIRED_INTS if k not in hf]
        if missing:
            raise ConfigError(f"config is missing {', '.join(missing)}; is it a causal LM config?")
        errors = hf_config_errors(hf)
        if errors:
            raise ConfigError("invalid values: " + "; ".join(errors) + "; fix them in config.json")
        # transformers >= 5 keeps rope_theta and scaling together in `rope_parameters`; older files
        # use top-level `rope_theta` and `rope_scaling`.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        sliding = hf.get("sliding_window")
        if model_type == "qwen2" and not hf.get("use_sliding_window", False):
            sliding = None
        return cls(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope or None,
            max_seq_len=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=sliding,
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            layer_sizes=hf.get(LAYER_SIZES_KEY),
        )

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict that transformers loads as the same architecture."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        # rope_type from the property: a legacy {"type": ...} spelling must not leave "rope_type": "default" behind.
        rope = {
            **{k: v for k, v in (self.rope_scaling or {}).items() if k != "type"},
            "rope_type": self.rope_type,
            "rope_theta": self.rope_theta,
        }
        hf = {
            "architectures": [arch[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps,
            # Both spellings, so transformers 4.x (rope_theta/rope_scaling) and 5.x (rope_parameters) agree.
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.model_type == "llama":
            hf.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        if self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            hf.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window)
        if self.layer_sizes is not None:
            hf[LAYER_SIZES_KEY] = [dict(s) for s in self.layer_sizes]
            hf["slimlm_note"] = NON_UNIFORM_NOTE
        return hf

    @classmethod
    def from_gguf(cls, meta: dict[str, Any]) -> ModelConfig:
        """Build from GGUF key/value metadata (as read by checkpoint.gguf.read_metadata)."""
        arch = meta.get("general.architecture")
        if arch not in ("llama", "qwen2"):
            raise ConfigError(f"GGUF architecture {arch!r} is not supported; slimlm reads llama and qwen2 GGUF files")

        def get(key: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{key}", default)

        missing = [
            k
            for k in ("block_count", "embedding_length", "attention.head_count", "feed_forward_length")
            if get(k) is None
        ]
        if missing:
            raise ConfigError(
                f"GGUF metadata lacks {', '.join(arch + '.' + k for k in missing)}; the file may be truncated"
            )
        n_heads = int(get("attention.head_count"))
        dim = int(get("embedding_length"))
        rope_scaling = None
        if get("rope.scaling.type") == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        return cls(
            vocab_size=int(get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))),
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=int(get("attention.key_length", dim // max(n_heads, 1))),  # n_heads < 1 is refused by validate
            intermediate_size=int(get("feed_forward_length")),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_seq_len=int(get("context_length", 4096)),
            tie_word_embeddings=False,  # decided by the loader: tied when the file has no `output.weight`
            attention_bias=arch == "qwen2",
            model_type=arch,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        )


PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        vocab_size=49152,
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        intermediate_size=1536,
        norm_eps=1e-5,
        rope_theta=100000.0,
        max_seq_len=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama-3.2-1b": dict(
        vocab_size=128256,
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        intermediate_size=8192,
        norm_eps=1e-5,
        rope_theta=500000.0,
        max_seq_len=131072,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "smollm2-360m": dict(
        vocab_size=49152,
        dim=960,
        n_layers=32,
        n_heads=15,
        n_kv_heads=5,
        intermediate_size=2560,
        norm_eps=1e-5,
        rope_theta=100000.0,
        max_seq_len=8192,
        tie_word_embeddings=True,
    ),
    "smollm2-1.7b": dict(
        vocab_size=49152,
        dim=2048,
        n_layers=24,
        n_heads=32,
        n_kv_heads=32,
        intermediate_size=8192,
        norm_eps=1e-5,
        rope_theta=130000.0,
        max_seq_len=8192,
        tie_word_embeddings=True,
    ),
    "llama-3.2-3b": dict(
        vocab_size=128256,
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        head_dim=128,
        intermediate_size=8192,
        norm_eps=1e-5,
        rope_theta=500000.0,
        max_seq_len=131072,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "llama-2-7b": dict(
        vocab_size=32000,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        intermediate_size=11008,
        norm_eps=1e-5,
        max_seq_len=4096,
    ),
    "llama-3-8b": dict(
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        intermediate_size=14336,
        norm_eps=1e-5,
        rope_theta=500000.0,
        max_seq_len=8192,
    ),
    "llama-2-13b": dict(
        vocab_size=32000,
        dim=5120,
        n_layers=40,
        n_heads=40,
        n_kv_heads=40,
        intermediate_size=13824,
        norm_eps=1e-5,
        max_seq_len=4096,
    ),
    "llama-2-70b": dict(
        vocab_size=32000,
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        intermediate_size=28672,
        norm_eps=1e-5,
        max_seq_len=4096,
    ),
    "llama-3-70b": dict(
        vocab_size=128256,
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        intermediate_size=28672,
        norm_eps=1e-5,
        rope_theta=500000.0,
        max_seq_len=8192,
    ),
    "mistral-7b": dict(
        vocab_size=32000,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        intermediate_size=14336,
        norm_eps=1e-5,
        rope_theta=1000000.0,
        max_seq_len=32768,
        model_type="mistral",
    ),
    "qwen2-0.5b": dict(
        vocab_size=151936,
        dim=896,
        n_layers=24,
        n_heads=14,
        n_kv_heads=2,
        intermediate_size=4864,
        norm_eps=1e-6,
        rope_theta=1000000.0,
        max_seq_len=32768,
        tie_word_embeddings=True,
        attention_bias=True,
        model_type="qwen2",
    ),
    # Tiny shapes for tests and examples.
    "tiny": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128, max_seq_len=256),
}
