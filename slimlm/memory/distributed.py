"""Per-rank memory of training on several processes, as train/distributed.py wraps the model: DDP or FSDP2.

The estimate of a query with world_size N > 1 is one process's bytes. Every rank runs batch / N sequences, so its
activations and loss buffers are a single process's at that batch (MemoryQuery.per_rank); what the strategy
changes is the rest:

DDP (DistributedDataParallel, default options: bucket_cap_mb 25, gradient_as_bucket_view False) holds the whole
model, every gradient and the whole optimizer state on every rank, plus its gradient buckets: flat tensors as large
as all trainable gradients together, allocated when the model is wrapped and kept for the run (the reducer copies
each gradient in, all-reduces the bucket, copies it back). Gloo all-reduces a bucket in place (no extra resident
bytes measured on CPU).

FSDP2 (`fully_shard` on each Block, then on the root module) keeps 1/N of every parameter (dim-0 shards; each tensor
padded to a multiple of N rows, < N rows per tensor, not counted), 1/N of the gradients and 1/N of the optimizer
states. Buffers are not sharded: QLoRA's NF4 codes are buffers, replicated on every rank. On top, per phase:
  forward/backward  the root group's parameters (embedding, final norm, untied head, soft prompt) all-gathered for
                    the whole forward and backward (the root is not resharded after its forward), and one of two
                    moments, whichever holds more: at the loss, the last block's flat all-gather buffer (FSDP2 keeps
                    the latest all-gather result until the root's forward ends, and the trainer's root forward
                    includes the loss: train.trainer.StepLoss); at the first block's backward, three blocks' worth
                    (the block in backward, the previous one prefetched and the prefetch's flat all-gather buffer, or
                    the block's gradients and their reduce-scatter copy), the previous block's reduce-scatter input
                    and the root's unsharded gradient when the root trains.
  backward end      the blocks' sharded gradients (+ the first block's reduce-scatter input, which FSDP2 holds
                    until the root reduces), the gathered root and its gradient twice: the embedding's backward
                    makes a new [V, D] gradient that is added into the head's before the root reduces.
  optimizer step    1/N of every gradient, and AdamW's temporaries for the largest shard.
Mixed precision stays autocast over fp32 weights (the trainer passes no MixedPrecisionPolicy), so the bf16 weight
copies autocast keeps for backward are casts of the gathered weights: whole on every rank, as in one process.
This module is arithmetic on a ModelConfig, like the rest of slimlm.memory; it imports no torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimlm.config import ModelConfig
from slimlm.memory.activations import activations
from slimlm.memory.plan import Plan, Precision, all_projections, layer_added_params, nf4_bytes, projection_shapes
from slimlm.memory.query import MemoryQuery


@dataclass(frozen=True)
class Groups:
    """Parameter counts of FSDP2's groups as train/distributed.py shards the model: one per Block, and the root."""

    root: int  # outside the blocks: embedding (+ untied head), final norm, soft prompt
    root_trainable: int
    block: int  # the largest block's parameters that FSDP gathers (NF4 codes are buffers: not counted)
    block_trainable: int  # trainable parameters in all blocks together
    block_grad: int  # one block's trainable parameters (full: the largest block; PEFT: the mean, a small number)


def fsdp_groups(config: ModelConfig, plan: Plan, trainable: int) -> Groups:
    """Split the model's parameters into the root group and the blocks."""
    head = 0 if config.tie_word_embeddings else config.vocab_size * config.dim
    prompt = plan.prompt * config.dim
    root = config.vocab_size * config.dim + head + config.dim + prompt
    root_trainable = root if plan.base_trains else prompt + config.dim * plan.norms_train
    blocks = []
    for i in range(config.n_layers):
        base = config._layer_params(i)
        if plan.nf4:  # the projections' weights are NF4 buffers, outside FSDP's parameter groups
            base -= sum(a * b for a, b in projection_shapes(config, i).values())
        blocks.append(base + layer_added_params(config, plan, i))
    block_trainable = trainable - root_trainable
    return Groups(
        root=root,
        root_trainable=root_trainable,
        block=max(blocks),
        block_trainable=block_trainable,
        block_grad=max(blocks) if plan.base_trains else -(-block_trainable // config.n_layers),
    )


def shard(n: int, world_size: int) -> int:
    """One rank's share of n elements (or bytes)."""
    return -(-n // world_size)


def sharded_weight_bytes(config: ModelConfig, plan: Plan, w: int, world_size: int) -> int:
    """Per-rank bytes of the base weights under FSDP2: dense parameters 1/N; NF4 codes (buffers) whole."""
    if not plan.nf4:
        return shard(config.num_params() * w, world_size)
    sizes = [a * b for a, b in all_projections(config)]
    return sum(nf4_bytes(n) for n in sizes) + shard((config.num_params() - sum(sizes)) * w, world_size)


def ddp_bucket_bytes(trainable: int, grad_w: int) -> int:
    """DDP's gradient buckets: one flat copy of every trainable gradient (gradient_as_bucket_view=False)."""
    return trainable * grad_w


def fsdp_block_moment(config: ModelConfig, q: MemoryQuery, plan: Plan, p: Precision, groups: Groups) -> dict[str, int]:
    """Bytes at a block's backward: activations (+ the recomputed block with checkpointing), the gradient flowing
    into the final norm and the last block [tokens, D] twice (the norm's input and output gradients), and the
    gathered parameters: root + its unsharded gradient + three blocks + the previous block's reduce-scatter input
    (FSDP2 holds one until the next group reduces: reduce_scatter_max_input_buffers = 1)."""
    local = q.per_rank()
    kept, block = activations(config, local, plan, p, q.grad_checkpointing)
    grad_w = 4 if plan.nf4 else p.w
    return {
        "activations": kept + (block if q.grad_checkpointing else 0),
        "loss": 2 * local.batch * local.seq * config.dim * p.s,
        "gathered": (groups.root + 3 * groups.block) * p.w + (groups.root_trainable + groups.block_grad) * grad_w,
    }


def fsdp_backward_end(groups: Groups, p: Precision, grad_w: int, world_size: int) -> tuple[int, int]:
    """(the blocks' sharded gradients + the first block's reduce-scatter input, still held; the gathered root + its
    gradient twice) at the embedding's backward, the end of the backward."""
    return (
        shard(groups.block_trainable * grad_w, world_size) + groups.block_grad * grad_w,
        groups.root * p.w + 2 * groups.root_trainable * grad_w,
    )
