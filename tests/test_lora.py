"""peft/lora.py + quantize/nf4.py: LoRA, rsLoRA, DoRA, QLoRA; parity with HF PEFT, merge, per-row adapters."""

from __future__ import annotations

import pytest
import torch

from slimlm.checkpoint.hf import load_hf_folder
from slimlm.peft import apply_peft, load_adapter, logit_drift, make_config, merge_adapter, save_adapter
from slimlm.peft.common import PeftError, read_adapter_files, read_adapter_metadata
from slimlm.peft.lora import (
    LoraConfig,
    LoRALinear,
    apply_lora,
    lora_state_dict,
    merge_lora,
    set_active_adapters,
    unmerge_lora,
)
from slimlm.quantize.nf4 import NF4Linear, dequantize_nf4, nf4_bytes, quantize_nf4

TOL = 1e-4


def ids(batch=2, length=12, seed=0, vocab=384):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize_lora_(model, seed=0, std=0.05):
    """Give LoRA B (and DoRA magnitudes) non-trivial values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=g))


@pytest.fixture
def base(tiny_llama):
    return load_hf_folder(tiny_llama[0])[1]


def train_steps(model, steps=10, lr=1e-2):
    x = ids(4, 16, seed=5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "method,options",
    [
        ("lora", dict(r=4, alpha=8)),
        ("lora", dict(r=4, alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"])),
        ("lora", dict(r=4, alpha=8, use_dora=True)),
    ],
)
def test_starts_at_base_trains_and_counts(base, method, options):
    x = ids()
    ref = base(x)
    summary = apply_peft(base, method, make_config(method, options))
    assert torch.equal(base(x), ref)  # B = 0 (and DoRA magnitude = column norms): starts as the base model
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable)
    targets = options.get(
        "target_modules", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    per_layer = 3 if options.get("use_dora") else 2
    assert len(trainable) == per_layer * len(targets) * base.config.n_layers
    assert summary.trainable == sum(p.numel() for p in base.parameters() if p.requires_grad)
    assert 0 < summary.percent < 100
    frozen = {n: p.clone() for n, p in base.named_parameters() if not p.requires_grad}
    losses = train_steps(base)
    assert losses[-1] < losses[0] * 0.9
    assert all(torch.equal(p, frozen[n]) for n, p in base.named_parameters() if n in frozen)


def _peft_model(hf_model, folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_model, str(folder)).eval()


@pytest.mark.parametrize(
    "options",
    [
        dict(r=4, alpha=8),
        dict(r=8, alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "down_proj"]),
        dict(r=4, alpha=4, use_dora=True),
    ],
)
def test_hf_peft_loads_our_adapter_with_same_logits(tiny_llama, tmp_path, options):
    from conftest import make_hf_model  # the same random weights as the tiny_llama folder

    folder, _ = tiny_llama
    _, model = load_hf_folder(folder)
    apply_peft(model, "lora", make_config("lora", options))
    randomize_lora_(model, seed=1)
    save_adapter(model, tmp_path / "adapter")
    hf = _peft_model(make_hf_model("llama", seed=1), tmp_path / "adapter")
    x = ids()
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    assert diff < TOL


def test_peft_trained_adapter_loads_here(tiny_llama, tmp_path):
    from conftest import make_hf_model
    from peft import LoraConfig as HFLoraConfig
    from peft import get_peft_model

    hf = get_peft_model(
        make_hf_model("llama", seed=1),
        HFLoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "up_proj"]),
    )
    randomize_lora_(hf, seed=2)
    hf.save_pretrained(str(tmp_path / "hf_adapter"))
    _, model = load_hf_folder(tiny_llama[0])
    assert load_adapter(model, tmp_path / "hf_adapter") == "lora"
    x = ids()
    with torch.no_grad():
        assert (model(x) - hf.eval()(x).logits).abs().max().item() < TOL


def test_save_load_identical_and_merge_unmerge(base, tiny_llama, tmp_path):
    apply_peft(base, "lora", make_config("lora", dict(r=4, alpha=8, use_dora=True)))
    randomize_lora_(base, seed=3)
    x = ids()
    with torch.no_grad():
        ref = base(x)
        save_adapter(base, tmp_path / "a", base_model="tiny")
        _, fresh = load_hf_folder(tiny_llama[0])
        load_adapter(fresh, tmp_path / "a")
        assert torch.equal(fresh(x), ref)
        merge_lora(base)
        assert (base(x) - ref).abs().max().item() < TOL
        unmerge_lora(base)
        assert (base(x) - ref).abs().max().item() < TOL
        merge_adapter(fresh)  # plain Transformer again: no LoRALinear left
        assert not any(isinstance(m, LoRALinear) for m in fresh.modules())
        assert (fresh(x) - ref).abs().max().item() < TOL


def test_multiple_adapters_switched_by_name(base):
    # Per-row mixing of adapters is serving's job (engine/multi_lora.py, tests/test_engine_multi_lora.py).
    apply_lora(base, LoraConfig(r=4, alpha=8), name="a")
    apply_lora(base, LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], use_dora=True), name="b")
    randomize_lora_(base, seed=4)
    x = ids(3, 10)
    with torch.no_grad():
        alone = {}
        for name in ("a", "b"):
            set_active_adapters(base, name)
            alone[name] = base(x)
        set_active_adapters(base, [])
        alone[None] = base(x)
        set_active_adapters(base, ["a", "b"])
        both = base(x)
    assert not torch.allclose(alone["a"], alone["b"])
    assert not torch.allclose(alone["a"], alone[None]) and not torch.allclose(both, alone["a"])
    with pytest.raises(PeftError, match="no LoRA adapter named"):
        set_active_adapters(base, ["nope"])


def test_adapter_file_is_peft_layout(base, tmp_path):
    apply_peft(base, "lora", make_config("lora", dict(r=4, target_modules=["q_proj"])))
    save_adapter(base, tmp_path / "a")
    config, tensors = read_adapter_files(tmp_path / "a")
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["target_modules"] == ["q_proj"]
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert set(tensors) == set(lora_state_dict(base))


def test_config_and_load_errors(base, tiny_llama, tmp_path):
    with pytest.raises(PeftError, match="r must be >= 1.*dropout"):
        make_config("lora", dict(r=0, dropout=1.5))
    with pytest.raises(PeftError, match="unknown target modules"):
        make_config("lora", dict(target_modules=["qkv"]))
    with pytest.raises(PeftError, match="no option"):
        make_config("lora", dict(rank=4))
    apply_peft(base, "lora", make_config("lora", dict(r=4)))
    save_adapter(base, tmp_path / "r4")
    _, other = load_hf_folder(tiny_llama[0])
    apply_peft(other, "lora", make_config("lora", dict(r=8)))
    from slimlm.peft.lora import load_lora_state_dict

    with pytest.raises(PeftError, match="shape mismatch"):
        load_lora_state_dict(other, read_adapter_files(tmp_path / "r4")[1])
    with pytest.raises(PeftError, match="no adapter_config.json"):
        load_adapter(other, tmp_path)


def test_nf4_roundtrip_error_and_size():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    state = quantize_nf4(w)
    back = dequantize_nf4(state, w.shape)
    sqnr = 10 * torch.log10(w.pow(2).sum() / (w - back).pow(2).sum()).item()
    assert sqnr > 19  # 4-bit NormalFloat on Gaussian weights: ~20 dB
    assert state["codes"].numel() == w.numel() // 2 and state["absmax_codes"].dtype == torch.int8
    assert nf4_bytes(w.numel()) * 8 / w.numel() < 4.2
    lin = torch.nn.Linear(256, 64)
    q = NF4Linear(lin)
    x = torch.randn(3, 256, requires_grad=True)
    y = q(x)
    y.sum().backward()
    ref_w = q.dequantize()
    assert torch.allclose(y, torch.nn.functional.linear(x, ref_w, lin.bias), atol=1e-5)
    assert torch.allclose(x.grad, ref_w.sum(0).expand(3, -1), atol=1e-5)


def test_qlora_trains_on_nf4_base_and_merge_reports_drift(base, tiny_llama, tmp_path):
    x = ids()
    summary = apply_peft(base, "qlora", make_config("qlora", dict(r=4, alpha=8)))
    assert any(isinstance(m, NF4Linear) for m in base.modules())
    assert summary.total >= base.config.num_params()  # NF4 weights counted by element
    losses = train_steps(base, steps=8)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        before = base(x)
        save_adapter(base, tmp_path / "q")
        merge_adapter(base)
        assert not any(isinstance(m, NF4Linear) for m in base.modules())
        drift = logit_drift(before, base(x))
    # fp32 round-off only: KL's noise floor is ~1e-8 and depends on the CPU's kernels; a wrong merge gives >> 1e-4
    assert drift["max_logit_diff"] < 1e-4 and drift["kl"] < 1e-6
    config, _ = read_adapter_files(tmp_path / "q")
    assert config["peft_type"] == "LORA" and read_adapter_metadata(tmp_path / "q")["slimlm_nf4_base"] == "true"


def test_qlora_bf16_autocast(base):
    apply_peft(base, "qlora", make_config("qlora", dict(r=4)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = base(ids())
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
