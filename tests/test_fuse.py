"""fuse/: every pass equals the unfused model to fp32 round-off (prefill and cached decode, GQA), on plain, quantized
and adapted models; fused models save under HF names; BatchNorm folding on a small ResNet; the `fuse` CLI parser."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
from torch import nn

from slimlm.checkpoint.hf import load_hf_folder, save_hf_folder
from slimlm.config import ModelConfig
from slimlm.fuse import (
    FUSION_PASSES,
    fold_conv_bn_,
    fold_linear_bn_,
    fuse_model_,
    parse_passes,
)
from slimlm.fuse.cli import add_fuse_commands, check_args, cmd_fuse
from slimlm.fuse.example_cnn import ResidualBlock, SmallResNet, randomize_batchnorms_
from slimlm.generate import decode_one_token, prefill
from slimlm.kv_cache import KVCache
from slimlm.model import Transformer
from slimlm.quantize.int4 import Int4WeightOnlyLinear
from slimlm.quantize.int8 import Int8WeightOnlyLinear, StaticInt8Linear

TOL = 1e-5  # fp32 round-off on the tiny model's logits (|logits| ~ 1)
ALL = tuple(FUSION_PASSES)


def tiny(seed: int = 0, **overrides) -> Transformer:
    """A 2-layer GQA model (4 heads, 2 KV heads) with every weight random, norm gains far from 1 included."""
    cfg = {
        "vocab_size": 256,
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "intermediate_size": 128,
        "max_seq_len": 64,
    }
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**cfg, **overrides}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.3 * noise if "norm" in name else 0.1 * noise)
    return model.eval()


def ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def prefill_and_decode(model: Transformer, prompt: torch.Tensor, steps: int = 4, tokens=None) -> tuple:
    """(full-sequence logits, [prefill logits, decode logits...] through a KVCache, the decoded tokens)."""
    full = model(prompt)
    B, T = prompt.shape
    cache = KVCache.for_model(model, B, T + steps)
    cache.reset()
    out = [prefill(model, prompt, cache, torch.arange(T))]
    tokens = tokens if tokens is not None else []
    for i in range(steps):
        if len(tokens) <= i:
            tokens.append(out[-1].argmax(-1, keepdim=True))
        out.append(decode_one_token(model, tokens[i], cache, torch.tensor([T + i])))
    return full, torch.stack(out), tokens


def assert_same_model(ref: Transformer, fused: Transformer, tol: float = TOL) -> None:
    """Equal logits without a cache and through prefill + 4 cached decode steps (the same tokens fed to both)."""
    full_ref, steps_ref, tokens = prefill_and_decode(ref, ids())
    full, steps, _ = prefill_and_decode(fused, ids(), tokens=tokens)
    assert full_ref.abs().max() > 0.1, "degenerate logits would prove little"
    assert (full - full_ref).abs().max().item() <= tol
    assert (steps - steps_ref).abs().max().item() <= tol


@pytest.mark.parametrize("passes", [["qkv"], ["gate_up"], ["norms"], ["merge"], list(ALL)])
@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True, "mlp_bias": True}], ids=["llama", "biases"])
def test_each_pass_and_all_equal_unfused(passes, overrides):
    ref = tiny(**overrides)
    fused = copy.deepcopy(ref)
    reports = fuse_model_(fused, passes)
    assert list(reports) == [p for p in ALL if p in passes]
    assert_same_model(ref, fused)
    attn, mlp = fused.layers[0].self_attn, fused.layers[0].mlp
    if "qkv" in passes:
        assert attn.q_proj is None and attn.qkv_proj.out_features == (4 + 2 + 2) * 16
        assert len(reports["qkv"].fused) == 2 and not reports["qkv"].skipped
    if "gate_up" in passes:
        assert mlp.gate_proj is None and mlp.gate_up_proj.out_features == 2 * 128
    if "norms" in passes:
        assert len(reports["norms"].fused) == 5  # 2 per block + the final norm (the head is untied)
        assert all(bool((m.weight == 1).all()) for n, m in fused.named_modules() if n.endswith("norm"))


def test_passes_are_idempotent_and_validated():
    model = tiny()
    fuse_model_(model)
    again = fuse_model_(model)
    assert all("already fused" in why for why in again["qkv"].skipped.values())
    assert all("already 1" in why for why in again["norms"].skipped.values())
    assert parse_passes("gate_up, qkv") == ["qkv", "gate_up"]  # run in registry order
    with pytest.raises(ValueError, match="unknown fusion pass.*choose from merge, norms, qkv, gate_up"):
        parse_passes("qkv,rope")
    with pytest.raises(TypeError, match="fold_conv_bn_"):
        fuse_model_(nn.Sequential(nn.Linear(2, 2)))


def test_tied_head_is_folded_only_when_untied_explicitly():
    ref = tiny(tie_word_embeddings=True)
    kept = copy.deepcopy(ref)
    report = fuse_model_(kept, ["norms"])["norms"]
    assert "tied to the embedding" in report.skipped["norm"] and "MiB" in report.skipped["norm"]
    assert kept.lm_head.weight is kept.embed_tokens.weight and kept.config.tie_word_embeddings
    untied = copy.deepcopy(ref)
    report = fuse_model_(untied, ALL, untie_head=True)["norms"]
    assert "norm" not in report.skipped and any("untied" in n for n in report.notes)
    assert untied.lm_head.weight is not untied.embed_tokens.weight and not untied.config.tie_word_embeddings
    for m in (kept, untied):
        assert_same_model(ref, m)


def quantized(scheme: str, **kw) -> Transformer:
    from slimlm.quantize.schemes import quantize_model_

    return quantize_model_(tiny(), scheme, **kw)


@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic", "int4"])
def test_quantized_models_fuse_exactly(scheme):
    ref = quantized(scheme, group_size=32)
    fused = copy.deepcopy(ref)
    reports = fuse_model_(fused)
    assert len(reports["qkv"].fused) == len(reports["gate_up"].fused) == 2
    assert type(fused.layers[0].self_attn.qkv_proj) is type(ref.layers[0].self_attn.q_proj)
    assert len(reports["norms"].skipped) == 5 and "quantized" in reports["norms"].skipped["layers.0.input_layernorm"]
    # Same codes, same per-row scales: only the kernel's blocking differs (bf16 activations for int8/int4).
    assert_same_model(ref, fused, tol=1e-4)


def test_int8_static_fuses_equal_input_scales_and_skips_different_ones():
    from slimlm.compress.static_int8 import calibrate_input_scales
    from slimlm.quantize.schemes import quantize_model_

    base = tiny()
    scales = calibrate_input_scales(base, ids(4, 16, seed=1), dynamic_above=None)
    # q/k/v (and gate/up) read the same input, so calibration gives them the same scale: they fuse.
    ref = quantize_model_(copy.deepcopy(base), "int8-static", input_scales=scales)
    fused = copy.deepcopy(ref)
    reports = fuse_model_(fused, "qkv,gate_up")
    assert isinstance(fused.layers[0].self_attn.qkv_proj, StaticInt8Linear) and not reports["qkv"].skipped
    assert_same_model(ref, fused, tol=1e-4)
    scales["layers.1.self_attn.k_proj"] *= 2
    other = quantize_model_(copy.deepcopy(base), "int8-static", input_scales=scales)
    report = fuse_model_(other, "qkv")["qkv"]
    assert "input scales differ" in report.skipped["layers.1.self_attn.qkv_proj"] and len(report.fused) == 1


def _randomize_adapters_(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "magnitude" in name or p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(
    "method,options",
    [
        ("lora", {"r": 4, "alpha": 8}),
        ("lora", {"r": 4, "alpha": 8, "use_dora": True}),
        ("bitfit", {"train_norms": True}),
    ],
    ids=["lora", "dora", "bitfit"],
)
def test_adapter_merged_then_fused_equals_adapter_model(method, options):
    from slimlm.peft import apply_peft, make_config

    adapted = tiny()
    apply_peft(adapted, method, make_config(method, options))
    _randomize_adapters_(adapted)
    fused = copy.deepcopy(adapted)
    unmerged = fuse_model_(copy.deepcopy(adapted), "norms,qkv")  # without merge: adapters block the other passes
    if method != "bitfit":
        assert "merge" in unmerged["qkv"].skipped["layers.0.self_attn.qkv_proj"]
        assert "merge" in unmerged["norms"].skipped["layers.0.input_layernorm"]
    reports = fuse_model_(fused)
    assert reports["merge"].fused and fused.peft is None
    assert len(reports["qkv"].fused) == 2 and len(reports["norms"].fused) == 5
    assert_same_model(adapted, fused)


def test_unmergeable_adapter_is_skipped_and_the_rest_still_fuses():
    from slimlm.peft import apply_peft, make_config

    adapted = tiny()
    apply_peft(adapted, "prefix", make_config("prefix", {"num_virtual_tokens": 3}))
    _randomize_adapters_(adapted)
    fused = copy.deepcopy(adapted)
    reports = fuse_model_(fused)
    assert "cannot be merged" in reports["merge"].skipped["prefix"]
    assert len(reports["qkv"].fused) == 2
    with torch.no_grad():
        assert (fused(ids()) - adapted(ids())).abs().max().item() <= TOL


def test_fused_model_saves_hf_names_and_reloads_identically(tmp_path):
    fused = tiny(attention_bias=True)
    fuse_model_(fused, ALL)
    keys = set(fused.state_dict())
    assert "layers.0.self_attn.q_proj.weight" in keys and "layers.0.mlp.up_proj.weight" in keys
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in keys)
    _, reloaded = load_hf_folder(save_hf_folder(fused, tmp_path / "hf"))
    assert reloaded.layers[0].self_attn.qkv_proj is None  # files hold the unfused layout
    assert_same_model(fused, reloaded)
    # The fused model also loads an unfused state dict (its load hook concatenates the parts).
    other = tiny(seed=1, attention_bias=True)
    fuse_model_(other, "qkv,gate_up")
    other.load_state_dict(reloaded.state_dict())
    assert_same_model(reloaded, other)


def test_fused_quantized_model_saves_and_reloads(tmp_path):
    from slimlm.checkpoint.quantized import load_quantized, save_quantized

    fused = quantized("int4", group_size=32)
    fuse_model_(fused, "qkv,gate_up")
    assert isinstance(fused.layers[0].mlp.gate_up_proj, Int4WeightOnlyLinear)
    folder = save_quantized(fused, tmp_path / "q")
    reloaded = load_quantized(folder, fused.quantization)
    assert isinstance(reloaded.layers[0].self_attn.q_proj, Int4WeightOnlyLinear)
    assert_same_model(fused, reloaded, tol=1e-4)
    assert isinstance(quantized("int8").lm_head, Int8WeightOnlyLinear)


# ---- generic BatchNorm folding ----


def test_conv_bn_relu_and_linear_bn_fold_on_a_resnet():
    net = randomize_batchnorms_(SmallResNet(channels=8, blocks=2)).eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = net(x)
        conv = fold_conv_bn_(net)
        linear = fold_linear_bn_(net, example_inputs=(x,))
        out = net(x)
    assert len(conv.fused) == 5 and sum("(then ReLU)" in f for f in conv.fused) == 3  # stem + 2 x conv1
    assert linear.fused == ["fc <- fc + bn_fc (then ReLU)"]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert (out - ref).abs().max().item() <= TOL


def test_batchnorm_folding_refuses_train_mode_and_unsafe_pairs():
    block = randomize_batchnorms_(ResidualBlock(4))
    with pytest.raises(ValueError, match="'bn1' is in training mode.*eval()"):
        fold_conv_bn_(block)

    class Shared(nn.Module):  # the conv output is used twice: folding would change the second use
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    report = fold_conv_bn_(Shared().eval())
    assert not report.fused and "also used elsewhere" in report.skipped["bn"]
    seq = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)).eval()  # Linear on [N, C, L]: BN1d normalizes C
    report = fold_linear_bn_(seq, example_inputs=(torch.randn(2, 5, 6),))
    assert not report.fused and "3 dims" in report.skipped["1"]


def test_untraceable_module_falls_back_to_sequential_pairs():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.ReLU())

        def forward(self, x):
            return self.body(x) if x.sum() > 0 else -self.body(x)  # data-dependent: fx cannot trace it

    net = randomize_batchnorms_(Branchy()).eval()
    x = torch.rand(2, 3, 9)
    with torch.no_grad():
        ref = net(x)
        report = fold_conv_bn_(net)
        assert (net(x) - ref).abs().max().item() <= TOL
    assert report.fused == ["body.0 <- body.0 + body.1 (then ReLU)"] and "could not trace" in report.notes[0]


# ---- CLI ----


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_fuse_commands(p.add_subparsers(dest="command"))
    return p


def test_cli_parser_and_flag_errors():
    args = parser().parse_args(["fuse", "--model", "m", "--passes", "gate_up,qkv", "--out", "o"])
    assert args.func is cmd_fuse and args.dtype == "fp32" and args.adapter is None
    assert check_args(args) == ["qkv", "gate_up"]
    assert parser().parse_args(["fuse", "--out", "o"]).passes == "merge,norms,qkv,gate_up"
    with pytest.raises(ValueError, match="--adapter needs the merge pass"):
        check_args(parser().parse_args(["fuse", "--adapter", "a", "--passes", "qkv", "--out", "o"]))
    with pytest.raises(ValueError, match="unknown fusion pass"):
        check_args(parser().parse_args(["fuse", "--passes", "qkv,nope", "--out", "o"]))


def test_cli_fuses_and_saves_a_model_that_reloads(tiny_llama, tmp_path, capsys):
    import slimlm

    out = tmp_path / "fused"
    args = parser().parse_args(["fuse", "--model", str(tiny_llama[0]), "--out", str(out), "--json"])
    assert cmd_fuse(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["drift"]["max_logit_diff"] <= TOL and len(result["passes"]["qkv"]["fused"]) == 2
    ref, new = slimlm.load(str(tiny_llama[0]), dtype="fp32").model, slimlm.load(str(out), dtype="fp32").model
    assert bool((new.layers[0].input_layernorm.weight == 1).all())  # the folded gains persist as weights
    assert_same_model(ref, new)


def test_quantizing_a_fused_model_is_refused(tiny_llama):
    """Fused projections are not among the layers quantize_model_ swaps: refuse instead of leaving them fp32."""
    from slimlm.llm import load
    from slimlm.quantize.schemes import quantize_model_

    llm = load(tiny_llama[0], dtype="fp32")
    fuse_model_(llm.model, "qkv")
    with pytest.raises(ValueError, match="quantize first, then fuse"):
        quantize_model_(llm.model, "int8")
