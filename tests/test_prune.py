"""prune/: exact sparsity, N:M patterns, Wanda scores, exact structured removal, non-uniform configs (save/reload,
KV caches, serving), transformers compatibility of uniform results, the CLI and its errors."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import randomize_

import slimlm
from slimlm.checkpoint import load_model, save_hf_folder
from slimlm.cli import main
from slimlm.config import ConfigError, ModelConfig
from slimlm.engine.cache import SlotKVCache
from slimlm.engine.core import Engine, EngineConfig, Request
from slimlm.generate import SamplingParams
from slimlm.kv_cache import KVCache
from slimlm.model import Transformer
from slimlm.prune import (
    drop_layers,
    layer_importance,
    prune_heads_,
    prune_layers_,
    prune_mlp_channels_,
    prune_nm_,
    prune_unstructured_,
    sparsity_report,
)
from slimlm.prune.calibrate import linears_of_block
from slimlm.prune.unstructured import lowest_mask

TOL = 1e-4


def tiny(seed: int = 0, **overrides) -> Transformer:
    """A random 3-layer tiny model (GQA 4/2, intermediate 128), fp32, eval."""
    config = ModelConfig(
        **{
            **ModelConfig.from_name("tiny").to_dict(),
            "n_layers": 3,
            "vocab_size": 320,
            "bos_token_id": 1,
            "eos_token_id": 2,
            **overrides,
        }
    )
    torch.manual_seed(seed)
    return randomize_(Transformer(config), seed).eval()


def calib(n: int = 4, T: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 320, (n, T), generator=torch.Generator().manual_seed(seed))


IDS = calib(2, 16, seed=7)


def logits(model: Transformer, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


# --- unstructured and N:M ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,scope", [("magnitude", "layer"), ("wanda", "layer"), ("magnitude", "global")])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7])
def test_unstructured_sparsity_is_exact(method, scope, sparsity):
    model = tiny()
    info = prune_unstructured_(model, method, sparsity, calib(), scope)
    lins = [lin for b in model.layers for lin in linears_of_block(b).values()]
    total = sum(lin.weight.numel() for lin in lins)
    if scope == "global":
        assert info["linear_zeros"] == round(sparsity * total)
    for lin in lins if scope == "layer" else []:
        zeros = lin.weight == 0
        if method == "wanda":  # exactly round(s * in) per output row
            assert (zeros.sum(dim=1) == round(sparsity * lin.in_features)).all()
        else:
            assert int(zeros.sum()) == round(sparsity * lin.weight.numel())
    assert info == {**info, **sparsity_report(model)}
    assert model.embed_tokens.weight.ne(0).all() and model.lm_head.weight.ne(0).all()  # never pruned
    assert info["sparsity"] < info["linear_sparsity"] or sparsity == 0


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8)])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_nm_pattern_holds_in_every_group(pattern, n, m, method):
    model = tiny()
    info = prune_nm_(model, pattern, method, calib())
    for b in model.layers:
        for lin in linears_of_block(b).values():
            groups = lin.weight.reshape(-1, m)  # consecutive inputs of one row
            assert (groups.ne(0).sum(dim=1) == n).all()
    assert info["linear_sparsity"] == 1 - n / m


def test_wanda_picks_by_weight_times_input_norm_block_sequentially():
    model = tiny()
    with torch.no_grad():  # very non-uniform input norms into q/k/v
        model.layers[0].input_layernorm.weight.copy_(torch.logspace(-2, 1, 64)[torch.randperm(64)])
        model.layers[1].input_layernorm.weight.copy_(torch.logspace(-2, 1, 64)[torch.randperm(64)])
    ref, ids, s = copy.deepcopy(model), calib(), 0.5
    prune_unstructured_(model, "wanda", s, ids)
    with torch.no_grad():
        x0 = ref.embed_tokens(ids)  # block 0 sees the embeddings...
        x1 = model.layers[0](x0, *_rope(model, ids), None, None, 0, None)  # ...block 1 the *pruned* block 0
    for i, x in ((0, x0), (1, x1)):
        with torch.no_grad():
            X = ref.layers[i].input_layernorm(x).reshape(-1, 64)  # [tokens, D]: q_proj's inputs
        w = ref.layers[i].self_attn.q_proj.weight.abs()
        expected = lowest_mask(w * X.norm(dim=0)[None, :], 32)  # direct computation of |W| * ||X_j||
        assert torch.equal(model.layers[i].self_attn.q_proj.weight == 0, expected)
        assert not torch.equal(expected, lowest_mask(w, 32))  # differs from magnitude's choice
    mag = copy.deepcopy(ref)
    prune_unstructured_(mag, "magnitude", s)
    assert not torch.equal(mag.layers[0].self_attn.q_proj.weight == 0, model.layers[0].self_attn.q_proj.weight == 0)


def _rope(model: Transformer, ids: torch.Tensor):
    from slimlm.model import rope_cos_sin

    T = ids.shape[1]
    return rope_cos_sin(model.inv_freq, torch.arange(T).expand(1, T), model.dtype)


# --- structured: removal is exact ----------------------------------------------------------------------------

STRUCT_CASES = [
    pytest.param({}, id="llama"),
    pytest.param(dict(model_type="qwen2", attention_bias=True), id="qwen2-bias"),
    pytest.param(dict(mlp_bias=True, attention_bias=True), id="llama-biases"),
]


def _zero_mlp_channels(model: Transformer, kept: list[list[int]]) -> None:
    with torch.no_grad():
        for b, keep in zip(model.layers, kept):
            gone = torch.ones(b.mlp.down_proj.in_features, dtype=torch.bool)
            gone[keep] = False
            for lin in (b.mlp.gate_proj, b.mlp.up_proj):
                lin.weight[gone] = 0
                if lin.bias is not None:
                    lin.bias[gone] = 0
            b.mlp.down_proj.weight[:, gone] = 0


def _zero_kv_groups(model: Transformer, kept: list[list[int]]) -> None:
    with torch.no_grad():
        for b, keep in zip(model.layers, kept):
            a = b.self_attn
            r, hd = a.n_heads // a.n_kv_heads, a.head_dim
            for g in set(range(a.n_kv_heads)) - set(keep):
                q, kv = slice(g * r * hd, (g + 1) * r * hd), slice(g * hd, (g + 1) * hd)
                for lin, rows in ((a.q_proj, q), (a.k_proj, kv), (a.v_proj, kv)):
                    lin.weight[rows] = 0
                    if lin.bias is not None:
                        lin.bias[rows] = 0
                a.o_proj.weight[:, q] = 0


@pytest.mark.parametrize("overrides", STRUCT_CASES)
@pytest.mark.parametrize("uniform", [True, False])
def test_mlp_channel_removal_equals_zeroing(overrides, uniform):
    model = tiny(**overrides)
    ref = copy.deepcopy(model)
    info = prune_mlp_channels_(model, 0.4, calib(), uniform=uniform, multiple_of=8)
    assert all(n % 8 == 0 for n in info["per_layer_after"]) and info["removed"] > 0
    assert sum(p.numel() for p in model.parameters()) == info["params_after"] == model.config.num_params()
    _zero_mlp_channels(ref, info["kept"])
    assert (logits(model) - logits(ref)).abs().max() <= 1e-5


@pytest.mark.parametrize("overrides", STRUCT_CASES)
def test_kv_group_removal_equals_zeroing(overrides):
    model = tiny(n_heads=8, n_kv_heads=4, **overrides)  # 4 KV groups of 2 query heads
    ref = copy.deepcopy(model)
    info = prune_heads_(model, 0.5, calib(), uniform=False)
    assert 0 < info["removed"] <= 6 and all(n >= 1 for n in info["per_layer_after"])  # each layer keeps one
    for b in model.layers:  # the GQA ratio is kept in every layer
        assert b.self_attn.n_heads == 2 * b.self_attn.n_kv_heads
    _zero_kv_groups(ref, info["kept"])
    assert (logits(model) - logits(ref)).abs().max() <= 1e-5


def test_uniform_head_pruning_keeps_same_count_per_layer():
    model = tiny(n_heads=8, n_kv_heads=4)
    info = prune_heads_(model, 0.25, calib(), uniform=True)
    assert info["per_layer_after"] == [3, 3, 3] and model.config.layer_sizes is None
    assert (model.config.n_heads, model.config.n_kv_heads) == (6, 3)


def test_layer_pruning_drops_lowest_block_influence():
    model, ids = tiny(n_layers=4), calib()
    ref = copy.deepcopy(model)
    bi = layer_importance(model, ids)
    info = prune_layers_(model, 2, ids)
    assert info["dropped"] == sorted(sorted(range(4), key=lambda i: bi[i])[:2]) and model.config.n_layers == 2
    expected = drop_layers(ref, [i for i in range(4) if i not in info["dropped"]])
    assert torch.equal(logits(model), logits(expected))


# --- non-uniform configs: save, reload, caches, serving, transformers ----------------------------------------


def non_uniform(seed: int = 0) -> Transformer:
    model = tiny(seed, n_heads=8, n_kv_heads=4)
    prune_heads_(model, 0.5, calib(), uniform=False)
    prune_mlp_channels_(model, 0.3, calib(), uniform=False)
    assert model.config.layer_sizes is not None
    return model


def test_layer_sizes_config_validation_and_sizes():
    ok = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64)
    sizes = [
        {"n_heads": 4, "n_kv_heads": 2, "intermediate_size": 64},
        {"n_heads": 2, "n_kv_heads": 1, "intermediate_size": 24},
    ]
    c = ModelConfig(**ok, layer_sizes=sizes)
    assert c.layer_size(1) == sizes[1] and c.head_dim == 8
    assert c.kv_cache_bytes_per_token(2) == 2 * (2 + 1) * 8 * 2
    assert c.num_params() == sum(p.numel() for p in Transformer(c).parameters())
    with pytest.raises(ConfigError, match=r"one entry per layer \(2\), got 1"):
        ModelConfig(**ok, layer_sizes=sizes[:1])
    with pytest.raises(ConfigError, match=r"layer_sizes\[1\]: n_heads \(3\) must be 2 x n_kv_heads"):
        ModelConfig(**ok, layer_sizes=[sizes[0], {"n_heads": 3, "n_kv_heads": 1, "intermediate_size": 8}])
    with pytest.raises(ConfigError, match=r"layer_sizes\[0\] sizes must be integers >= 1"):
        ModelConfig(**ok, layer_sizes=[{"n_heads": 0, "n_kv_heads": 0, "intermediate_size": 8}, sizes[1]])
    with pytest.raises(ConfigError, match="must have exactly the keys"):
        ModelConfig(**ok, layer_sizes=[{"n_heads": 4}, sizes[1]])
    assert c.with_layer_sizes([sizes[1], sizes[1]]).layer_sizes is None  # uniform collapses to a plain config


def test_non_uniform_round_trips_through_config_json(tmp_path):
    model = non_uniform()
    folder = save_hf_folder(model, tmp_path / "m")
    hf = json.loads((folder / "config.json").read_text())
    assert hf["slimlm_layer_sizes"] == model.config.layer_sizes and "transformers cannot" in hf["slimlm_note"]
    _, config, again = load_model(folder)
    assert config == model.config
    assert torch.equal(logits(again), logits(model))
    bytes_ = SlotKVCache.for_model(again, 1, 10, "fp32").bytes()
    assert bytes_ == config.kv_cache_bytes_per_token(4) * 10  # 10 positions, fp32


def test_kv_cache_generation_on_non_uniform_model_matches_full_forward():
    model, ids = non_uniform(), calib(1, 12, seed=3)
    cache = KVCache.for_model(model, 1, 20)
    assert [k.shape[1] for k in cache.k] == [b.self_attn.n_kv_heads for b in model.layers]
    with torch.no_grad():
        out = [model(ids[:, :8], cache=cache, cache_pos=torch.arange(8))[:, -1]]
        for t in range(8, 12):  # decode one token at a time
            out.append(model(ids[:, t : t + 1], cache=cache, cache_pos=torch.tensor([t]))[:, -1])
        full = model(ids)[:, 7:]
    assert (torch.cat(out) - full[0]).abs().max() <= 1e-5


def test_uniform_pruning_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny(n_heads=8, n_kv_heads=4)
    prune_mlp_channels_(model, 0.25, calib())
    prune_heads_(model, 0.5, calib())
    prune_layers_(model, 1, calib())
    assert model.config.layer_sizes is None
    folder = save_hf_folder(model, tmp_path / "u")
    assert "slimlm_layer_sizes" not in json.loads((folder / "config.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        assert (hf(IDS).logits - logits(model)).abs().max() <= TOL


def test_pruned_model_generates_and_serves(tiny_llama, tmp_path):
    llm = slimlm.load(str(tiny_llama[0]), dtype="fp32")
    ids = torch.randint(3, 384, (4, 24), generator=torch.Generator().manual_seed(0))
    prune_heads_(llm.model, 0.25, ids, uniform=False)  # 1 of 4 KV groups: one layer loses one
    prune_mlp_channels_(llm.model, 0.3, ids, uniform=False)
    save_hf_folder(llm.model, tmp_path / "p", llm.tokenizer)
    llm = slimlm.load(str(tmp_path / "p"), dtype="fp32")
    assert llm.model.config.layer_sizes is not None
    engine = Engine(llm.model, llm.tokenizer, EngineConfig(max_batch=2, max_seq_len=64, prefill_chunk=4, max_loras=0))
    prompts = [llm.tokenizer.prompt_ids(f"tell me story {i}", chat=True) for i in range(3)]
    outs = [[] for _ in prompts]
    for p, out in zip(prompts, outs):
        req = Request(p, SamplingParams(max_new_tokens=5, ignore_eos=True))
        req.emit = lambda o, out=out: out.extend(o.token_ids)
        engine.submit(req)
    while engine.has_work():
        engine.step()
    for p, out in zip(prompts, outs):  # continuous batching = generating alone (static KVCache path)
        assert out == llm.complete([p], SamplingParams(max_new_tokens=5, ignore_eos=True))[0].token_ids


# --- CLI and errors ------------------------------------------------------------------------------------------


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("the quick brown fox jumps over the lazy dog and the cat sat on the mat. " * 40)
    return str(path)


def test_cli_unstructured_and_structured(tiny_llama, tmp_path, calib_file, capsys):
    common = [
        "--model",
        str(tiny_llama[0]),
        "--calib-file",
        calib_file,
        "--calib-samples",
        "2",
        "--calib-seq-len",
        "16",
    ]
    assert main(["prune", *common, "--method", "wanda", "--sparsity", "0.5", "--out", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "50.00%" in out and "no faster" in out
    w = slimlm.load(str(tmp_path / "w"), dtype="fp32").model
    assert sparsity_report(w)["linear_sparsity"] == 0.5
    assert (
        main(
            ["prune", *common, "--structured", "mlp", "--ratio", "0.25", "--non-uniform", "--out", str(tmp_path / "s")]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "MLP channels" in out and "parameters" in out
    s = slimlm.load(str(tmp_path / "s"), dtype="fp32").model
    assert s.config.num_params() < w.config.num_params()
    assert main(["prune", *common, "--structured", "layers", "--n-drop", "1", "--out", str(tmp_path / "l")]) == 0
    assert "dropped layers" in capsys.readouterr().out
    assert slimlm.load(str(tmp_path / "l"), dtype="fp32").model.config.n_layers == 1


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--method", "magnitude", "--sparsity", "1.0"], r"sparsity must be in \[0, 1\)"),
        (["--method", "wanda", "--scope", "global"], "--scope global is for --method magnitude"),
        (["--structured", "mlp", "--ratio", "1"], r"ratio of MLP channels to remove must be in \[0, 1\)"),
    ],
)
def test_cli_errors_name_the_flag(tiny_llama, tmp_path, capsys, argv, message):
    assert main(["prune", "--model", str(tiny_llama[0]), *argv, "--out", str(tmp_path / "x")]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_api_errors():
    model = tiny()
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        prune_unstructured_(model, "magnitude", -0.1)
    with pytest.raises(ValueError, match="unknown unstructured method 'random'"):
        prune_unstructured_(model, "random", 0.5)
    with pytest.raises(ValueError, match="wanda needs calibration token ids"):
        prune_unstructured_(model, "wanda", 0.5)
    with pytest.raises(ValueError, match="unknown N:M pattern '1:3'"):
        prune_nm_(model, "1:3")
    with pytest.raises(ValueError, match="would remove every one"):
        prune_mlp_channels_(model, 1.0, calib())
    with pytest.raises(ValueError, match="must keep one"):
        prune_layers_(model, 3, calib())
    with pytest.raises(ValueError, match="calibration ids must be a long tensor"):
        prune_heads_(model, 0.5, calib().float())
    assert sparsity_report(model)["linear_zeros"] == 0  # nothing was touched by the failed calls
