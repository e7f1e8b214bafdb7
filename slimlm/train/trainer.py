"""The training loop: micro-batches -> token-weighted loss -> AdamW step, with eval, metrics and resumable checkpoints.

One loop serves full fine-tuning and every PEFT method: it trains exactly the parameters with requires_grad=True and
touches nothing else. The loop is written out (see `train`); its pieces are small functions:

    SampleStream          data order, a pure function of (seed, epoch, position), so resuming needs two numbers;
                          an optimizer step never spans two epochs, so an epoch is a whole number of steps
    accumulate_gradients  forward + backward of one optimizer step's micro-batches, normalised over all of them
                          (accumulate_step: the same for a StepLoss module, wrapped in DDP / FSDP2 or not)
    optimizer_step        unscale (fp16), clip, step, schedule
    evaluate              mean token loss over held-out samples

The run is `max_steps` optimizer steps or `num_epochs` passes over the data (TrainConfig.total_steps). Logs go to
metrics.jsonl and TensorBoard (train/run_log.py).

Several processes (torchrun; train/distributed.py): batch_size x grad_accum stays the GLOBAL batch. Every rank reads
the same SampleStream and takes its contiguous share of each micro-batch (batch_size / world_size samples), and each
rank's loss is divided by the labelled tokens of the whole step over all ranks (known locally: every rank sees the
whole step's samples), so the reduced gradient equals one process's up to float reassociation. The model and its
loss run as one module (StepLoss) wrapped in DDP or FSDP2 (cfg.strategy). Only rank 0 logs and writes checkpoints;
eval runs on every rank over the whole eval set (replicated, not split).

This module is not a data pipeline (train/data.py makes Samples) and saves no final model: checkpoints here exist to
resume (train/resume.py); the caller saves the trained adapter or model when `train` returns.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from slimlm.errors import InputError
from slimlm.train.batch import IGNORE, Sample, collate
from slimlm.train.distributed import (
    STRATEGIES,
    DistInfo,
    all_reduce_sum,
    broadcast_object,
    dist_info,
    full_tensor,
    gradient_sync,
    rank_share,
    wrap_model,
)
from slimlm.train.loss import chunked_cross_entropy
from slimlm.train.resume import (
    ResumeError,
    checkpoint_folder,
    list_checkpoints,
    load_checkpoint,
    remove_partial_checkpoints,
    rotate_checkpoints,
    save_checkpoint,
    trainable_parameters,
)
from slimlm.train.run_log import RunLog

PRECISIONS = ("fp32", "bf16", "fp16")
# Config fields that only say when to log, evaluate or save: changing them on resume leaves the training unchanged.
_BOOKKEEPING = ("eval_every", "save_every", "keep_checkpoints", "log_every", "tensorboard", "dist_timeout_s")
DEFAULT_MAX_STEPS = 100  # the run length when neither max_steps nor num_epochs is set
SINGLE_PROCESS = DistInfo()  # the default `info`: rank 0 of a world of 1 (DistInfo is frozen, so one can be shared)


class TrainConfigError(InputError):
    """Training settings that cannot work; the message lists every problem and what to change."""


@dataclass
class TrainConfig:
    max_steps: int | None = None  # optimizer steps (set this or num_epochs, not both; neither: 100 steps)
    num_epochs: int | None = None  # passes over the training data (the last step of each epoch may be smaller)
    batch_size: int = 8  # samples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW decoupled decay; never applied to 1-D params (biases, norm gains)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW beta1,beta2
    warmup_steps: int = 0  # linear warmup, then cosine decay to min_lr_ratio * lr at max_steps
    min_lr_ratio: float = 0.0  # the cosine decay ends at min_lr_ratio * lr
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still logged)
    precision: str = "fp32"  # "fp32" | "bf16" (autocast, CPU and CUDA) | "fp16" (CUDA only: autocast + GradScaler)
    gradient_checkpointing: bool = False  # recompute block activations in backward: less memory, more compute
    loss_chunk_size: int = 1024  # rows of the [tokens, vocab] logits computed at once (train/loss.py)
    eval_every: int = 0  # steps; 0 = only at the end (if eval samples or eval_fn are given)
    save_every: int = 0  # steps; 0 = no intermediate checkpoints
    keep_checkpoints: int = 2  # the newest N checkpoints are kept in OUT/checkpoints
    log_every: int = 1  # steps between lines of OUT/metrics.jsonl
    seed: int = 0  # data order, and the global RNGs (dropout) at the start of a fresh run
    tensorboard: bool = True  # also write the metrics as TensorBoard scalars to OUT/tensorboard/
    # with several processes (torchrun, --nproc): ddp replicates the model, fsdp (FSDP2) shards parameters,
    # gradients and optimizer state; batch_size x grad_accum stays the global batch
    strategy: str = "ddp"
    dist_timeout_s: float = 300.0  # with several processes: seconds a rank waits for a dead or stuck peer, then fails

    def validate(self, device_type: str | None = None) -> None:
        """Raise one TrainConfigError naming every problem; `device_type` ("cpu", "cuda") adds device checks."""
        errors = []
        for name in (
            "max_steps",
            "num_epochs",
            "batch_size",
            "grad_accum",
            "loss_chunk_size",
            "keep_checkpoints",
            "log_every",
        ):
            value = getattr(self, name)
            if not (value is None and name in ("max_steps", "num_epochs")) and (not _is_int(value) or value <= 0):
                errors.append(f"{name} must be a positive integer, got {value!r}")
        if self.max_steps is not None and self.num_epochs is not None:
            errors.append(
                f"max_steps ({self.max_steps}) and num_epochs ({self.num_epochs}) are both set; set one: "
                "the run is either a number of optimizer steps or a number of passes over the data (on the command "
                "line, --train.max_steps none un-sets a recipe's max_steps)"
            )
        if not isinstance(self.tensorboard, bool):
            errors.append(f"tensorboard must be true or false, got {self.tensorboard!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                errors.append(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            errors.append(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            errors.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm >= 0):
            errors.append(f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm!r}")
        if not (isinstance(self.min_lr_ratio, (int, float)) and 0 <= self.min_lr_ratio <= 1):
            errors.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            errors.append(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if _is_int(self.warmup_steps) and _is_int(self.max_steps) and self.warmup_steps > self.max_steps:
            errors.append(f"warmup_steps ({self.warmup_steps}) must not exceed max_steps ({self.max_steps})")
        if self.strategy not in STRATEGIES:
            errors.append(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if not (isinstance(self.dist_timeout_s, (int, float)) and self.dist_timeout_s > 0):
            errors.append(f"dist_timeout_s must be a positive number of seconds, got {self.dist_timeout_s!r}")
        if self.precision not in PRECISIONS:
            errors.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        elif device_type is not None:
            errors += _device_errors(self.precision, device_type)
        if errors:
            raise TrainConfigError("invalid training config: " + "; ".join(errors))

    def steps_per_epoch(self, n_samples: int) -> int:
        """Optimizer steps in one pass over n_samples: ceil(micro-batches / grad_accum), micro-batches being
        ceil(n_samples / batch_size) (the last of each may be short)."""
        return math.ceil(math.ceil(n_samples / self.batch_size) / self.grad_accum)

    def total_steps(self, n_samples: int) -> int:
        """The run's optimizer steps: max_steps, or num_epochs * steps_per_epoch, or DEFAULT_MAX_STEPS."""
        if self.num_epochs is not None:
            return self.num_epochs * self.steps_per_epoch(n_samples)
        return self.max_steps if self.max_steps is not None else DEFAULT_MAX_STEPS


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _device_errors(precision: str, device_type: str) -> list[str]:
    if precision == "fp16" and device_type != "cuda":
        return [
            f"precision 'fp16' needs a CUDA device (the model is on {device_type}): it relies on a GradScaler "
            "that only CUDA supports; use precision 'bf16' or 'fp32'"
        ]
    if precision == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        return ["precision 'bf16' is not supported by this GPU; use 'fp16' or 'fp32'"]
    return []


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in total (including those before a resume)
    final_loss: float | None  # loss of the last step this call ran; None if it ran none
    eval_metrics: dict[str, float]  # the last evaluation ({} without eval data)
    tokens_per_s: float  # all input tokens (prompt included) per second of training, over the whole run
    trained_tokens: int  # tokens that took a loss, over the whole run
    elapsed_s: float  # wall time, over the whole run
    metrics_path: Path


@dataclass
class RunState:
    """Where a run stands; saved in every checkpoint's state.json."""

    step: int = 0
    epoch: int = 0  # data position: the next micro-batch starts at sample `position` of epoch `epoch`'s order
    position: int = 0
    trained_tokens: int = 0
    input_tokens: int = 0
    train_time_s: float = 0.0  # time in training steps only (throughput excludes eval and saving)
    elapsed_s: float = 0.0

    def advance(self, trained_tokens: int, input_tokens: int, step_time_s: float, stream: SampleStream) -> None:
        """Count one finished optimizer step, which read the stream up to its current position."""
        self.step += 1
        self.epoch, self.position = stream.epoch, stream.position
        self.trained_tokens += trained_tokens
        self.input_tokens += input_tokens
        self.train_time_s += step_time_s


# ---- schedule and optimizer --------------------------------------------------------------------------------------


def lr_factor(step: int, cfg: TrainConfig, total_steps: int | None = None) -> float:
    """LR multiplier for optimizer step `step` (0-based): warmup (step+1)/warmup, then cosine to min_lr_ratio.

    Warmup reaches the full LR at its last step (no step is wasted at LR 0); the cosine reaches min_lr_ratio at
    step == total_steps (default: cfg.max_steps), i.e. just after the last step.
    """
    total = total_steps if total_steps is not None else cfg.max_steps or DEFAULT_MAX_STEPS
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def make_optimizer(
    params: dict[str, nn.Parameter], cfg: TrainConfig, total_steps: int | None = None
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable params (no decay on 1-D ones: biases, norm gains, DoRA magnitudes) + the schedule
    of a run of total_steps (default: cfg.max_steps)."""
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas))
    # A plain function (not a callable object), so the scheduler's state_dict holds numbers only.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
    return optimizer, scheduler


# ---- data --------------------------------------------------------------------------------------------------------


class SampleStream:
    """Micro-batches of `batch_size` consecutive samples of a seeded permutation, epoch after epoch.

    Epoch e's order is randperm(n, seed + e); the last micro-batch of an epoch may be short. The stream is a pure
    function of (seed, epoch, position), so a resumed run picks up exactly where the checkpoint left off.
    `next_step` reads one optimizer step's micro-batches and stops at the end of an epoch.
    """

    def __init__(self, samples: list[Sample], batch_size: int, seed: int, epoch: int = 0, position: int = 0):
        self.samples, self.batch_size, self.seed = samples, batch_size, seed
        self.epoch, self.position = epoch, position
        self._order = self._epoch_order(epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.samples), generator=g).tolist()

    def next(self) -> list[Sample]:
        return self.next_indexed()[1]

    def next_indexed(self) -> tuple[list[int], list[Sample]]:
        """The next micro-batch and the indices of its samples in the list the stream was made from."""
        if self.position >= len(self.samples):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        idx = self._order[self.position : self.position + self.batch_size]
        self.position += len(idx)
        return idx, [self.samples[i] for i in idx]

    def next_step(self, grad_accum: int) -> list[tuple[list[int], list[Sample]]]:
        """Up to grad_accum micro-batches (indexed), fewer when the epoch ends first: a step never spans epochs."""
        picked = [self.next_indexed()]
        while len(picked) < grad_accum and self.position < len(self.samples):
            picked.append(self.next_indexed())
        return picked

    @property
    def epochs_done(self) -> float:
        """Passes over the data read so far: 1.0 at the end of the first epoch, 1.5 halfway through the second."""
        return self.epoch + self.position / len(self.samples)


def add_prefix(samples: list[Sample], prefix_ids: Sequence[int]) -> list[Sample]:
    """Prepend `prefix_ids` (e.g. prompt-tuning virtual tokens) to every sample, with IGNORE labels.

    Packed samples cannot take a prefix: every packed segment would need its own, which changes the packing.
    """
    if not prefix_ids:
        return samples
    if any(s.segment_ids is not None for s in samples):
        raise TrainConfigError(
            "packing with prompt tuning is unsupported: input_prefix_ids cannot be added to "
            "packed samples (segment_ids); build the data without packing"
        )
    prefix = list(prefix_ids)
    return [Sample(prefix + s.input_ids, [IGNORE] * len(prefix) + s.labels) for s in samples]


def _check_inputs(
    params: dict[str, nn.Parameter],
    train_samples: list[Sample],
    eval_samples: list[Sample] | None,
    prefix_ids: Sequence[int],
) -> None:
    errors = []
    if not params:
        errors.append(
            "the model has no parameter with requires_grad=True; apply a PEFT method or unfreeze "
            "the parameters to train"
        )
    if not train_samples:
        errors.append("train_samples is empty")
    elif not any(s.num_trained for s in train_samples):
        errors.append(
            "no train sample has a labelled token (every label is IGNORE); check the prompt masking and the max length"
        )
    if eval_samples is not None and not any(s.num_trained for s in eval_samples):
        errors.append("eval_samples has no labelled token; pass eval_samples=None to skip the eval loss")
    if prefix_ids and any(s.segment_ids is not None for s in train_samples + list(eval_samples or [])):
        errors.append(
            "packed samples (segment_ids) cannot take input_prefix_ids: packing with prompt tuning is "
            "unsupported; build the data without packing"
        )
    if errors:
        raise TrainConfigError("cannot train: " + "; ".join(errors))


# ---- one step ----------------------------------------------------------------------------------------------------


@dataclass
class StepStats:
    loss: float  # token-weighted mean loss over the step's micro-batches
    trained_tokens: int
    loss_sum: float = 0.0  # summed token loss (several processes add theirs up for the logged loss)


def autocast(precision: str, device_type: str) -> AbstractContextManager:
    """The forward's autocast context: bf16 / fp16 compute with fp32 master weights, or a no-op for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return torch.autocast(device_type, dtype=dtype, enabled=precision != "fp32")


# loss_fn(model, batch) -> (summed loss, labelled tokens): batch holds input_ids and labels [B, T] (+ segment_ids,
# + sample_index [B] when train() is given a loss_fn), already on the model's device; it runs under autocast.
LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]


class StepLoss(nn.Module):
    """The model and its training loss as one module: forward(batch) -> summed loss over the batch's labelled tokens.

    One module because DDP's and FSDP2's hooks run on `__call__`: the whole training forward (head and loss
    included) must go through the wrapped module's forward. `eval_loss=True` gives the token cross-entropy whatever
    `loss_fn` is (the eval loss stays the cross-entropy).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn | None, chunk_size: int):
        super().__init__()
        self.model, self.loss_fn, self.chunk_size = model, loss_fn, chunk_size

    def forward(self, batch: dict[str, torch.Tensor], eval_loss: bool = False) -> torch.Tensor:
        if self.loss_fn is None or eval_loss:
            h = self.model.hidden(batch["input_ids"], segment_ids=batch.get("segment_ids"))  # [B, T, D]
            return chunked_cross_entropy(h, batch["labels"], self.model.lm_head, self.chunk_size)[0]
        return self.loss_fn(self.model, batch)[0]


def accumulate_gradients(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    scaler: torch.amp.GradScaler | None = None,
    loss_fn: LossFn | None = None,
) -> StepStats:
    """Forward and backward every micro-batch of one optimizer step, adding into .grad.

    Each micro-batch backprops loss_sum / (labelled tokens of the WHOLE step), so the accumulated gradient equals
    the gradient of one big batch's token-mean loss exactly, however tokens spread over micro-batches.
    `loss_fn` replaces the default token cross-entropy (e.g. distillation, train/distill.py); it must return a sum
    over the batch's labelled tokens so the normalisation above stays right.
    """
    return accumulate_step(StepLoss(model, loss_fn, cfg.loss_chunk_size), batches, cfg, scaler)


def accumulate_step(
    step_loss: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    scaler: torch.amp.GradScaler | None = None,
    *,
    step_tokens: int | None = None,
    stand_ins: Sequence[bool] = (),
    world_size: int = 1,
) -> StepStats:
    """accumulate_gradients for a StepLoss, possibly wrapped in DDP / FSDP2 (train/distributed.py).

    On several ranks `batches` are this rank's share of the step, `step_tokens` the labelled tokens of the whole
    step over all ranks, and each loss is scaled by world_size / step_tokens because DDP and FSDP2 average the
    gradients over ranks: the average of the ranks' world_size * sum_r / tokens is the one-process gradient.
    A micro-batch marked in `stand_ins` (a rank with no sample of a short micro-batch) runs forward and backward
    times zero: every rank must join every collective, and it adds exactly nothing. Gradients are reduced only
    on the last micro-batch. StepStats.loss is this rank's part (loss_sum over all ranks is the step's sum).
    """
    device = next(step_loss.parameters()).device
    stand_ins = list(stand_ins) or [False] * len(batches)
    local = sum(int((b["labels"] != IGNORE).sum()) for b, fake in zip(batches, stand_ins) if not fake)
    denom = max(local if step_tokens is None else step_tokens, 1)
    loss_sum = torch.zeros((), device=device)
    for i, (b, fake) in enumerate(zip(batches, stand_ins)):
        with gradient_sync(step_loss, enabled=i == len(batches) - 1):
            with autocast(cfg.precision, device.type):
                loss = step_loss({k: v.to(device) for k, v in b.items()})
            # One process keeps its exact historic expression; world_size * loss is exact for powers of two.
            scaled = loss * 0.0 if fake else loss / denom if world_size == 1 else loss * world_size / denom
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if not fake:
            loss_sum += loss.detach()
    return StepStats(loss=loss_sum.item() / denom, trained_tokens=local, loss_sum=loss_sum.item())


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    params: list[nn.Parameter],
    max_grad_norm: float,
) -> float:
    """Unscale (fp16), clip to max_grad_norm (0: measure only), step, advance the schedule; returns the grad norm."""
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:  # measure only: clip_grad_norm_ with an infinite bound would still multiply every gradient by 1
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    # FSDP2's sharded gradients give a DTensor norm: already over all shards (the global norm), made whole here.
    norm = full_tensor(norm)
    if scaler is not None:
        scaler.step(optimizer)  # skips the update if the gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)  # free the gradients before eval or the next step
    return float(norm)


# ---- evaluation --------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, samples: list[Sample], cfg: TrainConfig, pad_id: int = 0) -> float:
    """Token-weighted mean loss over `samples`, in micro-batches of cfg.batch_size, without gradients."""
    device = next(model.parameters()).device
    loss_sum, n = 0.0, 0
    for i in range(0, len(samples), cfg.batch_size):
        b = collate(samples[i : i + cfg.batch_size], pad_id)
        seg = b["segment_ids"].to(device) if "segment_ids" in b else None
        with autocast(cfg.precision, device.type):
            h = model.hidden(b["input_ids"].to(device), segment_ids=seg)
            loss, k = chunked_cross_entropy(h, b["labels"], model.lm_head, cfg.loss_chunk_size)
        loss_sum, n = loss_sum + loss.item(), n + k
    return loss_sum / n if n else float("nan")


@torch.no_grad()
def _evaluate_wrapped(step_loss: nn.Module, samples: list[Sample], cfg: TrainConfig, pad_id: int) -> float:
    """`evaluate` through a DDP / FSDP2-wrapped StepLoss: every rank runs the same batches (FSDP2 gathers each
    block's weights in its forward), so all ranks get the same number."""
    device = next(step_loss.parameters()).device
    loss_sum, n = 0.0, 0
    for i in range(0, len(samples), cfg.batch_size):
        b = collate(samples[i : i + cfg.batch_size], pad_id)
        with autocast(cfg.precision, device.type):
            loss = step_loss({k: v.to(device) for k, v in b.items()}, eval_loss=True)
        loss_sum, n = loss_sum + loss.item(), n + int((b["labels"] != IGNORE).sum())
    return loss_sum / n if n else float("nan")


def _run_eval(
    model: nn.Module,
    samples: list[Sample] | None,
    cfg: TrainConfig,
    pad_id: int,
    eval_fn: Callable[[nn.Module], dict] | None,
    wrapped: nn.Module | None = None,
) -> dict[str, float]:
    """Eval mode, and a forked RNG: evaluating (even sampling in eval_fn) never changes the training run.

    `wrapped` (several processes): the eval loss goes through it on every rank; eval_fn runs on rank 0 only (DDP:
    the model there is whole) and its metrics are sent to the others.
    """
    device = next(model.parameters()).device
    module = wrapped if wrapped is not None else model
    module.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            py_state = random.getstate()
            metrics = {}
            if samples:
                loss = (
                    evaluate(model, samples, cfg, pad_id)
                    if wrapped is None
                    else _evaluate_wrapped(wrapped, samples, cfg, pad_id)
                )
                metrics["eval_loss"] = loss
            if eval_fn is not None and wrapped is None:
                metrics.update(eval_fn(model))
            elif eval_fn is not None:
                metrics.update(broadcast_object(eval_fn(model) if dist_info().is_main else None))
            random.setstate(py_state)
    finally:
        module.train()
    return metrics


# ---- logging -----------------------------------------------------------------------------------------------------


def _note(message: str) -> None:
    print(f"slimlm train: {message}", file=sys.stderr)


# ---- the loop ----------------------------------------------------------------------------------------------------


def train(
    model: nn.Module,
    train_samples: list[Sample],
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    eval_samples: list[Sample] | None = None,
    pad_id: int = 0,
    input_prefix_ids: Sequence[int] = (),
    eval_fn: Callable[[nn.Module], dict] | None = None,
    resume: bool = False,
    progress: bool = True,
    on_step_end: Callable[[int], None] | None = None,
    loss_fn: LossFn | None = None,
) -> TrainResult:
    """Train the model's requires_grad parameters for cfg.total_steps optimizer steps; see the module docstring.

    Writes `out_dir/metrics.jsonl` (and `out_dir/tensorboard/` unless cfg.tensorboard is off) and, every
    cfg.save_every steps, `out_dir/checkpoints/step-N` (not at the end: save the trained weights from the returned
    model). `resume=True` continues from the newest checkpoint.
    `eval_fn(model)` returns extra metrics, evaluated with the eval loss (in eval mode, without gradients).
    `on_step_end(step)` runs after each step's logging, eval and checkpoint. `loss_fn` replaces the training loss
    (not the eval loss, which stays the cross-entropy); its batches also carry `sample_index` [B], each row's index
    in train_samples (e.g. to look up cached teacher outputs).
    In a process group of several ranks (train/distributed.py) every rank calls train with the same arguments;
    only rank 0 writes files. With strategy fsdp the model comes back sharded (FSDP2 DTensors): gather it with
    distributed.full_state_dict (every rank) to save it.
    """
    device = next(model.parameters()).device
    info = dist_info()
    cfg.validate(device.type)
    _check_distributed(cfg, info, eval_fn)
    _check_inputs(trainable_parameters(model), train_samples, eval_samples, input_prefix_ids)
    total = _total_steps(cfg, len(train_samples))
    train_samples = add_prefix(train_samples, input_prefix_ids)
    eval_samples = add_prefix(eval_samples, input_prefix_ids) if eval_samples else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    step_loss = StepLoss(model, loss_fn, cfg.loss_chunk_size)
    wrapped = wrap_model(step_loss, cfg.strategy) if info.distributed else None
    params = trainable_parameters(model)  # after wrapping: FSDP2 replaces them with sharded DTensors
    optimizer, scheduler = make_optimizer(params, cfg, total)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    run = _start(out_dir, cfg, resume, len(train_samples), model, optimizer, scheduler, scaler, info)
    has_eval = bool(eval_samples) or eval_fn is not None
    stream = SampleStream(train_samples, cfg.batch_size, cfg.seed, run.epoch, run.position)
    t_start, elapsed_before = time.perf_counter(), run.elapsed_s
    logged = (run.input_tokens, run.train_time_s)  # at the last log line: throughput is measured since then
    final_loss, eval_metrics, evaluated_at = None, {}, -1
    bar = tqdm(
        total=total, initial=run.step, disable=not progress or not info.is_main, desc="train", dynamic_ncols=True
    )
    with (
        _run_log(out_dir, run.step, cfg.tensorboard, info) as log,  # closed on error too
        _training_mode(model, cfg.gradient_checkpointing),
    ):
        while run.step < total:
            t0 = time.perf_counter()
            picked = stream.next_step(cfg.grad_accum)
            micro = [m for _, m in picked]
            stats = _step(wrapped or step_loss, picked, cfg, scaler, pad_id, loss_fn is not None, info)
            lr = scheduler.get_last_lr()[0]  # the LR this step used
            grad_norm = optimizer_step(optimizer, scheduler, scaler, list(params.values()), cfg.max_grad_norm)
            run.advance(
                stats.trained_tokens, sum(len(s.input_ids) for m in micro for s in m), time.perf_counter() - t0, stream
            )
            run.elapsed_s = elapsed_before + time.perf_counter() - t_start
            final_loss = stats.loss
            if (run.step % cfg.log_every == 0 or run.step == total) and log is not None:
                tok_s = (run.input_tokens - logged[0]) / max(run.train_time_s - logged[1], 1e-9)
                log.write(
                    {
                        "step": run.step,
                        "epoch": stream.epochs_done,
                        "loss": stats.loss,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens": stats.trained_tokens,
                        "tokens_per_s": tok_s,
                        "elapsed_s": run.elapsed_s,
                    }
                )
                bar.set_postfix(epoch=f"{stream.epochs_done:.2f}", loss=f"{stats.loss:.4f}", tok_s=f"{tok_s:.0f}")
                logged = (run.input_tokens, run.train_time_s)
            if has_eval and cfg.eval_every and run.step % cfg.eval_every == 0:
                eval_metrics, evaluated_at = _eval_and_log(
                    model, eval_samples, cfg, pad_id, eval_fn, log, run.step, wrapped
                )
            if cfg.save_every and run.step % cfg.save_every == 0 and run.step < total:
                _save(out_dir, cfg, run, len(train_samples), model, optimizer, scheduler, scaler, info)
            bar.update(1)
            if on_step_end is not None:
                on_step_end(run.step)
        if has_eval and evaluated_at != run.step:
            eval_metrics = _eval_and_log(model, eval_samples, cfg, pad_id, eval_fn, log, run.step, wrapped)[0]
    bar.close()
    return TrainResult(
        steps=run.step,
        final_loss=final_loss,
        eval_metrics=eval_metrics,
        tokens_per_s=run.input_tokens / max(run.train_time_s, 1e-9),
        trained_tokens=run.trained_tokens,
        elapsed_s=elapsed_before + time.perf_counter() - t_start,
        metrics_path=out_dir / "metrics.jsonl",
    )


def _check_distributed(cfg: TrainConfig, info: DistInfo, eval_fn: Callable | None) -> None:
    """Settings several processes cannot run: one TrainConfigError saying what to change."""
    if not info.distributed:
        return
    errors = []
    if cfg.batch_size % info.world_size:
        errors.append(
            f"batch_size ({cfg.batch_size}) is the global micro-batch, split over {info.world_size} "
            f"processes: make it a multiple of {info.world_size} (the global batch is batch_size x "
            "grad_accum whatever the number of processes)"
        )
    if eval_fn is not None and cfg.strategy == "fsdp":
        errors.append(
            "generation during eval (eval_generate, eval_fn) needs the whole model on one rank: use "
            "strategy ddp, or eval_generate 0 (the eval loss works with fsdp)"
        )
    if errors:
        raise TrainConfigError("invalid training config for several processes: " + "; ".join(errors))


def _step(
    step_loss: nn.Module,
    picked: list[tuple[list[int], list[Sample]]],
    cfg: TrainConfig,
    scaler: torch.amp.GradScaler | None,
    pad_id: int,
    with_index: bool,
    info: DistInfo,
) -> StepStats:
    """One optimizer step's forward and backward. Several ranks: each takes its share of every micro-batch (a
    stand-in where it has none), the loss is normalised by the whole step's labelled tokens and summed over ranks."""
    if not info.distributed:
        return accumulate_step(step_loss, _batches(picked, pad_id, with_index), cfg, scaler)
    step_tokens = sum(s.num_trained for _, m in picked for s in m)
    mine, stand_ins = [], []
    for idx, samples in picked:
        share = (rank_share(idx, info.rank, info.world_size), rank_share(samples, info.rank, info.world_size))
        stand_ins.append(not share[1])
        mine.append(share if share[1] else (idx[:1], samples[:1]))  # any real sample; its loss is multiplied by 0
    stats = accumulate_step(
        step_loss,
        _batches(mine, pad_id, with_index),
        cfg,
        scaler,
        step_tokens=step_tokens,
        stand_ins=stand_ins,
        world_size=info.world_size,
    )
    (loss_sum,) = all_reduce_sum([stats.loss_sum])
    return StepStats(loss=loss_sum / max(step_tokens, 1), trained_tokens=step_tokens, loss_sum=loss_sum)


@contextmanager
def _run_log(out_dir: Path, step: int, tensorboard: bool, info: DistInfo) -> Iterator[RunLog | None]:
    """Rank 0's RunLog; None on the other ranks, which log nothing."""
    if not info.is_main:
        yield None
        return
    with RunLog(out_dir, keep_up_to_step=step, tensorboard=tensorboard) as log:
        yield log


def _total_steps(cfg: TrainConfig, n_samples: int) -> int:
    """cfg.total_steps, checked against warmup_steps (which validate() can only check for a fixed max_steps)."""
    total = cfg.total_steps(n_samples)
    if cfg.warmup_steps > total:
        raise TrainConfigError(
            f"invalid training config: warmup_steps ({cfg.warmup_steps}) exceeds the run's "
            f"{total} steps ({cfg.num_epochs} epochs of {cfg.steps_per_epoch(n_samples)}); "
            "lower warmup_steps or raise num_epochs"
        )
    return total


def _batches(
    picked: list[tuple[list[int], list[Sample]]], pad_id: int, with_index: bool
) -> list[dict[str, torch.Tensor]]:
    """Collate each micro-batch; with_index adds sample_index [B] (the default loss needs none, so it gets none)."""
    batches = [collate(m, pad_id) for _, m in picked]
    if with_index:
        for b, (idx, _) in zip(batches, picked):
            b["sample_index"] = torch.tensor(idx, dtype=torch.long)
    return batches


@contextmanager
def _training_mode(model: nn.Module, gradient_checkpointing: bool) -> Iterator[None]:
    """model.train() (dropout on) and the checkpointing switch for the run; the previous settings after it."""
    was_training, was_checkpointing = model.training, model.gradient_checkpointing
    model.train()
    model.gradient_checkpointing = gradient_checkpointing
    try:
        yield
    finally:
        model.train(was_training)
        model.gradient_checkpointing = was_checkpointing


def _eval_and_log(
    model: nn.Module,
    samples: list[Sample] | None,
    cfg: TrainConfig,
    pad_id: int,
    eval_fn: Callable[[nn.Module], dict] | None,
    log: RunLog | None,
    step: int,
    wrapped: nn.Module | None = None,
) -> tuple[dict, int]:
    metrics = _run_eval(model, samples, cfg, pad_id, eval_fn, wrapped)
    if log is not None:
        log.write({"step": step, **metrics}, section="eval")
    return metrics, step


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))  # as state.json holds it (tuples become lists)


def _save(
    out_dir: Path,
    cfg: TrainConfig,
    run: RunState,
    n_samples: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    info: DistInfo = SINGLE_PROCESS,
) -> None:
    """Every rank gathers (FSDP2 shards, RNG states); rank 0 writes the folder atomically and rotates."""
    state = {"run": dataclasses.asdict(run), "n_samples": n_samples, "config": _config_dict(cfg)}
    if info.distributed:
        state["world_size"] = info.world_size
    save_checkpoint(checkpoint_folder(out_dir, run.step), model, optimizer, scheduler, scaler, state)
    if info.is_main:
        rotate_checkpoints(out_dir, cfg.keep_checkpoints)  # only now: the new checkpoint is complete


def _start(
    out_dir: Path,
    cfg: TrainConfig,
    resume: bool,
    n_samples: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    info: DistInfo = SINGLE_PROCESS,
) -> RunState:
    """A fresh RunState (global RNGs seeded; rank r with seed + r, so ranks draw different dropout masks), or the
    one of the newest checkpoint with all state restored (each rank its own RNG states)."""
    found = list_checkpoints(out_dir)
    if found and not resume:
        raise ResumeError(
            f"{out_dir} holds checkpoints of an earlier run (newest: {found[-1][1].name}); pass "
            f"resume=True to continue it, or train into a new out_dir (or delete {out_dir}/checkpoints)"
        )
    if resume and info.is_main:
        for folder in remove_partial_checkpoints(out_dir):
            _note(f"removed {folder.name}, a checkpoint whose writing was interrupted")
    if not found:
        if resume and info.is_main:
            _note(f"no checkpoint in {out_dir / 'checkpoints'}; starting a fresh run")
        torch.manual_seed(cfg.seed + info.rank)
        random.seed(cfg.seed + info.rank)
        return RunState()
    step, folder = found[-1]
    _check_world_size(folder, info.world_size)
    state = load_checkpoint(folder, model, optimizer, scheduler, scaler)
    if info.is_main:  # the same on every rank: said once
        _warn_if_changed(state, cfg, n_samples, folder)
        _note(f"resumed from {folder} (step {step})")
    return RunState(**state["run"])


def _check_world_size(folder: Path, world_size: int) -> None:
    """A checkpoint resumes exactly only with the number of processes that wrote it (each had its RNG states)."""
    saved = json.loads((folder / "state.json").read_text()).get("world_size", 1)
    if saved != world_size:
        launch = (
            "one process (no torchrun, no --nproc)"
            if saved == 1
            else f"--nproc {saved} (torchrun --nproc-per-node/--nnodes giving {saved} processes in all)"
        )
        raise ResumeError(
            f"{folder} was written by a run of {saved} process(es); this run has {world_size}. "
            f"Resume it with {launch}, or train into a new --out"
        )


def _warn_if_changed(state: dict[str, Any], cfg: TrainConfig, n_samples: int, folder: Path) -> None:
    old, new = state["config"], _config_dict(cfg)
    defaults = _config_dict(TrainConfig())  # a field the checkpoint predates had its default value
    changed = [
        f"{k}: {old.get(k, defaults[k])!r} -> {v!r}"
        for k, v in new.items()
        if k not in _BOOKKEEPING and old.get(k, defaults[k]) != v
    ]
    if state["n_samples"] != n_samples:
        changed.append(f"number of train samples: {state['n_samples']} -> {n_samples}")
    if changed:
        warnings.warn(
            f"resuming {folder} with changed settings ({'; '.join(changed)}); the run will not match an "
            "uninterrupted one",
            stacklevel=3,
        )
