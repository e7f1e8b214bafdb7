"""torch.compile for the decode step.

On CPU, inductor's `freezing` turns the weights into constants, which lets it pre-pack them for oneDNN/MKL GEMMs;
at batch 1 this is what lifts bf16 decoding well above eager speed. Prefill stays eager: its matmuls are large
enough that eager kernels already run near peak, and it would recompile for every prompt length.
"""

from __future__ import annotations

import torch

from slimlm.generate import DecodeFn, decode_one_token


def compile_decode(freezing: bool = True) -> DecodeFn:
    """A compiled decode_one_token; compiles on first call and again only when batch size or cache length change."""
    return torch.compile(decode_one_token, fullgraph=True, options={"freezing": freezing})
