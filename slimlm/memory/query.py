"""MemoryQuery: what to estimate (mode, method, dtypes, batch, sequence, optimizer, device, processes), validated once.

The vocabulary of a query lives here too: the modes, methods, dtypes and optimizers it accepts and the projection
names of a Llama block. This module does no arithmetic on a model (that is slimlm.memory.estimate) and knows no
model sizes (slimlm.memory.presets).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from slimlm.errors import InputError

MODES = ("train", "finetune", "infer")
METHODS = ("full", "lora", "qlora", "adapter", "bitfit", "prefix", "prompt")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZERS = ("adamw", "adamw8bit", "sgd", "sgd-momentum")
DEVICES = ("cpu", "cuda")
STRATEGIES = ("ddp", "fsdp")  # as train/distributed.py (not imported: this package reads configs only)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LINEARS = ATTENTION + MLP
ADAPTER_STYLES = {"houlsby": ("o_proj", "down_proj"), "pfeiffer": ("down_proj",)}  # as peft/adapter.py


class MemoryQueryError(InputError):
    """A MemoryQuery that cannot be estimated; the message names every bad field and what to use instead."""


@dataclass
class MemoryQuery:
    """What to estimate. Defaults follow slimlm's trainer and recipes (LoRA r=16 on every linear, AdamW, fp32)."""

    mode: str = "finetune"  # train (every weight, from scratch) | finetune (with `method`) | infer
    method: str | None = None  # None: full for train, lora for finetune, plain weights for infer
    dtype: str = "fp32"  # compute dtype: fp32 | bf16 | fp16 (bf16/fp16 training = autocast, mixed precision)
    weights_dtype: str | None = None  # stored weights; None: fp32 for training (the master copy), dtype for infer
    batch: int = 1  # sequences per micro-batch over all processes (TrainConfig.batch_size): batch / world_size each
    seq: int = 512  # tokens per sequence (training), prompt tokens (infer)
    kv_cache_tokens: int | None = None  # infer: cache slots per sequence; None: seq
    optimizer: str = "adamw"
    grad_checkpointing: bool = False
    device: str = "cpu"
    loss_chunk_size: int = 1024  # rows of logits at once (TrainConfig.loss_chunk_size)
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = LINEARS  # "all-linear" in the recipes
    adapter_style: str = "houlsby"
    adapter_bottleneck: int = 64
    bitfit_train_norms: bool = False
    num_virtual_tokens: int = 20  # prefix and prompt tuning
    world_size: int = 1  # training processes (torchrun --nproc-per-node); the estimate is then per rank
    strategy: str | None = None  # ddp (replicated) | fsdp (FSDP2, sharded); None: ddp when world_size > 1

    def __post_init__(self) -> None:
        if isinstance(self.lora_targets, str):
            self.lora_targets = (
                LINEARS
                if self.lora_targets == "all-linear"
                else tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
            )
        if self.method is None:
            self.method = {"train": "full", "finetune": "lora"}.get(self.mode)
        if self.weights_dtype is None:
            self.weights_dtype = self.dtype if self.mode == "infer" else "fp32"
        if self.strategy is None and isinstance(self.world_size, int) and self.world_size > 1:
            self.strategy = "ddp"  # the trainer's default (TrainConfig.strategy)
        self.validate()

    @property
    def training(self) -> bool:
        return self.mode != "infer"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def per_rank(self) -> MemoryQuery:
        """One rank's share as a single-process query: its batch / world_size sequences (activations, loss)."""
        return replace(self, batch=self.batch // self.world_size, world_size=1, strategy=None)

    def validate(self) -> None:
        """Raise one MemoryQueryError listing every problem."""
        errors = [*_choice_errors(self), *_number_errors(self), *_combination_errors(self)]
        if errors:
            raise MemoryQueryError("invalid memory query: " + "; ".join(errors))


def _choice_errors(q: MemoryQuery) -> list[str]:
    checks = [
        ("mode", q.mode, MODES),
        ("dtype", q.dtype, tuple(DTYPE_BYTES)),
        ("weights_dtype", q.weights_dtype, tuple(DTYPE_BYTES)),
        ("optimizer", q.optimizer, OPTIMIZERS),
        ("device", q.device, DEVICES),
        ("adapter_style", q.adapter_style, tuple(ADAPTER_STYLES)),
    ]
    if q.strategy is not None:
        checks.append(("strategy", q.strategy, STRATEGIES))
    if q.method is not None:
        checks.append(("method", q.method, METHODS))
    errors = [
        f"{name} must be one of {', '.join(options)}, got {value!r}"
        for name, value, options in checks
        if value not in options
    ]
    bad = [t for t in q.lora_targets if t not in LINEARS]
    if bad or not q.lora_targets:
        errors.append(
            f"lora_targets {list(bad or q.lora_targets)} are not projections; use names from "
            f"{', '.join(LINEARS)} or 'all-linear'"
        )
    return errors


def _number_errors(q: MemoryQuery) -> list[str]:
    numbers = {
        "batch": q.batch,
        "seq": q.seq,
        "loss_chunk_size": q.loss_chunk_size,
        "lora_rank": q.lora_rank,
        "adapter_bottleneck": q.adapter_bottleneck,
        "num_virtual_tokens": q.num_virtual_tokens,
        "world_size": q.world_size,
    }
    if q.kv_cache_tokens is not None:
        numbers["kv_cache_tokens"] = q.kv_cache_tokens
    return [
        f"{name} must be a positive integer, got {value!r}"
        for name, value in numbers.items()
        if not isinstance(value, int) or isinstance(value, bool) or value < 1
    ]


def _combination_errors(q: MemoryQuery) -> list[str]:
    errors = []
    if q.mode == "train" and q.method not in ("full", None):
        errors.append(f"mode train trains every weight; for method {q.method!r} use mode finetune")
    if q.mode == "infer" and (q.grad_checkpointing or q.optimizer != "adamw"):
        errors.append("grad_checkpointing and optimizer apply to training; drop them for mode infer")
    if q.training and q.kv_cache_tokens is not None:
        errors.append("kv_cache_tokens applies to mode infer only")
    if q.mode == "infer" and q.weights_dtype != q.dtype:
        errors.append(f"for mode infer the weights are held in dtype ({q.dtype}); drop weights_dtype")
    elif q.weights_dtype not in ("fp32", q.dtype) and q.weights_dtype in DTYPE_BYTES:
        errors.append(
            f"weights_dtype {q.weights_dtype} needs dtype {q.weights_dtype} (low-precision weights "
            "compute in their own dtype); or keep fp32 weights for mixed precision"
        )
    errors += _distributed_errors(q)
    if q.training and q.dtype == "fp16" and q.device == "cpu":
        errors.append(
            "fp16 training needs device cuda (slimlm's trainer uses a GradScaler only CUDA has); "
            "use dtype bf16 or fp32 on cpu"
        )
    return errors


def _distributed_errors(q: MemoryQuery) -> list[str]:
    if not (isinstance(q.world_size, int) and isinstance(q.batch, int) and q.world_size >= 1 and q.batch >= 1):
        return []  # reported by _number_errors
    errors = []
    if q.world_size == 1 and q.strategy is not None:
        errors.append(
            f"strategy {q.strategy} splits training over several processes; add world_size N > 1 "
            "(--world-size), or drop strategy for one process"
        )
    if q.world_size > 1 and q.mode == "infer":
        errors.append("world_size applies to training (one process serves a model); drop it for mode infer")
    elif q.batch % q.world_size:
        errors.append(
            f"batch ({q.batch}) is the micro-batch over all {q.world_size} processes, as the trainer's "
            f"batch_size: make it a multiple of {q.world_size} (each rank runs batch / world_size)"
        )
    return errors
