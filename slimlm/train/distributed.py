"""Training on several processes with PyTorch's own engine: torchrun's environment, the process group, DDP or FSDP2
wrapping, each rank's share of a step's samples, and the few collectives the trainer needs.

slimlm has no launcher of its own: `torchrun --nproc-per-node N -m slimlm finetune ...` (or `slimlm finetune
--nproc N`, which runs torchrun) starts N processes; each calls `init_distributed`, loads the same model and data,
and trains on its share of every optimizer step (`rank_share`). Gradients meet in DDP's all-reduce or FSDP2's
reduce-scatter. gloo on CPU, NCCL on CUDA.

Strategies:
    ddp   DistributedDataParallel: every rank holds the whole model and optimizer; gradients are all-reduced.
    fsdp  FSDP2 (`torch.distributed.fsdp.fully_shard`) on each transformer Block, then on the root: parameters,
          gradients and optimizer state are sharded across ranks (frozen and trainable parameters may share a
          group, as LoRA needs). Buffers are not sharded: an NF4 base (QLoRA) keeps its 4-bit weights as
          buffers, so they are REPLICATED on every rank; only the trainable and full-precision parameters shard.

This module is not the training loop (train/trainer.py) and does not decide what to save (train/resume.py);
it knows nothing of data formats or PEFT methods.
"""

from __future__ import annotations

import atexit
import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from slimlm.errors import InputError

STRATEGIES = ("ddp", "fsdp")
DEFAULT_TIMEOUT_S = 300.0  # a collective waiting longer than this for a dead or stuck peer raises
T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job; a single process is rank 0 of a world of 1."""

    rank: int = 0
    local_rank: int = 0  # rank on this machine: picks the GPU
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True in a process started by torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join the process group torchrun described in the environment; a no-op world of 1 otherwise.

    backend None picks NCCL when CUDA is available (and makes cuda:LOCAL_RANK the current device), else gloo.
    `timeout_s` bounds every collective: a rank whose peer died raises instead of hanging (torchrun's agent also
    stops the other workers when one exits). Calling it again returns the existing group's DistInfo.
    """
    if dist.is_available() and dist.is_initialized():
        return dist_info()
    world = int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError(
            f"this PyTorch build has no torch.distributed; install a build with it to train on {world} processes"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    atexit.register(shutdown)  # once, at exit: a process may run several jobs in the one group
    return dist_info()


def dist_info() -> DistInfo:
    """The current process group's rank and size (a world of 1 when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size())


def is_main() -> bool:
    """True on rank 0, the one process that logs, plots and writes files (and in a single process)."""
    return dist_info().is_main


def device_for(info: DistInfo, requested: str) -> str:
    """The device a rank trains on: cuda:LOCAL_RANK when `requested` is a CUDA device and the job has several
    ranks (each takes its own GPU), else `requested` unchanged."""
    if info.distributed and requested.startswith("cuda"):
        return f"cuda:{info.local_rank}"
    return requested


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if dist_info().distributed:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (at the end of a run, so the next process group can start cleanly)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- wrapping ----------------------------------------------------------------------------------------------------


def wrap_model(model: nn.Module, strategy: str) -> nn.Module:
    """The module to call in training: `ddp` -> DistributedDataParallel(model); `fsdp` -> FSDP2 `fully_shard` on
    every transformer Block inside `model`, then on `model` itself (modified in place and returned).

    Needs `init_distributed` first. Without a process group the model is returned unchanged (a world of 1).
    DDP's and FSDP2's hooks run on `__call__`, so the training forward must go through the returned module's
    forward (the trainer wraps model + loss in one module for this). With fsdp, call `trainable_parameters` and
    build the optimizer AFTER wrapping: the parameters become sharded DTensors.
    """
    if strategy not in STRATEGIES:
        raise InputError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not (dist.is_available() and dist.is_initialized()):
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        # Buffers (RoPE frequencies, NF4 weights) are identical on every rank by construction: no per-forward
        # broadcast (newer PyTorch names the switch forward_sync_buffers).
        no_sync = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else {"broadcast_buffers": False}
        )
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None, **no_sync)
    from torch.distributed.fsdp import fully_shard

    from slimlm.model import Block

    for block in [m for m in model.modules() if isinstance(m, Block)]:
        fully_shard(block)
    fully_shard(model)  # the rest (embedding, final norm, head, soft prompts) in the root group
    return model


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Run one micro-batch's backward with (enabled) or without the cross-rank gradient reduction: accumulation
    reduces once, on the last micro-batch of a step (DDP `no_sync`, FSDP2 `set_requires_gradient_sync`)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def full_state_dict(model: nn.Module, names: set[str] | None = None, keep: bool = True) -> dict[str, torch.Tensor]:
    """model.state_dict() (only `names` if given) with every FSDP2 shard gathered whole, on CPU: what one process's
    model would hold. A collective under FSDP2: every rank calls it; ranks with keep=False gather and drop each
    tensor at once (only rank 0 needs them) and get {}."""
    out = {}
    for name, t in model.state_dict().items():
        if names is None or name in names:
            whole = full_tensor(t.detach()).cpu()
            if keep:
                out[name] = whole
    return out


# ---- data --------------------------------------------------------------------------------------------------------


def rank_share(items: list[T], rank: int, world_size: int) -> list[T]:
    """Rank `rank`'s contiguous part of `items`: N parts in order, sizes differing by at most one, whose
    concatenation is `items` (no overlap, nothing lost). A rank may get nothing when len(items) < world_size."""
    n = len(items)
    return items[rank * n // world_size : (rank + 1) * n // world_size]


# ---- collectives -------------------------------------------------------------------------------------------------


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks of a few numbers (float64); the numbers themselves in a single process."""
    if not dist_info().distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order ([obj] in a single process)."""
    if not dist_info().distributed:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (obj itself in a single process)."""
    if not dist_info().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(fn: Any, *args: Any, **kwargs: Any) -> None:
    """fn(*args, **kwargs) on rank 0 only (e.g. a check of the output folder that may delete files); a ValueError
    it raises is raised on every rank with the same message (an InputError stays one, so the CLI prints one line).
    In a single process, just fn."""
    info = dist_info()
    if not info.distributed:
        fn(*args, **kwargs)
        return
    error = None
    if info.is_main:
        try:
            fn(*args, **kwargs)
        except ValueError as e:
            error = (isinstance(e, InputError), str(e))  # (user-facing?, message)
    error = broadcast_object(error)
    if error is not None:
        user_facing, message = error
        raise (InputError if user_facing else ValueError)(message)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2-sharded DTensor (a collective: every rank must call it, in the same order);
    any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` (the same on every rank) laid out like `like`: this rank's shard when `like` is a DTensor (cut
    locally, no communication), else `full` on like's device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return full.to(like.device)


__all__ = [
    "DistInfo",
    "STRATEGIES",
    "all_gather_object",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "device_for",
    "dist_info",
    "full_state_dict",
    "full_tensor",
    "gradient_sync",
    "init_distributed",
    "is_main",
    "launched_by_torchrun",
    "on_rank0",
    "rank_share",
    "shard_like",
    "shutdown",
    "wrap_model",
]
