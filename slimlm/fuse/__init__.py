"""Operator fusion: exact rewrites that do the same arithmetic with fewer, larger operations.

- Llama models (fuse/llama.py): `fuse_qkv_`, `fuse_gate_up_`, `fold_norms_`, `merge_adapters_`, or several at once
  with `fuse_model_(model, passes="merge,norms,qkv,gate_up")`; the registry is FUSION_PASSES.
- Any nn.Module (fuse/generic.py): `fold_conv_bn_` and `fold_linear_bn_` fold eval-mode BatchNorm into the layer
  before it (found with torch.fx); fuse/example_cnn.py is the worked example.
Every pass edits the model in place and returns a FusionReport (fused / skipped with the reason / notes).
Row concatenation of plain and quantized linears, and how a fused model still saves under the unfused HF names,
live in fuse/rows.py. `slimlm fuse` (fuse/cli.py) is the command line.
"""

from slimlm.fuse.generic import fold_conv_bn_, fold_linear_bn_
from slimlm.fuse.llama import (
    FUSION_PASSES,
    fold_norms_,
    fuse_gate_up_,
    fuse_model_,
    fuse_qkv_,
    merge_adapters_,
    parse_passes,
)
from slimlm.fuse.report import FusionReport

__all__ = [
    "FUSION_PASSES",
    "FusionReport",
    "fold_conv_bn_",
    "fold_linear_bn_",
    "fold_norms_",
    "fuse_gate_up_",
    "fuse_model_",
    "fuse_qkv_",
    "merge_adapters_",
    "parse_passes",
]
