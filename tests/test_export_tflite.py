"""TFLite/LiteRT export (runs where litert-torch is installed; the error without it is tested everywhere)."""

from __future__ import annotations

import builtins

import pytest
import torch

from slimlm.export.tflite import StaticCacheDecoder, export_tflite, static_inputs
from slimlm.llm import load


def test_static_cache_decoder_matches_model(tiny_llama):
    llm = load(tiny_llama[0], dtype="fp32")
    dec = StaticCacheDecoder(llm.model)
    ids = torch.randint(3, 300, (1, 6))
    inputs = list(static_inputs(llm.model, 8, 16))
    inputs[0][:, :6] = ids  # right-padded prompt of 6 in a prefill of 8
    logits, *kv = dec(*inputs)
    assert (logits[:, :6] - llm.model(ids)).abs().max() <= 1e-5
    nxt = torch.tensor([[7]], dtype=torch.int32)
    step, *_ = dec(nxt, torch.tensor([6], dtype=torch.int32), *kv)  # overwrites pad slot 6 before attending
    full = llm.model(torch.cat([ids, nxt.long()], dim=1))[:, -1]
    assert (step[:, -1] - full).abs().max() <= 1e-5


def test_tflite_without_litert_says_what_to_install(tiny_llama, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_litert(name, *args, **kwargs):
        if name.startswith("litert_torch"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_litert)
    llm = load(tiny_llama[0], dtype="fp32")
    with pytest.raises(ValueError, match="pip install litert-torch"):
        export_tflite(llm.model, llm.tokenizer, tmp_path / "t")


def test_tflite_export_parity_in_litert_interpreter(tiny_llama, tmp_path):
    pytest.importorskip("litert_torch")
    llm = load(tiny_llama[0], dtype="fp32")
    meta = export_tflite(llm.model, llm.tokenizer, tmp_path / "t", prefill_len=8, max_len=32)
    assert meta["parity"]["max_logit_diff"] <= 1e-4  # prefill + 2 decode steps through the interpreter
    assert (tmp_path / "t" / "model.tflite").stat().st_size > 0
