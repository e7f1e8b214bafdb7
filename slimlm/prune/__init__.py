"""Pruning: remove weights (unstructured, N:M) or whole structures (heads, MLP channels, layers) from a model.

Every function works in place on a slimlm Transformer and returns a dict of what was done (sparsity or sizes,
params before/after), so they chain (e.g. from a `slimlm compress` recipe). Structured pruning really removes rows
and columns (a smaller, faster model); unstructured and N:M pruning only write zeros (no speed-up on dense kernels).
"""

from slimlm.prune.layers import drop_layers, every_other_layer, layer_importance, prune_layers_
from slimlm.prune.sparsity import sparsity_report
from slimlm.prune.structured import kv_group_scores, mlp_channel_scores, prune_heads_, prune_mlp_channels_
from slimlm.prune.unstructured import NM_PATTERNS, SCORES, prune_nm_, prune_unstructured_

__all__ = [
    "NM_PATTERNS",
    "SCORES",
    "drop_layers",
    "every_other_layer",
    "kv_group_scores",
    "layer_importance",
    "mlp_channel_scores",
    "prune_heads_",
    "prune_layers_",
    "prune_mlp_channels_",
    "prune_nm_",
    "prune_unstructured_",
    "sparsity_report",
]
