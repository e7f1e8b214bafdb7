"""Merge an adapter into its base model and save the result as an HF folder, reporting how much the logits moved.

Two drifts are measured on a fixed probe prompt: merged vs the adapter applied as trained (rounding only, unless
the save dtype is lower), and, for an NF4 (QLoRA) base, merged vs the adapter on the original full-precision base
— the quantization error a user trades for the 4-bit training memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from slimlm.peft import load_adapter, logit_drift, merge_adapter, read_adapter_config
from slimlm.peft.common import read_adapter_metadata

PROBE = "The quick brown fox jumps over the lazy dog. Fine-tuning changes how a model answers questions."


@torch.no_grad()
def merge_to_folder(model: str | Path, adapter: str | Path, out: str | Path, dtype: str = "fp32") -> dict[str, Any]:
    """Load base + adapter, merge, check, save an HF folder (config, safetensors, tokenizer, generation config)."""
    from slimlm.checkpoint import load_model
    from slimlm.checkpoint.hf import save_hf_folder
    from slimlm.tokenizer import Tokenizer

    method, _, _ = read_adapter_config(adapter)  # refuses a non-adapter folder before the slow load
    path, _, net = load_model(model, torch.float32, "cpu")
    tokenizer = Tokenizer.from_pretrained(path)
    ids = torch.tensor([tokenizer.encode(PROBE)])
    nf4 = read_adapter_metadata(adapter).get("slimlm_nf4_base") == "true"
    reference_fp = None
    if nf4:  # the adapter on the original weights, before the base is quantized
        _, _, fp = load_model(model, torch.float32, "cpu")
        load_adapter(fp, adapter, tokenizer, nf4_base=False)
        reference_fp = fp(ids)
        del fp
    load_adapter(net, adapter, tokenizer)
    before = net(ids)
    merge_adapter(net)
    save_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    after = net.to(save_dtype)(ids).float()
    save_hf_folder(net, out, tokenizer.hf, sorted(tokenizer.stop_token_ids), dtype=save_dtype)
    report = {"method": method, "out": str(out), "nf4_base": nf4, "drift_vs_unmerged": logit_drift(before, after)}
    if reference_fp is not None:
        report["drift_vs_full_precision_base"] = logit_drift(reference_fp, after)
    return report
