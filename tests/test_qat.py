"""QAT: the fake-quant grid is the real one, gradients pass straight through, training helps the converted model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimlm
from slimlm.compress.qat import (
    FakeQuantLinear,
    convert_qat_,
    fake_quant_int4,
    fake_quant_int8,
    prepare_qat_,
    qat_train_,
)
from slimlm.quantize.int4 import dequantize_int4, quantize_int4_weight
from slimlm.quantize.int8 import Int8WeightOnlyLinear
from slimlm.quantize.schemes import quantize_model_


def test_fake_quant_grid_is_the_stored_grid():
    torch.manual_seed(0)
    w = torch.randn(32, 128) * 0.05
    assert torch.equal(fake_quant_int4(w, 64), dequantize_int4(**quantize_int4_weight(w, 64)))
    lin = nn.Linear(128, 32, bias=False)
    lin.weight.data = w
    assert torch.equal(fake_quant_int8(w), Int8WeightOnlyLinear.from_linear(lin).dequantize())


def test_straight_through_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    fq = FakeQuantLinear(lin, "int4", 32)
    x = torch.randn(5, 64)
    fq(x).square().sum().backward()
    wq = fake_quant_int4(lin.weight.detach(), 32).requires_grad_(True)
    F.linear(x, wq, lin.bias.detach()).square().sum().backward()
    torch.testing.assert_close(lin.weight.grad, wq.grad)  # d/dw = d/dwq: the rounding is skipped in backward


def _loss(model, ids):
    with torch.no_grad():
        logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def test_prepare_train_convert(tiny_llama, tmp_path):
    llm = slimlm.load(str(tiny_llama[0]), dtype="fp32")
    model = llm.model
    ids = torch.randint(3, 380, (8, 33), generator=torch.Generator().manual_seed(0))
    rtn = quantize_model_(slimlm.load(str(tiny_llama[0]), dtype="fp32").model, "int4", 32)
    prepare_qat_(model, "int4", 32)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("_proj.weight") for n in trainable)
    assert _loss(model, ids) == pytest.approx(_loss(rtn, ids), rel=2e-2)  # the fake-quant model is the RTN model
    qat_train_(model, ids, tmp_path / "qat", steps=30, lr=3e-3, batch_size=8, progress=False)
    trained_fake = _loss(model, ids)
    convert_qat_(model)
    assert model.quantization["scheme"] == "int4" and model.qat is None
    assert _loss(model, ids) == pytest.approx(trained_fake, rel=2e-2)  # conversion keeps what training saw
    assert _loss(model, ids) < _loss(rtn, ids) - 0.5  # and training through the rounding helped


def test_qat_errors(tiny_llama):
    model = slimlm.load(str(tiny_llama[0]), dtype="fp32").model
    with pytest.raises(ValueError, match="QAT supports the weight-only schemes int4, int8, not 'int8-dynamic'"):
        prepare_qat_(model, "int8-dynamic")
    with pytest.raises(ValueError, match="was not prepared for QAT"):
        convert_qat_(model)
    with pytest.raises(ValueError, match="needs in_features divisible by 128"):
        prepare_qat_(model, "int4", 128)
    with pytest.raises(ValueError, match="already quantized"):
        prepare_qat_(quantize_model_(model, "int8"), "int4")


def test_cli_quantize_qat(tiny_llama, tmp_path, capsys):
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
                "--method",
                "qat",
                "--qat-steps",
                "3",
                "--calib-samples",
                "4",
                "--calib-seq-len",
                "32",
                "--out",
                str(tmp_path / "q"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "QAT: 3 steps" in out and "(int4 g32, qat)" in out
    assert slimlm.load(str(tmp_path / "q")).model.quantization["scheme"] == "int4"
    assert (
        main(
            [
                "quantize",
                "--model",
                str(tiny_llama[0]),
                "--scheme",
                "int8-dynamic",
                "--method",
                "qat",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    assert "method qat is for the weight-only schemes int4 and int8" in capsys.readouterr().err


def test_qat_self_distillation_pulls_toward_the_full_precision_model(tiny_llama, tmp_path):
    import copy

    ref = slimlm.load(str(tiny_llama[0]), dtype="fp32").model.eval()
    model = copy.deepcopy(ref)
    ids = torch.randint(3, 380, (8, 33), generator=torch.Generator().manual_seed(0))

    def kl_to_ref(m):
        with torch.no_grad():
            p, q = F.log_softmax(ref(ids[:, :-1]), -1), F.log_softmax(m(ids[:, :-1]), -1)
        return F.kl_div(q, p, log_target=True, reduction="batchmean").item()

    rtn = quantize_model_(copy.deepcopy(ref), "int4", 32)
    prepare_qat_(model, "int4", 32)
    qat_train_(model, ids, tmp_path / "kd", steps=30, lr=3e-3, batch_size=8, teacher=ref, progress=False)
    convert_qat_(model)
    assert kl_to_ref(model) < 0.7 * kl_to_ref(rtn)
