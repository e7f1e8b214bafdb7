"""config.py: reading HF config.json dicts, validation, parameter and KV-cache arithmetic."""

from __future__ import annotations

import pytest
import torch

from slimlm.config import PRESETS, ConfigError, ModelConfig
from slimlm.model import Transformer

BASE_HF = {
    "vocab_size": 320,
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 160,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 512,
}


def test_from_hf_llama_transformers5_rope_parameters():
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    c = ModelConfig.from_hf(
        {
            **BASE_HF,
            "model_type": "llama",
            "rope_parameters": rope,
            "tie_word_embeddings": True,
            "bos_token_id": 1,
            "eos_token_id": [2, 3],
        }
    )
    assert (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads) == (320, 64, 3, 8, 2)
    assert c.head_dim == 8 and c.intermediate_size == 160 and c.norm_eps == 1e-6 and c.max_seq_len == 512
    assert c.rope_theta == 500000.0
    assert c.rope_type == "llama3"
    assert c.rope_scaling == {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }  # rope_theta is not left inside
    assert c.tie_word_embeddings and not c.attention_bias and c.sliding_window is None
    assert c.bos_token_id == 1 and c.eos_token_id == [2, 3]


def test_from_hf_default_rope_parameters_means_no_scaling():
    c = ModelConfig.from_hf(
        {**BASE_HF, "model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}}
    )
    assert c.rope_theta == 1234.0 and c.rope_scaling is None and c.rope_type == "default"


def test_from_hf_legacy_rope_theta_and_rope_scaling():
    c = ModelConfig.from_hf(
        {**BASE_HF, "model_type": "llama", "rope_theta": 250000.0, "rope_scaling": {"type": "linear", "factor": 4.0}}
    )
    assert c.rope_theta == 250000.0 and c.rope_type == "linear" and c.rope_scaling["factor"] == 4.0
    c = ModelConfig.from_hf({**BASE_HF, "model_type": "llama", "rope_theta": 7.0, "rope_scaling": None})
    assert c.rope_theta == 7.0 and c.rope_scaling is None
    # no rope information at all: the Llama default
    c = ModelConfig.from_hf({**BASE_HF, "model_type": "llama"})
    assert c.rope_theta == 10000.0 and c.rope_scaling is None


def test_from_hf_explicit_head_dim_and_mha_default():
    hf = {**BASE_HF, "model_type": "llama", "head_dim": 32}
    del hf["num_key_value_heads"]
    c = ModelConfig.from_hf(hf)
    assert c.head_dim == 32 and c.n_kv_heads == c.n_heads == 8


def test_from_hf_mistral_keeps_sliding_window():
    c = ModelConfig.from_hf({**BASE_HF, "model_type": "mistral", "sliding_window": 4096, "rope_theta": 1e6})
    assert c.model_type == "mistral" and c.sliding_window == 4096 and c.rope_theta == 1e6
    assert not c.attention_bias


def test_from_hf_qwen2_bias_and_sliding_window_switch():
    c = ModelConfig.from_hf({**BASE_HF, "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False})
    assert c.model_type == "qwen2" and c.attention_bias  # Qwen2 config.json has no attention_bias key: q/k/v biases
    assert c.sliding_window is None  # present in the file, but disabled
    c = ModelConfig.from_hf({**BASE_HF, "model_type": "qwen2", "sliding_window": 64, "use_sliding_window": True})
    assert c.sliding_window == 64


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_from_hf_reads_transformers_own_config_dicts(arch):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[
        arch
    ]
    hf = cls(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        rope_theta=4321.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        tie_word_embeddings=True,
    ).to_dict()
    c = ModelConfig.from_hf(hf)
    assert c.model_type == arch and (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == (64, 3, 8, 2, 8)
    assert c.rope_theta == 4321.0 and c.rope_type == "linear" and c.rope_scaling["factor"] == 2.0
    assert c.tie_word_embeddings and c.attention_bias == (arch == "qwen2")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_hf_from_hf_round_trip(name):
    c = ModelConfig.from_name(name)
    assert ModelConfig.from_hf(c.to_hf()) == c


def test_to_hf_normalises_legacy_rope_type_key():
    # A config read from a legacy config.json ({"type": "linear"}) must be written back as a linear rope.
    c = ModelConfig.from_hf({**BASE_HF, "model_type": "llama", "rope_scaling": {"type": "linear", "factor": 4.0}})
    hf = c.to_hf()
    assert hf["rope_parameters"]["rope_type"] == "linear"
    again = ModelConfig.from_hf(hf)
    assert again.rope_type == "linear" and again.rope_scaling["factor"] == 4.0


def test_from_hf_unknown_model_type():
    with pytest.raises(
        ConfigError, match=r"model_type 'gpt2' \(architectures: GPT2LMHeadModel\).*slimlm supports llama"
    ):
        ModelConfig.from_hf({**BASE_HF, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


def test_from_hf_missing_keys():
    hf = {k: v for k, v in BASE_HF.items() if k not in ("hidden_size", "intermediate_size")}
    with pytest.raises(ConfigError, match="missing hidden_size, intermediate_size"):
        ModelConfig.from_hf({**hf, "model_type": "llama"})


def test_from_hf_unknown_rope_type():
    with pytest.raises(ConfigError, match="rope_scaling type 'yarn' is not supported"):
        ModelConfig.from_hf({**BASE_HF, "model_type": "llama", "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


def test_validation_bad_heads():
    with pytest.raises(ConfigError, match=r"n_heads \(6\) must be a multiple of n_kv_heads \(4\)"):
        ModelConfig(dim=48, n_heads=6, n_kv_heads=4)
    with pytest.raises(ConfigError, match="n_heads must be a positive integer, got 0"):
        ModelConfig(n_heads=0)
    with pytest.raises(ConfigError, match="n_kv_heads must be a positive integer, got -1"):
        ModelConfig(n_kv_heads=-1)
    with pytest.raises(ConfigError, match="head_dim must be even"):
        ModelConfig(dim=60, n_heads=4, n_kv_heads=4)  # head_dim 15


def test_validation_collects_every_error_at_once():
    with pytest.raises(ConfigError, match="invalid model config") as info:
        ModelConfig(
            vocab_size=0,
            n_heads=8,
            n_kv_heads=3,
            model_type="gpt2",
            rope_scaling={"rope_type": "dynamic", "factor": 2.0},
        )
    msg = str(info.value)
    assert "vocab_size must be a positive integer" in msg
    assert "model_type 'gpt2' is not supported" in msg
    assert "rope_scaling type 'dynamic' is not supported" in msg
    # the divisibility check is skipped while a count is already invalid, but here all counts are positive ints
    with pytest.raises(ConfigError) as info:
        ModelConfig(n_heads=8, n_kv_heads=3, model_type="gpt2")
    assert "multiple of n_kv_heads" in str(info.value) and "gpt2" in str(info.value)


def test_validation_rope_scaling_needs_factor():
    with pytest.raises(ConfigError, match="rope_scaling of type 'linear' needs a 'factor'"):
        ModelConfig(rope_scaling={"rope_type": "linear"})


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; known presets: .*smollm2-135m"):
        ModelConfig.from_name("nope")


NUM_PARAMS_CASES = [
    dict(),
    dict(tie_word_embeddings=True),
    dict(attention_bias=True, mlp_bias=True),
    dict(head_dim=32, n_kv_heads=1),
]


@pytest.mark.parametrize("overrides", NUM_PARAMS_CASES, ids=["plain", "tied", "biases", "head_dim"])
def test_num_params_equals_built_model(overrides):
    c = ModelConfig(**{**PRESETS["tiny"], **overrides})
    model = Transformer(c)
    assert c.num_params() == sum(p.numel() for p in model.parameters())  # parameters() counts tied weights once


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_num_params_of_presets(name):
    c = ModelConfig.from_name(name)
    with torch.device("meta"):  # shapes only, no memory
        model = Transformer(c)
    assert c.num_params() == sum(p.numel() for p in model.parameters())


def test_known_parameter_count_smollm2():
    assert ModelConfig.from_name("smollm2-135m").num_params() == 134_515_008


def test_kv_cache_bytes_per_token():
    c = ModelConfig.from_name("smollm2-135m")
    assert c.kv_cache_bytes_per_token(2) == 23_040  # 2 (K,V) * 30 layers * 3 kv heads * 64 dims * 2 bytes
    assert c.kv_cache_bytes_per_token(4) == 46_080
    assert ModelConfig.from_name("llama-3.2-1b").kv_cache_bytes_per_token() == 2 * 16 * 8 * 64 * 2
