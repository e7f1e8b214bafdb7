"""TorchScript export: the traced file runs without slimlm and matches the model at untraced shapes."""

from __future__ import annotations

import json

import pytest
import torch

from slimlm import kernels
from slimlm.export.decoder import ExportDecoder, example_inputs
from slimlm.export.torchscript import TORCHSCRIPT_FILE, export_torchscript
from slimlm.llm import load


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_torchscript_export_matches_model(tiny_llama, tmp_path, quantize):
    llm = load(tiny_llama[0], dtype="fp32", quantize=quantize, group_size=32)
    meta = export_torchscript(llm.model, llm.tokenizer, tmp_path / "ts")
    assert meta["parity"]["max_logit_diff"] <= 1e-4
    loaded = torch.jit.load(str(tmp_path / "ts" / TORCHSCRIPT_FILE))
    ids = torch.randint(3, 300, (1, 11))  # a prompt longer than the traced one, no past
    inputs = example_inputs(llm.model, 1, 11, 0)
    logits = loaded(ids, *inputs[1:])[0]
    with kernels.disabled():  # the file runs torch's int8 kernel (bf16 activations), not slimlm's
        assert (logits - llm.model(ids)).abs().max() <= 1e-4
    assert json.loads((tmp_path / "ts" / "slimlm_export.json").read_text())["format"] == "torchscript"


def test_torchscript_file_runs_in_a_process_without_slimlm(tiny_llama, tmp_path):
    import subprocess
    import sys

    llm = load(tiny_llama[0], dtype="fp32")
    export_torchscript(llm.model, llm.tokenizer, tmp_path / "ts", check=False)
    inputs = example_inputs(llm.model, 1, 5, 0)
    torch.save(list(inputs), tmp_path / "inputs.pt")
    want = ExportDecoder(llm.model)(*inputs)[0]
    code = (
        "import sys, torch; sys.modules['slimlm'] = None; "  # importing slimlm would fail
        f"m = torch.jit.load({str(tmp_path / 'ts' / TORCHSCRIPT_FILE)!r}); "
        f"x = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True); "
        f"torch.save(m(*x)[0], {str(tmp_path / 'out.pt')!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert (got - want).abs().max() <= 1e-5
