"""Memory estimator: how many bytes inference, fine-tuning or training of a Llama-family model needs, from its config.

`estimate_memory(config, MemoryQuery(...))` returns a MemoryEstimate: named rows (bytes) and the peak. It reads no
weights (this module imports only slimlm.config), so it answers for a 70B model as fast as for a 135M one. The formulas
model slimlm's own code paths, term by term: what `slimlm.model` blocks keep for backward, the trainer's chunked fused
cross-entropy (train/loss.py), torch's AdamW, the NF4 storage of quantize/nf4.py, the static KV cache.

The peak is not the sum of everything: a training step has phases. Persistent rows (weights, trainable params,
optimizer states, KV cache) are always there; on top comes the larger of
  - forward/backward: saved activations + autocast weight copies + the loss's buffers, at the last loss chunk or
    at the start of the backward, whichever holds more, and
  - optimizer step: every gradient + the optimizer's temporaries.
During the backward, blocks free their activations while their gradients appear, so the memory in between never
exceeds the larger of the two ends (with gradient accumulation > 1 gradients would be persistent; slimlm's
trainer frees them after each step, set_to_none).
Inference adds the prefill working set (one block's temporaries at a time, nothing is kept) and the logits.

With `world_size` N > 1 (torchrun; `strategy` ddp or fsdp, as train/distributed.py wraps the model) the estimate is
one rank's: each runs batch / N sequences; DDP adds its gradient buckets to a whole replica, FSDP2 keeps 1/N of
weights, gradients and optimizer states plus what it gathers, and has a third phase, the end of the backward
(slimlm.memory.distributed says which tensors, when).

What the total is: bytes of tensors alive at the peak, i.e. CUDA's `torch.cuda.max_memory_allocated()`, and on CPU
the resident memory the step adds to a process that has already imported torch. Not included (shown as notes): the
Python + torch runtime itself (about 320 MiB of RSS on CPU) and the CUDA context (0.3-0.6 GiB outside torch's
allocator). bench/bench_memory.py checks the totals against measured peaks on SmolLM2-135M (CPU RSS with freed
memory returned to the OS; glibc's default malloc keeps some of it resident, see the notes it prints).

This module is arithmetic on a ModelConfig; it is not a profiler and it does not know about data (every token of a
batch is assumed to take a loss; SFT that masks the prompt has smaller logits buffers).
"""

# query.py: MemoryQuery and its validation; presets.py: --params sizes (the configs are config.py's presets);
# plan.py: what trains, parameter and weight bytes, Precision; activations.py: what the forward keeps for backward;
# distributed.py: per-rank terms of DDP and FSDP2 (world_size > 1); estimate.py: the other terms, the rows and the
# peak; cli.py: `slimlm estimate` (not imported here).
from slimlm.memory.estimate import MemoryEstimate, MemoryRow, estimate_memory
from slimlm.memory.presets import PRESETS, SIZE_PRESETS, preset_config
from slimlm.memory.query import (
    DEVICES,
    DTYPE_BYTES,
    LINEARS,
    METHODS,
    MODES,
    OPTIMIZERS,
    STRATEGIES,
    MemoryQuery,
    MemoryQueryError,
)

__all__ = [
    "DEVICES",
    "DTYPE_BYTES",
    "LINEARS",
    "METHODS",
    "MODES",
    "OPTIMIZERS",
    "PRESETS",
    "SIZE_PRESETS",
    "STRATEGIES",
    "MemoryEstimate",
    "MemoryQuery",
    "MemoryQueryError",
    "MemoryRow",
    "estimate_memory",
    "preset_config",
]
