"""quantize/compressed_tensors.py: slimlm's int8 folders as compressed-tensors, read as quantized by transformers.

What transformers computes from such a folder (found by reading CompressedTensorsHfQuantizer and measured here): it
loads the stored codes, decompresses them to the float dtype on the first forward and runs fake quantization. So for
weight-only int8 its weights equal slimlm's dequantized weights bit for bit, and its logits differ from slimlm's only
by slimlm's CPU kernel, which rounds each activation row to int16 (tests/test_kernels.py): ~1e-4 relative. With
activation quantization, transformers rounds activations compressed-tensors' way (per-token scale absmax / 127.5,
codes -128..127; slimlm and vLLM use absmax / 127, -127..127) and runs the ignored LM head dense, so its logits equal
slimlm's model run with those two conventions, exactly; slimlm itself reloads its folder bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import slimlm
from slimlm.checkpoint.materialize import CheckpointError
from slimlm.checkpoint.quantized import save_quantized
from slimlm.quantize.int8 import DynamicInt8Linear, Int8WeightOnlyLinear, StaticInt8Linear


def hf_load(folder):
    """transformers' model of a folder, with the loading report (missing / unexpected / mismatched keys)."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def ct_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


@pytest.fixture(scope="module")
def tied_llama(make_model_folder):
    return make_model_folder("llama", seed=3, tie_word_embeddings=True)


@pytest.mark.parametrize("tied", [False, True])
def test_int8_folder_loads_quantized_in_transformers_and_back_in_slimlm(tiny_llama, tied_llama, tmp_path, tied):
    src = (tied_llama if tied else tiny_llama)[0]
    llm = slimlm.load(str(src), dtype="fp32", quantize="int8")
    ids = torch.randint(3, 300, (2, 16))
    with torch.no_grad():
        expected = llm.model(ids)
    folder = save_quantized(llm.model, tmp_path / "ct", llm.tokenizer, format="compressed-tensors")
    cfg = ct_config(folder)
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert cfg["ignore"] == ["lm_head"] and cfg["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert cfg["config_groups"]["group_0"]["weights"] == {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "strategy": "channel",
        "dynamic": False,
    }
    hf = hf_load(folder)
    q = hf.model.layers[1].mlp.down_proj
    # Loaded as quantized: the quantizer attached the scheme and the layer holds the packed int8 codes, not a weight.
    assert q.quantization_status.value == "compressed" and q.weight_packed.dtype == torch.int32
    assert not hasattr(q, "weight") and q.weight_scale.shape == (q.out_features, 1)
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == tied
    with torch.no_grad():
        got = hf(ids).logits  # the first forward decompresses to fp32
    # Bit-identical weights: transformers' decompressed weight is slimlm's codes x scales.
    assert torch.equal(q.weight, llm.model.layers[1].mlp.down_proj.dequantize())
    # The logits differ only by slimlm's kernel (int16 activation rows): measured <= 4e-4 on logits of size ~4.
    assert (got - expected).abs().max() < 2e-3
    again = slimlm.load(str(folder), dtype="fp32")
    assert isinstance(again.model.layers[0].self_attn.q_proj, Int8WeightOnlyLinear)
    assert again.model.quantization["scheme"] == "int8"
    with torch.no_grad():
        assert torch.equal(again.model(ids), expected)


def _with_ct_rounding(model) -> None:
    """Run `model`'s int8 layers as compressed-tensors' fake quantization does (module docstring), head dense."""

    def rows(x):  # [M, in] -> fake-quantized per token, scale absmax / 127.5, codes -128..127
        s = (x.abs().amax(dim=1, keepdim=True) / 127.5).clamp(min=1e-12)
        return torch.round(x / s).clamp(-128, 127) * s

    def dynamic(self, x):
        return self._out(rows(x.reshape(-1, self.in_features).float()) @ self.dequantize().T, x)

    def static(self, x):
        xq = torch.round(x.reshape(-1, self.in_features).float() / self.input_scale).clamp(-128, 127)
        return self._out((xq * self.input_scale) @ self.dequantize().T, x)

    for m in model.modules():
        if isinstance(m, (DynamicInt8Linear, StaticInt8Linear)):
            m.forward = (dynamic if isinstance(m, DynamicInt8Linear) else static).__get__(m)
    head = model.lm_head
    head.forward = lambda x: F.linear(x, head.dequantize())


def _static_model(src):
    from slimlm.compress.static_int8 import calibrate_input_scales
    from slimlm.quantize.schemes import quantize_model_

    llm = slimlm.load(str(src), dtype="fp32")
    calib = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    scales = calibrate_input_scales(llm.model, calib, dynamic_above=None)
    # Hand the down projections to per-token scales, as dynamic_above does for outlier layers: both kinds of
    # layer in one folder (the LM head stays static).
    scales.update({n: None for n in scales if n.endswith("down_proj")})
    quantize_model_(llm.model, "int8-static", input_scales=scales)
    return llm


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int8-static"])
def test_activation_schemes_match_transformers_under_its_rounding(tiny_llama, tmp_path, scheme):
    if scheme == "int8-static":
        llm = _static_model(tiny_llama[0])
        assert llm.model.quantization["dynamic_layers"] == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]
    else:
        llm = slimlm.load(str(tiny_llama[0]), dtype="fp32", quantize=scheme)
    ids = torch.randint(3, 300, (2, 16))
    with torch.no_grad():
        expected = llm.model(ids)
    folder = save_quantized(llm.model, tmp_path / "ct", llm.tokenizer, format="compressed-tensors")
    cfg = ct_config(folder)
    assert cfg["format"] == "int-quantized"
    groups = list(cfg["config_groups"].values())
    acts = sorted((g["input_activations"]["strategy"], g["input_activations"]["dynamic"]) for g in groups)
    assert acts == ([("tensor", False), ("token", True)] if scheme == "int8-static" else [("token", True)])
    hf = hf_load(folder)
    assert hf.model.layers[0].self_attn.q_proj.weight.dtype == torch.int8  # compressed until the first forward
    with torch.no_grad():
        got = hf(ids).logits
    again = slimlm.load(str(folder), dtype="fp32")
    assert again.model.quantization == llm.model.quantization
    with torch.no_grad():
        assert torch.equal(again.model(ids), expected)  # slimlm reloads its model exactly (head from metadata)
        _with_ct_rounding(llm.model)
        assert (got - llm.model(ids)).abs().max() < 1e-4  # measured 0.0: the same weights, scales and grid
        assert (got - expected).abs().max() > 1e-3  # ...and the conventions do differ (measured ~0.1)


def test_folder_written_by_compressed_tensors_loads_in_slimlm(tmp_path, tokenizer_dir):
    """A W8A8 (INT8 dynamic) folder made with compressed-tensors' own ModelCompressor, as llm-compressor does."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from conftest import make_hf_model, save_hf_model

    hf = make_hf_model("llama", seed=5)
    config = QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme("W8A8", ["Linear"])}, ignore=["lm_head"]
    )
    apply_quantization_config(hf, config)
    with torch.no_grad():
        for _name, m in hf.named_modules():
            if hasattr(m, "weight_scale"):  # the observer's job in llm-compressor: absmax / 127.5 per channel
                m.weight_scale.copy_(m.weight.abs().amax(dim=1, keepdim=True) / 127.5)
    ids = torch.randint(3, 300, (2, 16))
    with torch.no_grad():
        expected = hf(ids).logits  # fake-quantized forward
    compressor = ModelCompressor.from_pretrained_model(hf)
    compressor.compress_model(hf)
    folder = save_hf_model(hf, tmp_path / "ct", tokenizer_dir)
    compressor.update_config(str(folder))
    assert ct_config(folder)["format"] == "int-quantized"
    llm = slimlm.load(str(folder), dtype="fp32")
    layer = llm.model.layers[0].mlp.up_proj
    assert isinstance(layer, DynamicInt8Linear) and llm.model.quantization["scheme"] == "int8-dynamic"
    # slimlm runs the stored codes and scales of every layer (codes -128 included: compressed-tensors' grid has it)
    for i, block in enumerate(llm.model.layers):
        for part, names in (
            ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            ("mlp", ("gate_proj", "up_proj", "down_proj")),
        ):
            for n in names:
                ours, theirs = getattr(getattr(block, part), n), getattr(getattr(hf.model.layers[i], part), n)
                assert torch.equal(ours.qweight, theirs.weight)
                assert torch.equal(ours.scale, theirs.weight_scale.reshape(-1))
    with torch.no_grad():
        got = llm.model(ids)
    # Not bit-equal: slimlm re-quantizes the dense embedding and head to int8 rows (its convention for every
    # quantized model; ~1.2 % of the logits on these random weights) and rounds activations by absmax / 127.
    # Measured: 3.2 % relative RMS, as large as the whole W8A8 fake quantization's own error (2.9 %) on this model.
    rel = (got - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()
    assert rel < 0.05


def test_unfit_models_refuse_compressed_tensors_and_int4_stays_loud_in_transformers(tiny_llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from slimlm.cli import main
    from slimlm.fuse.llama import fuse_qkv_

    llm = slimlm.load(str(tiny_llama[0]), dtype="fp32", quantize="int4")
    with pytest.raises(ValueError, match=r"cannot hold scheme 'int4': .*float zero point"):
        save_quantized(llm.model, tmp_path / "x", format="compressed-tensors")
    fused = slimlm.load(str(tiny_llama[0]), dtype="fp32", quantize="int8")
    fuse_qkv_(fused.model)
    with pytest.raises(ValueError, match="save it before fusing"):
        save_quantized(fused.model, tmp_path / "x", format="compressed-tensors")
    assert not (tmp_path / "x").exists()
    base = ["quantize", "--model", str(tiny_llama[0]), "--scheme", "int4", "--group-size", "32"]
    assert main(base + ["--format", "compressed-tensors", "--out", str(tmp_path / "bad")]) == 2
    assert "float zero point" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(base + ["--out", str(tmp_path / "q4")]) == 0  # default for int4: slimlm's layout
    assert "as slimlm" in capsys.readouterr().out
    with pytest.raises(ValueError, match="only slimlm reads"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "q4"))
    assert main(["quantize", "--model", str(tiny_llama[0]), "--scheme", "int8", "--out", str(tmp_path / "q8")]) == 0
    assert "as compressed-tensors" in capsys.readouterr().out  # default for int8
    assert ct_config(tmp_path / "q8")["quant_method"] == "compressed-tensors"
    assert (
        main(["generate", "--model", str(tmp_path / "q8"), "--prompt", "hi", "--max-new-tokens", "3", "--ignore-eos"])
        == 0
    )


def test_compressed_tensors_schemes_without_slimlm_kernel_are_refused(tiny_llama, tmp_path):
    llm = slimlm.load(str(tiny_llama[0]), dtype="fp32", quantize="int8")
    folder = save_quantized(llm.model, tmp_path / "ct", llm.tokenizer, format="compressed-tensors")
    cfg = json.loads((folder / "config.json").read_text())
    weights = cfg["quantization_config"]["config_groups"]["group_0"]["weights"]
    weights.update(strategy="group", group_size=32)  # llm-compressor's W8A16 preset: grouped int8
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"layer model\.layers\.0\.self_attn\.q_proj has a compressed-tensors "
        r"scheme slimlm has no kernel for .*'strategy': 'group'",
    ):
        slimlm.load(str(folder))
    cfg["quantization_config"]["ignore"].append("re:.*q_proj")
    weights.update(strategy="channel")
    weights.pop("group_size")
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"q_proj is not quantized"):
        slimlm.load(str(folder))


def test_bf16_model_reloads_exactly(tied_llama, tmp_path):
    """The dense embedding is written in fp32 (codes x scales), so a bf16 model's int8 table comes back exactly."""
    from safetensors import safe_open

    llm = slimlm.load(str(tied_llama[0]), dtype="bf16", quantize="int8-dynamic")
    folder = save_quantized(llm.model, tmp_path / "ct", llm.tokenizer, format="compressed-tensors")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
        assert f.get_slice("model.norm.weight").get_dtype() == "BF16"
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = slimlm.load(str(folder), dtype="bf16")
    ids = torch.randint(3, 300, (2, 16))
    with torch.no_grad():
        assert torch.equal(again.model(ids), llm.model(ids))
