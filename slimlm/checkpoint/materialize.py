"""Turn a stream of (slimlm name, tensor) pairs into a Transformer without a second copy of the weights.

The model is built on the meta device, so no random init is allocated; each tensor is cast and moved as it arrives
and then *assigned* as the parameter. Peak memory is one copy of the weights plus one tensor in flight.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch

from slimlm.config import ModelConfig
from slimlm.errors import CheckpointError
from slimlm.model import Transformer, rope_inv_freq

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|blk)\.(\d+)\.")  # HF / slimlm `layers.N.`, GGUF `blk.N.`


def check_layer_count(config: ModelConfig, names: Iterable[str], source: str | Path) -> None:
    """Refuse a checkpoint whose config disagrees with its tensors on the number of layers, before building.

    A corrupt layer count (a flipped bit in a GGUF block_count, a typo in config.json) could otherwise ask for
    millions of layers, and building them, even on the meta device, would hang instead of failing.
    """
    layers = {int(m.group(1)) for n in names if (m := _LAYER_INDEX.search(n))}
    if len(layers) != config.n_layers:
        raise CheckpointError(
            f"{source}: its config says {config.n_layers} layers but the weights hold tensors for "
            f"{len(layers)}; the checkpoint is corrupt or its config belongs to another model"
        )


def build_model(
    config: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    device: torch.device | str,
    source: str,
) -> Transformer:
    """Create a Transformer whose parameters are exactly `tensors` (names in slimlm's layout)."""
    try:
        with torch.device("meta"):
            model = Transformer(config)
    except (RuntimeError, OverflowError) as e:  # sizes whose product overflows, e.g. a corrupt hidden size
        raise CheckpointError(
            f"{source}: its config describes a model that cannot be built ({e}); "
            "check that config and weights come from the same model"
        ) from None
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    state = {}
    for name, t in tensors:
        if name not in expected:
            raise CheckpointError(
                f"{source}: unexpected tensor {name!r} for this config; "
                "check that config and weights come from the same model"
            )
        if tuple(t.shape) != tuple(expected[name]):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(t.shape)}, config expects "
                f"{tuple(expected[name])}; check that config and weights come from the same model"
            )
        state[name] = t.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(
            f"{source}: missing tensors {', '.join(missing[:3])}{more}; "
            "the checkpoint is incomplete or of another architecture"
        )
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.inv_freq = rope_inv_freq(config).to(device)
    return model.eval()
