"""model.py: logit parity with HF transformers (weights through the production loader), KV cache, padding, bf16."""

from __future__ import annotations

import pytest
import torch

from slimlm.checkpoint import load_model
from slimlm.kv_cache import KVCache
from slimlm.model import Transformer

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # short enough that the tiny head_dim has high, medium (smoothed) and low frequencies
    "original_max_position_embeddings": 64,
}

# (id, HF architecture, config overrides); rope settings use the rope_theta + rope_scaling spelling, which both
# transformers 4.x and 5.x accept in the constructor.
PARITY_CASES = [
    pytest.param("llama", dict(), id="llama-gqa-untied"),
    pytest.param(
        "llama", dict(tie_word_embeddings=True, num_key_value_heads=4, head_dim=32), id="llama-tied-mha-headdim"
    ),
    pytest.param("qwen2", dict(), id="qwen2-qkv-bias"),
    pytest.param("llama", dict(rope_theta=10000.0, rope_scaling=LLAMA3_ROPE), id="llama3-rope"),
    pytest.param(
        "llama", dict(rope_theta=5000.0, rope_scaling={"rope_type": "linear", "factor": 4.0}), id="linear-rope"
    ),
    pytest.param("mistral", dict(sliding_window=8), id="mistral-sliding-window"),
]
TOL = 1e-4


def random_ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("arch,overrides", PARITY_CASES)
def test_logits_match_transformers(make_model_folder, arch, overrides):
    folder, hf = make_model_folder(arch, seed=3, tokenizer=False, **overrides)
    _, config, model = load_model(folder)
    assert config.model_type == arch
    ids = random_ids(2, 24, config.vocab_size)  # 24 > the Mistral window of 8
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert ours.shape == ref.shape == (2, 24, config.vocab_size)
    assert ref.abs().max() > 0.5, "reference logits are degenerate; the comparison would prove little"
    assert max_diff(ours, ref) <= TOL


def test_config_details_reach_the_model(make_model_folder):
    """The parity cases only mean something if the loaded configs really carry the features under test."""
    _, config, model = load_model(make_model_folder("llama", tokenizer=False, tie_word_embeddings=True, head_dim=32)[0])
    assert config.tie_word_embeddings and model.lm_head.weight is model.embed_tokens.weight
    assert config.head_dim == 32 and model.layers[0].self_attn.q_proj.out_features == 4 * 32
    _, config, model = load_model(make_model_folder("qwen2", tokenizer=False)[0])
    assert model.layers[0].self_attn.q_proj.bias is not None and model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    _, config, _ = load_model(make_model_folder("llama", tokenizer=False, rope_scaling=LLAMA3_ROPE)[0])
    assert config.rope_type == "llama3" and config.rope_scaling["original_max_position_embeddings"] == 64
    _, config, _ = load_model(make_model_folder("mistral", tokenizer=False, sliding_window=8)[0])
    assert config.sliding_window == 8


@pytest.mark.parametrize(
    "arch,overrides", [("llama", {}), ("mistral", {"sliding_window": 8})], ids=["llama", "mistral"]
)
def test_kv_cache_prefill_then_decode_matches_full_forward(make_model_folder, arch, overrides):
    _, _, model = load_model(make_model_folder(arch, seed=4, tokenizer=False, **overrides)[0])
    ids = random_ids(2, 24, model.config.vocab_size, seed=1)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, batch_size=2, max_len=32)  # longer than needed: unused slots stay masked
        cache.reset()
        steps = [model(ids[:, :10], cache=cache, cache_pos=torch.arange(10))]
        for t in range(10, 24):
            steps.append(model(ids[:, t : t + 1], cache=cache, cache_pos=torch.tensor([t])))
    assert max_diff(torch.cat(steps, dim=1), full) <= TOL


def test_prefill_logits_to_keep(tiny_llama):
    _, _, model = load_model(tiny_llama[0])
    ids = random_ids(1, 12, model.config.vocab_size)
    with torch.no_grad():
        full = model(ids)
        last = model(ids, logits_to_keep=1)
    assert last.shape == (1, 1, model.config.vocab_size)
    assert max_diff(last[:, 0], full[:, -1]) <= TOL


@pytest.mark.parametrize(
    "arch,overrides", [("llama", {}), ("mistral", {"sliding_window": 8})], ids=["llama", "mistral"]
)
def test_left_padded_batch_matches_each_row_alone(make_model_folder, arch, overrides):
    _, _, model = load_model(make_model_folder(arch, seed=5, tokenizer=False, **overrides)[0])
    V = model.config.vocab_size
    lengths = [20, 13, 5]
    T = max(lengths)
    rows = [random_ids(1, n, V, seed=10 + i)[0] for i, n in enumerate(lengths)]
    ids = random_ids(len(rows), T, V, seed=99)  # padding filled with arbitrary tokens: they must be masked out
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = r
    start = torch.tensor([T - n for n in lengths])
    with torch.no_grad():
        cache = KVCache.for_model(model, batch_size=len(rows), max_len=T + 3)
        cache.reset(start)
        batch = model(ids, cache=cache, cache_pos=torch.arange(T))
        nxt = torch.tensor([[7], [8], [9]])
        step = model(nxt, cache=cache, cache_pos=torch.tensor([T]))
        assert torch.isfinite(batch).all(), "padding queries must not produce NaN"
        for i, r in enumerate(rows):
            alone = model(r[None])
            assert max_diff(batch[i, T - len(r) :], alone[0]) <= TOL, f"row {i} prefill"
            alone_next = model(torch.cat([r, nxt[i]])[None])[:, -1]
            assert max_diff(step[i, -1], alone_next[0]) <= TOL, f"row {i} decode step"


def test_bf16_forward_close_to_fp32(tiny_llama):
    folder, _ = tiny_llama
    _, _, m32 = load_model(folder, dtype=torch.float32)
    _, _, m16 = load_model(folder, dtype=torch.bfloat16)
    assert m16.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in m16.parameters())
    ids = random_ids(2, 16, m32.config.vocab_size, seed=2)
    with torch.no_grad():
        l32, l16 = m32(ids), m16(ids)
    assert l16.dtype == torch.bfloat16 and torch.isfinite(l16).all()
    scale = l32.abs().max().item()
    assert max_diff(l16, l32) <= 0.05 * scale + 0.05
    # the distributions agree: most argmaxes coincide
    assert (l16.argmax(-1) == l32.argmax(-1)).float().mean() >= 0.9


def test_fresh_model_init_and_tied_weights():
    from slimlm.config import ModelConfig

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny"))
    assert not model.config.tie_word_embeddings and model.lm_head.weight is not model.embed_tokens.weight
    w = model.layers[0].self_attn.q_proj.weight
    assert 0.01 < w.std().item() < 0.03  # HF-style N(0, 0.02) init
    tied = Transformer(ModelConfig(**{**ModelConfig.from_name("tiny").to_dict(), "tie_word_embeddings": True}))
    assert tied.lm_head.weight is tied.embed_tokens.weight


@pytest.mark.cuda
@pytest.mark.parametrize("arch,overrides", PARITY_CASES)
def test_logits_match_transformers_cuda(make_model_folder, arch, overrides):
    folder, hf = make_model_folder(arch, seed=3, tokenizer=False, **overrides)
    _, config, model = load_model(folder, device="cuda")
    assert model.device.type == "cuda"
    hf = hf.to("cuda")
    ids = random_ids(2, 24, config.vocab_size).to("cuda")
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 matmuls alone would exceed the fp32 tolerance
    try:
        with torch.no_grad():
            ours, ref = model(ids), hf(ids).logits
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    assert max_diff(ours, ref) <= TOL
