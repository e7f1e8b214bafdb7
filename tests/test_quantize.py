"""quantize/int8.py, int4.py, model.py: layer accuracy by SQNR, packing, model save/reload, serving a quantized base."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
from serve_helpers import random_lora

import slimlm
from slimlm.checkpoint.materialize import CheckpointError
from slimlm.checkpoint.quantized import save_quantized
from slimlm.generate import SamplingParams, generate_tokens
from slimlm.quantize.int4 import Int4WeightOnlyLinear, pack_int4, quantize_int4_weight, unpack_int4
from slimlm.quantize.int8 import DynamicInt8Linear, Int8Embedding, Int8WeightOnlyLinear
from slimlm.quantize.schemes import SCHEMES, quantize_model_, quantized_bytes


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return 10 * torch.log10(ref.pow(2).mean() / (ref - approx).pow(2).mean()).item()


def gaussian_linear(n_out: int = 256, n_in: int = 512, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=True)
    nn.init.normal_(lin.weight, std=0.02)
    nn.init.normal_(lin.bias, std=0.02)
    return lin


@pytest.mark.parametrize("cls", [Int8WeightOnlyLinear, DynamicInt8Linear])
def test_int8_layers_sqnr_above_30db(cls):
    lin, x = gaussian_linear(), torch.randn(9, 512)
    q = cls.from_linear(lin)
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (256, 512) and q.scale.shape == (256,)
    assert sqnr_db(lin.weight, q.dequantize()) > 30
    with torch.no_grad():
        assert sqnr_db(lin(x), q(x)) > 30
        # The kernel multiplies by exactly the stored weight (up to bf16/int8 activation rounding).
        ref = x @ q.dequantize().T + lin.bias
        assert sqnr_db(ref, q(x)) > 35


def test_int4_sqnr_by_group_and_kernel_matches_stored_weight():
    lin, x = gaussian_linear(), torch.randn(3, 4, 512)
    sqnrs = {}
    for g in (32, 64, 128):
        q = Int4WeightOnlyLinear.from_linear(lin, g)
        assert q.qweight.shape == (256, 256) and q.qweight.dtype == torch.uint8 and q.scale.shape == (256, 512 // g)
        sqnrs[g] = sqnr_db(lin.weight, q.dequantize())
        with torch.no_grad():
            y = q(x)
            assert y.shape == (3, 4, 256)
            assert sqnr_db(x @ q.dequantize().T + lin.bias, y) > 35  # bf16 activations only
    assert sqnrs[64] > 15 and sqnrs[32] > sqnrs[64] > sqnrs[128]


def test_int4_packing_round_trip_and_errors():
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)
    with pytest.raises(ValueError, match="group size must be one of"):
        quantize_int4_weight(torch.randn(8, 64), group=48)
    with pytest.raises(ValueError, match="divisible by 64"):
        quantize_int4_weight(torch.randn(8, 96), group=64)


def test_int8_embedding_rows():
    emb = nn.Embedding(50, 32)
    q = Int8Embedding.from_embedding(emb)
    ids = torch.tensor([[3, 7, 49]])
    assert q(ids).shape == (1, 3, 32) and sqnr_db(emb(ids), q(ids)) > 30


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s != "int8-static"])  # static: calibrated, below
def test_quantized_model_close_to_fp32_and_reloads_identically(tiny_llama, tmp_path, scheme):
    ref = slimlm.load(str(tiny_llama[0]), dtype="fp32")
    llm = slimlm.load(str(tiny_llama[0]), dtype="fp32", quantize=scheme)
    assert llm.model.quantization["scheme"] == scheme
    ids = torch.randint(3, 300, (2, 20))
    with torch.no_grad():
        expected, out = ref.model(ids), llm.model(ids)
    assert sqnr_db(expected, out) > (8 if scheme == "int4" else 20)  # random tiny weights: int4 ~11 dB
    folder = save_quantized(llm.model, tmp_path / scheme, llm.tokenizer)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["scheme"] == scheme
    again = slimlm.load(str(folder), dtype="fp32")
    with torch.no_grad():
        assert torch.equal(again.model(ids), out)
    fp32_bytes = (tiny_llama[0] / "model.safetensors").stat().st_size
    file_bytes = (folder / "model.safetensors").stat().st_size
    assert file_bytes < (0.32 if scheme != "int4" else 0.22) * fp32_bytes
    assert quantized_bytes(again.model) < 0.32 * quantized_bytes(ref.model)


def test_quantize_errors(tiny_llama, tmp_path):
    llm = slimlm.load(str(tiny_llama[0]), dtype="fp32")
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'"):
        quantize_model_(llm.model, "int3")
    quantize_model_(llm.model, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model_(llm.model, "int4")
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(slimlm.load(str(tiny_llama[0])).model, tmp_path / "x")
    folder = save_quantized(llm.model, tmp_path / "q")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="llama", quantization_config={"quant_method": "gptq", "bits": 4})  # e.g. AutoGPTQ
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'gptq'-quantized checkpoints are not supported"):
        slimlm.load(str(folder))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_transformers_refuses_a_packed_folder_and_slimlm_reads_it(tiny_llama, tmp_path, scheme, capsys):
    """transformers skips an unknown quant_method and loads random weights; the folder's model_type makes it raise."""
    from transformers import AutoModelForCausalLM

    from slimlm.checkpoint.hf import QUANTIZED_MODEL_TYPE
    from slimlm.cli import main

    llm = slimlm.load(str(tiny_llama[0]), dtype="fp32", quantize=scheme)
    folder = save_quantized(llm.model, tmp_path / scheme, llm.tokenizer)
    with pytest.raises(
        ValueError,
        match=r"only slimlm reads\. Load this folder with slimlm\.load\(\).*"
        r"use the unquantized model",
    ):
        AutoModelForCausalLM.from_pretrained(str(folder))
    ids = torch.randint(3, 300, (1, 12))
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == QUANTIZED_MODEL_TYPE and cfg["quantization_config"]["model_type"] == "llama"
    # A folder written before (model_type at the top level) reads the same.
    old = tmp_path / "old"
    old.mkdir()
    for f in folder.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    cfg["model_type"] = cfg["quantization_config"].pop("model_type")
    (old / "config.json").write_text(json.dumps(cfg))
    with torch.no_grad():
        expected = llm.model(ids)
        for path in (folder, old):
            assert torch.equal(slimlm.load(str(path), dtype="fp32").model(ids), expected)
            assert main(["info", "--model", str(path), "--json"]) == 0
            assert json.loads(capsys.readouterr().out)["config"]["model_type"] == "llama"


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int4"])
def test_serving_engine_on_quantized_base_with_lora_rows(tiny_llama, tmp_path, scheme):
    """Base and adapter rows in one batch over a quantized base equal each generated alone."""
    from slimlm.engine.core import AdapterRef, Engine, EngineConfig, Request

    adapter = random_lora(tiny_llama[0], tmp_path / "a", seed=1)
    llm = slimlm.load(str(tiny_llama[0]), dtype="fp32", quantize=scheme)
    engine = Engine(llm.model, llm.tokenizer, EngineConfig(max_batch=2, max_seq_len=64, max_loras=1, max_lora_rank=4))

    def run(reqs):
        outs = [[] for _ in reqs]
        for r, out in zip(reqs, outs):
            r.emit = lambda o, out=out: out.extend(o.token_ids)
            engine.submit(r)
        while engine.has_work():
            engine.step()
        return outs

    prompt = llm.tokenizer.prompt_ids("tell me a story", chat=True)

    def make(a):
        return Request(
            prompt,
            SamplingParams(max_new_tokens=8, ignore_eos=True),
            adapter=AdapterRef(("a", 1), adapter, "a") if a else None,
        )

    together = run([make(False), make(True)])
    alone = run([make(False)]) + run([make(True)])
    assert together == alone and together[0] != together[1]
    ref = [step[0] for step in generate_tokens(llm.model, [prompt], SamplingParams(max_new_tokens=8, ignore_eos=True))]
    assert together[0] == ref  # the engine's slot cache gives the plain generator's tokens


def test_lora_adapter_on_quantized_base(tiny_llama, tmp_path):
    adapter = random_lora(tiny_llama[0], tmp_path / "a", seed=2)
    ref = slimlm.load(str(tiny_llama[0]), dtype="fp32", adapter=adapter)
    base = slimlm.load(str(tiny_llama[0]), dtype="fp32", quantize="int8")
    q = slimlm.load(str(tiny_llama[0]), dtype="fp32", quantize="int8", adapter=adapter)
    ids = torch.randint(3, 300, (1, 12))
    with torch.no_grad():
        expected, out, without = ref.model(ids), q.model(ids), base.model(ids)
    assert sqnr_db(expected, out) > 20 and sqnr_db(expected, without) < 10  # the adapter is applied


def test_cli_quantize_then_generate(tiny_llama, tmp_path, capsys):
    from slimlm.cli import main

    assert (
        main(
            [
                "quantize",
                "--model",
                str(tiny_llama[0]),
                "--scheme",
                "int4",
                "--group-size",
                "32",
                "--out",
                str(tmp_path / "q"),
            ]
        )
        == 0
    )
    assert "(int4 g32, rtn)" in capsys.readouterr().out
    assert (
        main(["generate", "--model", str(tmp_path / "q"), "--prompt", "hi", "--max-new-tokens", "3", "--ignore-eos"])
        == 0
    )
    assert (
        main(
            [
                "quantize",
                "--model",
                str(tiny_llama[0]),
                "--scheme",
                "int4",
                "--group-size",
                "48",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    assert "group_size must be one of" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_gptq_layer_beats_round_to_nearest_on_its_inputs():
    """On correlated inputs GPTQ's output error is lower than RTN's with the same grid and storage."""
    from slimlm.compress.gptq import gptq_int4_weight
    from slimlm.quantize.int4 import dequantize_int4

    torch.manual_seed(0)
    lin = gaussian_linear(64, 256)
    mix = torch.randn(256, 256) / 16
    x = torch.randn(2048, 256) @ mix + 0.1 * torch.randn(2048, 256)  # [n, in], correlated features
    H = 2 * x.T @ x / x.shape[0]
    rtn = quantize_int4_weight(lin.weight, group=64)
    ref = x @ lin.weight.T

    def err(q):
        return (ref - x @ dequantize_int4(q["qweight"], q["scale"], q["zero"]).T).pow(2).mean().item()

    for act_order in (False, True):
        gptq = gptq_int4_weight(lin.weight, H, group=64, act_order=act_order)
        assert gptq["qweight"].shape == rtn["qweight"].shape and gptq["scale"].dtype == torch.bfloat16
        assert err(gptq) < 0.8 * err(rtn)


def test_gptq_model_reloads_and_is_closer_than_rtn(tiny_llama, tmp_path):
    from slimlm.compress.gptq import gptq_quantize_model_

    ref = slimlm.load(str(tiny_llama[0]), dtype="fp32")
    calib = torch.randint(3, 380, (8, 32), generator=torch.Generator().manual_seed(0))
    test = torch.randint(3, 380, (4, 32), generator=torch.Generator().manual_seed(1))
    gptq = gptq_quantize_model_(
        slimlm.load(str(tiny_llama[0]), dtype="fp32").model, calib, group_size=32, progress=False
    )
    rtn = slimlm.load(str(tiny_llama[0]), dtype="fp32", quantize="int4", group_size=32).model
    with torch.no_grad():
        expected = ref.model(test)
        assert sqnr_db(expected, gptq(test)) > sqnr_db(expected, rtn(test))
        folder = save_quantized(gptq, tmp_path / "g", ref.tokenizer)
        assert json.loads((folder / "config.json").read_text())["quantization_config"]["method"] == "gptq"
        assert torch.equal(slimlm.load(str(folder), dtype="fp32").model(test), gptq(test))


def test_cli_gptq(tiny_llama, tmp_path, capsys):
    from slimlm.cli import main

    assert (
        main(
            [
                "quantize",
                "--model",
                str(tiny_llama[0]),
                "--scheme",
                "int4",
                "--method",
                "gptq",
                "--group-size",
                "32",
                "--calib-samples",
                "4",
                "--calib-seq-len",
                "16",
                "--out",
                str(tmp_path / "g"),
            ]
        )
        == 0
    )
    assert "(int4 g32, gptq)" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert cfg["method"] == "gptq" and cfg["calibration"] == {
        "samples": 4,
        "tokens": 16,
        "damp": 0.01,
        "act_order": True,
    }
    assert (
        main(
            [
                "quantize",
                "--model",
                str(tiny_llama[0]),
                "--scheme",
                "int8",
                "--method",
                "gptq",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    assert "method gptq is for scheme int4" in capsys.readouterr().err


def test_searched_int4_ranges_never_worse_than_full_range():
    from slimlm.quantize.int4 import int4_codes, int4_params, int4_params_searched

    w = torch.randn(32, 128) * 0.02
    w[0, 5] = 0.5  # an outlier: clipping its group pays off
    imp = torch.rand(128) + 0.5

    def err(scale, zero):
        s, z = scale.bfloat16().float(), zero.bfloat16().float()
        q = int4_codes(w, s, z).float()
        g = w.shape[1] // s.shape[1]
        deq = (q - 8) * s.repeat_interleave(g, 1) + z.repeat_interleave(g, 1)
        return (((deq - w) ** 2) * imp).sum().item()

    full, searched = err(*int4_params(w, 64)), err(*int4_params_searched(w, 64, importance=imp))
    assert searched < full


def test_smoothing_is_exact_in_full_precision_and_helps_dynamic_int8(tiny_llama):
    from slimlm.compress.smoothquant import smooth_model_

    ref = slimlm.load(str(tiny_llama[0]), dtype="fp32")
    with torch.no_grad():  # give the first norm's output a few outlier channels, as real Llamas have
        for block in ref.model.layers:
            block.input_layernorm.weight[:3] *= 30
            block.post_attention_layernorm.weight[5:7] *= 30
    state = {k: v.clone() for k, v in ref.model.state_dict().items()}
    calib = torch.randint(3, 380, (4, 32), generator=torch.Generator().manual_seed(0))
    test = torch.randint(3, 380, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref.model(test)
        plain = quantize_model_(slimlm.load(str(tiny_llama[0]), dtype="fp32").model, "int8-dynamic")
        plain.load_state_dict({k: v for k, v in state.items() if "layernorm" in k or k == "norm.weight"}, strict=False)
        info = smooth_model_(ref.model, calib, alpha=0.5)
        assert info["groups"] == 3 * len(ref.model.layers)
        torch.testing.assert_close(ref.model(test), expected, atol=1e-4, rtol=1e-4)  # same function
        smoothed = quantize_model_(ref.model, "int8-dynamic")
        assert sqnr_db(expected, smoothed(test)) > sqnr_db(expected, plain(test)) + 3
    with pytest.raises(ValueError, match="alpha must be in"):
        smooth_model_(slimlm.load(str(tiny_llama[0])).model, calib, alpha=1.5)


def test_percentile_observer_is_exact_and_minmax_is_the_max():
    from slimlm.compress.static_int8 import AbsObserver

    torch.manual_seed(0)
    batches = [torch.randn(3, 50, 16) * (1 + i) for i in range(4)]
    values = torch.cat([b.abs().flatten() for b in batches]).sort(descending=True).values
    pct, mm = AbsObserver(99.0, values.numel()), AbsObserver(None)
    for b in batches:
        pct(None, (b,), None)
        mm(None, (b,), None)
    k = math.ceil(values.numel() * 0.01)  # values above the 99th percentile: exactly k of them
    assert pct.value() == values[k].item() and mm.value() == values[0].item()
    assert pct.tail.numel() == k + 1  # only the tail is kept
    pct(None, (batches[0],), None)
    with pytest.raises(RuntimeError, match="saw 12000 values, more than the 9600 expected"):
        pct.value()


def test_static_int8_layer_sqnr_and_clipping():
    from slimlm.quantize.int8 import StaticInt8Linear

    lin, x = gaussian_linear(), torch.randn(9, 512)
    q = StaticInt8Linear.from_linear(lin, input_scale=x.abs().max().item() / 127)
    with torch.no_grad():
        assert sqnr_db(lin(x), q(x)) > 30
        # Beyond the calibrated range the input clips to it: 10x the input gives the output of the clipped input.
        clipped = (10 * x).clamp(-127 * q.input_scale, 127 * q.input_scale)
        torch.testing.assert_close(q(10 * x), q(clipped))


def test_int8_static_model_calibrates_saves_and_reloads(tiny_llama, tmp_path):
    from slimlm.compress.static_int8 import calibrate_input_scales
    from slimlm.quantize.schemes import named_quantizable_linears

    ref = slimlm.load(str(tiny_llama[0]), dtype="fp32")
    llm = slimlm.load(str(tiny_llama[0]), dtype="fp32")
    calib = torch.randint(3, 380, (8, 32), generator=torch.Generator().manual_seed(0))
    test = torch.randint(3, 380, (2, 20), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="needs a calibrated input scale for every linear layer"):
        quantize_model_(llm.model, "int8-static")
    with pytest.raises(ValueError, match="unknown observer 'mse'"):
        calibrate_input_scales(llm.model, calib, "mse")
    with pytest.raises(ValueError, match="int8-static needs calibration"):
        slimlm.load(str(tiny_llama[0]), quantize="int8-static")
    scales = calibrate_input_scales(llm.model, calib, "percentile", 99.9, dynamic_above=None)
    assert set(scales) == set(named_quantizable_linears(llm.model))
    minmax = calibrate_input_scales(llm.model, calib, "minmax", dynamic_above=None)
    assert all(scales[n] <= minmax[n] for n in scales) and any(scales[n] < minmax[n] for n in scales)
    quantize_model_(llm.model, "int8-static", input_scales=scales)
    with torch.no_grad():
        expected, out = ref.model(test), llm.model(test)
    assert sqnr_db(expected, out) > 15
    folder = save_quantized(llm.model, tmp_path / "static", llm.tokenizer)
    again = slimlm.load(str(folder), dtype="fp32")
    assert again.model.layers[0].mlp.down_proj.input_scale.item() == pytest.approx(scales["layers.0.mlp.down_proj"])
    with torch.no_grad():
        assert torch.equal(again.model(test), out)


def test_int8_static_hands_outlier_layers_to_dynamic_scales(tiny_llama, tmp_path):
    from slimlm.compress.static_int8 import calibrate_input_scales
    from slimlm.quantize.int8 import StaticInt8Linear

    llm = slimlm.load(str(tiny_llama[0]), dtype="fp32")
    calib = torch.randint(3, 380, (8, 32), generator=torch.Generator().manual_seed(0))
    test = torch.randint(3, 380, (2, 20), generator=torch.Generator().manual_seed(1))
    minmax = calibrate_input_scales(llm.model, calib, "minmax", 99.0, dynamic_above=None)
    pct = calibrate_input_scales(llm.model, calib, "percentile", 99.0, dynamic_above=None)
    ratio = {n: minmax[n] / pct[n] for n in minmax}  # max |x| / p99 |x| of each layer's input
    threshold = sorted(ratio.values())[len(ratio) // 2]
    scales = calibrate_input_scales(llm.model, calib, "minmax", 99.0, dynamic_above=threshold)
    dynamic = sorted(n for n, s in scales.items() if s is None)
    assert dynamic == sorted(n for n in ratio if ratio[n] > threshold) and 0 < len(dynamic) < len(scales)
    assert all(scales[n] == minmax[n] for n in scales if n not in dynamic)
    quantize_model_(llm.model, "int8-static", input_scales=scales)
    layers = dict(llm.model.named_modules())
    assert all(type(layers[n]) is DynamicInt8Linear for n in dynamic)
    assert sum(isinstance(m, StaticInt8Linear) for m in layers.values()) == len(scales) - len(dynamic)
    folder = save_quantized(llm.model, tmp_path / "mixed", llm.tokenizer)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["dynamic_layers"] == dynamic
    again = slimlm.load(str(folder), dtype="fp32")
    with torch.no_grad():
        assert torch.equal(again.model(test), llm.model(test))
    with pytest.raises(ValueError, match="dynamic_above must be >= 1"):
        calibrate_input_scales(again.model, calib, dynamic_above=0.5)


def test_cli_quantize_int8_static(tiny_llama, tmp_path, capsys):
    from slimlm.cli import main

    args = [
        "quantize",
        "--model",
        str(tiny_llama[0]),
        "--scheme",
        "int8-static",
        "--calib-samples",
        "4",
        "--calib-seq-len",
        "64",
        "--out",
        str(tmp_path / "q"),
    ]
    assert main(args + ["--observer", "minmax", "--smooth", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "activation scales (minmax)" in out and "smoothed 6 input groups" in out
    assert slimlm.load(str(tmp_path / "q")).model.quantization["scheme"] == "int8-static"
