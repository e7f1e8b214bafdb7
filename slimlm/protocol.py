"""`CausalLM`: what generation, serving and evaluation need from a model, and nothing more.

slimlm's `Transformer` (model.py) and the ONNX Runtime model (export/ort.py) both satisfy it, so the generation
loop (generate.py, LLM), the serving engine (engine/) and evaluation (eval/) drive either unchanged. Code that
needs the PyTorch modules themselves (fine-tuning, quantization, fusion, export) takes a `Transformer` instead.
This module only names the contract; it builds nothing and imports nothing of slimlm at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from slimlm.config import ModelConfig


@runtime_checkable
class CausalLM(Protocol):
    """Token ids [B, T] -> logits [B, T, V], optionally reading and writing a slimlm KV cache.

    `isinstance(model, CausalLM)` tells a model of this shape from any other nn.Module (it checks that the
    attributes exist, not their types).
    """

    config: ModelConfig  # sizes: vocab_size, max_seq_len, n_layers, n_kv_heads, head_dim, ...
    quantization: dict[str, Any] | None  # the scheme the weights are stored in (config.json's); None: dense
    peft: Any  # the attached fine-tuning adapter (peft.PeftState); None: none
    training: bool  # nn.Module's train/eval flag; always False for a model that cannot train

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def __call__(
        self,
        input_ids: torch.Tensor,
        cache: Any = None,
        cache_pos: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def eval(self) -> CausalLM: ...

    def train(self, mode: bool = True) -> CausalLM: ...
