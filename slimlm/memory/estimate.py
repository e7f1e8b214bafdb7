"""The estimate: `estimate_memory(config, query)` -> MemoryEstimate, rows of bytes grouped by phase, and the peak.

The terms that are not weights (slimlm.memory.plan) or saved activations (slimlm.memory.activations) live here:
the chunked cross-entropy's buffers, optimizer states and temporaries, the prefill working set and the KV cache.
Then the rows are assembled and the peak is persistent rows + the larger phase (see the package docstring). This
module formats numbers for the rows' details; printing the table is slimlm.memory.cli.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from slimlm.config import ModelConfig
from slimlm.memory.activations import activations, autocast_copies
from slimlm.memory.distributed import (
    ddp_bucket_bytes,
    fsdp_backward_end,
    fsdp_block_moment,
    fsdp_groups,
    shard,
    sharded_weight_bytes,
)
from slimlm.memory.plan import (
    Plan,
    Precision,
    added_params,
    all_projections,
    make_plan,
    projection_shapes,
    trainable_params,
)
from slimlm.memory.query import DTYPE_BYTES, LINEARS, MemoryQuery

# RSS of a process that imported torch and slimlm and built a model (building on the meta device imports
# torch._dynamo): 310-340 MiB, the baseline bench_memory.py measures; `import torch, slimlm` alone is ~240 MiB.
CPU_RUNTIME_BYTES = 320 * 2**20
GiB = 2**30


@dataclass
class MemoryRow:
    """One component of the estimate: its bytes and the phase of the step that holds them."""

    name: str
    bytes: int
    phase: str  # "persistent", "forward/backward", "optimizer step" or "prefill"
    detail: str = ""


@dataclass
class MemoryEstimate:
    """Rows of bytes and the peak: persistent rows + the largest phase (see slimlm.memory's docstring)."""

    rows: list[MemoryRow]
    total: int  # peak bytes
    peak_phase: str
    params: int  # all parameters of the model (NF4 weights by their logical count)
    trainable: int
    notes: list[str] = field(default_factory=list)
    activations_per_layer: int = 0  # bytes one block keeps for backward (the largest block), at this batch
    activations_checkpointed: int = 0  # with gradient checkpointing: block inputs + one recomputed block
    activations_full: int = 0  # without checkpointing: everything every block keeps

    def row(self, name: str) -> int:
        """Bytes of the row called `name` (0 when there is none)."""
        return sum(r.bytes for r in self.rows if r.name == name)

    def phase_total(self, phase: str) -> int:
        return sum(r.bytes for r in self.rows if r.phase == phase)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_bytes": self.total,
            "peak_phase": self.peak_phase,
            "params": self.params,
            "trainable": self.trainable,
            "rows": [vars(r) for r in self.rows],
            "notes": self.notes,
            "activations_per_layer_bytes": self.activations_per_layer,
            "activations_bytes": {
                "without_checkpointing": self.activations_full,
                "with_checkpointing": self.activations_checkpointed,
            },
        }


# ---- the loss ----------------------------------------------------------------------------------------------------


def loss_buffers(config: ModelConfig, q: MemoryQuery, plan: Plan, p: Precision) -> tuple[int, int]:
    """The fused chunked cross-entropy of train/loss.py: its bytes at the last chunk of the forward and at the
    start of the backward.

    hidden [B*T, D] stays referenced by the trainer through backward; the loss copies the labelled rows (N; here
    every token) and keeps d(loss)/d(hidden) [N, D] and, when the head trains, d(loss)/d(W) [V, D] in fp32. The
    backward then scales both gradients into new tensors.
    """
    n_tok, d, v = q.batch * q.seq, config.dim, config.vocab_size
    first = min(q.loss_chunk_size, n_tok)
    later = min(q.loss_chunk_size, n_tok - first)  # the second chunk (0 when one chunk holds every row)
    hidden = n_tok * d * p.s
    grads = n_tok * d * p.s + plan.base_trains * v * d * 4
    chunks = max(_chunk(config, plan, p, first, 0), _chunk(config, plan, p, later, first) if later else 0)
    forward = hidden + n_tok * d * p.s + grads + chunks
    backward = hidden + 2 * grads + plan.base_trains * v * d * (p.w < 4) * p.w
    return forward, backward


def _chunk(config: ModelConfig, plan: Plan, p: Precision, n: int, previous: int) -> int:
    """Peak bytes of one loss chunk of n rows: logits [n, V] and their fp32 log-softmax (8 B per logit at once);
    then a low-precision copy of the softmax for the two matmuls (and autocast's bf16 W), and a trained head's
    [V, D] product. The previous chunk's fp32 softmax (and its copy) is still referenced by `logp`/`g` until the
    new log-softmax replaces it."""
    d, v = config.dim, config.vocab_size
    low = p.c < 4
    later = 4 * n * v + low * 2 * n * v + p.autocast * 2 * v * d + plan.base_trains * v * d * (4 + 2 * low)
    return (4 + 2 * (p.w < 4)) * previous * v + max(8 * n * v, later)


# ---- optimizer ---------------------------------------------------------------------------------------------------


def optimizer_state_bytes(optimizer: str, trainable: int, w: int) -> int:
    """AdamW: exp_avg + exp_avg_sq in the parameter dtype (8 B/param in fp32); bitsandbytes 8-bit AdamW: 2 B/param
    (its per-block scales are < 0.05 B/param); SGD: nothing, or a momentum buffer."""
    per = {"adamw": 2 * w, "adamw8bit": 2, "sgd": 0, "sgd-momentum": w}[optimizer]
    return trainable * per


def optimizer_temporaries(config: ModelConfig, q: MemoryQuery, plan: Plan, trainable: int, w: int) -> int:
    """AdamW's step allocates sqrt(v)/bias_correction: on CPU (the single-tensor path) two temporaries the size of
    one parameter at a time, the largest being the embedding under full training; on CUDA the foreach path makes
    one for every parameter at once."""
    if q.optimizer != "adamw":
        return 0
    if q.device == "cuda":
        return trainable * w
    largest = config.vocab_size * config.dim if plan.base_trains else _largest_added(config, plan)
    return 2 * largest * w


def _largest_added(config: ModelConfig, plan: Plan) -> int:
    if plan.prefix:
        return plan.prefix * config.n_layers * 2 * config.n_kv_heads * config.head_dim
    if plan.prompt:
        return plan.prompt * config.dim
    shapes = all_projections(config)
    sizes = [plan.rank * max(a, b) for a, b in shapes] + [config.dim * plan.bottleneck] * bool(plan.adapters)
    return max(sizes + [max(b for _, b in shapes) if plan.biases else 0])


# ---- inference ---------------------------------------------------------------------------------------------------


def prefill_working_set(config: ModelConfig, q: MemoryQuery, plan: Plan, p: Precision) -> int:
    """Temporaries of a no-grad prefill: the residual x and the new x, plus the largest of one block's steps:
    RMSNorm's fp32 intermediates [2 x D fp32], RoPE on q (q, q*cos, rotated, rotated*sin) + k, v and the normed
    input, or the MLP's normed input + gate, up (MLP.forward computes both first), silu(gate), the product."""
    tokens, d = q.batch * q.seq, config.dim
    steps = []
    for i in range(config.n_layers):
        s = projection_shapes(config, i)
        qd, kv, ff = s["q_proj"][1], s["k_proj"][1], s["gate_proj"][1]
        steps += [8 * d, p.s * (d + 4 * qd + 2 * kv), p.s * (d + 4 * ff)]
    rope = 2 * config.head_dim * (4 + p.s)  # cos/sin made in fp32, kept in the model dtype
    largest = max(a * b for a, b in all_projections(config))
    # NF4 dequantizes each weight for its matmul: uint8 codes, their int64 copy, levels and scaled values.
    dequant = plan.nf4 * largest * (1 + 8 + 2 * p.c)
    return max(tokens * (2 * d * p.s + max(steps) + rope), dequant)


def kv_cache_bytes(config: ModelConfig, q: MemoryQuery, p: Precision) -> int:
    """KVCache: k and v [B, Hkv, S, hd] per layer, in the model dtype (config.kv_cache_bytes_per_token)."""
    return q.batch * (q.kv_cache_tokens or q.seq) * config.kv_cache_bytes_per_token(p.s)


# ---- the estimate ------------------------------------------------------------------------------------------------


def estimate_memory(config: ModelConfig, query: MemoryQuery) -> MemoryEstimate:
    """Peak memory of one training step or one generation with `query`'s settings; see the module docstring.
    With world_size > 1 every number is one rank's (slimlm.memory.distributed)."""
    query.validate()
    plan, p = make_plan(query), Precision.of(query)
    trainable = trainable_params(config, plan) if query.training else 0
    added = added_params(config, plan)
    added_w = 4 if plan.nf4 else p.w  # LoRA on NF4 takes the dtype of NF4Linear.dequantize(): fp32
    total_params = config.num_params() + added
    n = query.world_size if query.strategy == "fsdp" else 1  # ranks each parameter is split over
    weights = sharded_weight_bytes(config, plan, p.w, n)
    rows = [MemoryRow("weights", weights, "persistent", _weights_detail(config, plan, query))]
    if query.training or query.method not in (None, "full"):
        rows.append(
            MemoryRow(
                "trainable params",
                shard(added * added_w, n),
                "persistent",
                _trainable_detail(config, plan, query, trainable, total_params),
            )
        )
    rows += (
        _training_rows(config, query, plan, p, trainable) if query.training else _inference_rows(config, query, plan, p)
    )
    return _assemble(config, query, plan, p, rows, total_params, trainable)


def _training_rows(
    config: ModelConfig, query: MemoryQuery, plan: Plan, p: Precision, trainable: int
) -> list[MemoryRow]:
    q = query.per_rank()  # activations and the loss: one rank's batch / world_size sequences
    kept, block = activations(config, q, plan, p, q.grad_checkpointing)
    loss_fwd, loss_bwd = loss_buffers(config, q, plan, p)
    # Two moments compete for the forward/backward peak: the last loss chunk (every activation kept) and the start
    # of the backward (the loss gradients, and with checkpointing the first block recomputed).
    recompute = block if q.grad_checkpointing else 0
    at_backward = recompute + loss_bwd > loss_fwd
    grad_w = 4 if plan.nf4 else p.w
    ranks = query.world_size if query.strategy == "fsdp" else 1  # FSDP2 shards gradients and optimizer states
    n, v = min(q.loss_chunk_size, q.batch * q.seq), config.vocab_size
    rows = [
        MemoryRow(
            "optimizer states",
            shard(optimizer_state_bytes(q.optimizer, trainable, grad_w), ranks),
            "persistent",
            _optimizer_detail(q, grad_w) + (f", 1/{ranks} per rank" if ranks > 1 else ""),
        ),
        MemoryRow("fp32 master copies", 0, "persistent", _master_detail(q, p)),
        MemoryRow(
            "activations",
            kept + (recompute if at_backward else 0),
            "forward/backward",
            _activations_detail(config, q, plan, p, block),
        ),
        MemoryRow(
            "autocast weight copies",
            autocast_copies(config, q, plan, p, q.grad_checkpointing),
            "forward/backward",
            "bf16 casts kept for backward" if p.autocast else "no autocast",
        ),
        MemoryRow(
            "logits and loss",
            loss_bwd if at_backward else loss_fwd,
            "forward/backward",
            f"fused chunked cross-entropy: logits {n:,} x {v:,} at a time"
            + (", head gradient [V, D] fp32" if plan.base_trains else ""),
        ),
        MemoryRow(
            "gradients",
            shard(trainable * grad_w, ranks),
            "optimizer step",
            f"{trainable:,} x {grad_w} B" + (f" / {ranks} ranks" if ranks > 1 else ""),
        ),
        MemoryRow(
            "optimizer step temporaries",
            shard(optimizer_temporaries(config, q, plan, trainable, grad_w), ranks),
            "optimizer step",
            "AdamW's sqrt(v) "
            + ("for all parameters (foreach)" if q.device == "cuda" else "for the largest parameter, twice")
            + (" (its shard)" * (ranks > 1)),
        ),
    ]
    if query.strategy == "ddp":
        rows.insert(
            2,
            MemoryRow(
                "DDP gradient buckets",
                ddp_bucket_bytes(trainable, grad_w),
                "persistent",
                "a flat copy of every trainable gradient, in 25 MiB buckets, kept for the run "
                "(gradient_as_bucket_view=False); all-reduced in place",
            ),
        )
    return _with_fsdp_rows(config, query, plan, p, trainable, rows) if query.strategy == "fsdp" else rows


def _with_fsdp_rows(
    config: ModelConfig, q: MemoryQuery, plan: Plan, p: Precision, trainable: int, rows: list[MemoryRow]
) -> list[MemoryRow]:
    """`rows` + FSDP2's gathered parameters and its end-of-backward phase (slimlm.memory.distributed). The
    forward/backward rows become the first block's backward when that moment holds more than the loss's."""
    groups = fsdp_groups(config, plan, trainable)
    grad_w = 4 if plan.nf4 else p.w
    root, block = groups.root * p.w, groups.block * p.w
    at_loss = sum(r.bytes for r in rows if r.phase == "forward/backward") + root + block
    moment = fsdp_block_moment(config, q, plan, p, groups)
    copies = next(r.bytes for r in rows if r.name == "autocast weight copies")
    if sum(moment.values()) + copies > at_loss:
        changed = {"activations": moment["activations"], "logits and loss": moment["loss"]}
        rows = [
            replace(
                r,
                bytes=changed[r.name],
                detail=r.detail + "; at the first block's backward: "
                "d(hidden) [tokens, D] twice" * (r.name == "logits and loss"),
            )
            if r.name in changed
            else r
            for r in rows
        ]
        gathered = MemoryRow(
            "FSDP gathered parameters",
            moment["gathered"],
            "forward/backward",
            f"at the first block's backward: root {_fmt(root)} + 3 blocks of {_fmt(block)} (in "
            "backward, prefetched, all-gather buffer) + the previous block's reduce-scatter input"
            + " + the root's unsharded gradient"
            * bool(groups.root_trainable),
        )
    else:
        head = "" if config.tie_word_embeddings else ", head"
        gathered = MemoryRow(
            "FSDP gathered parameters",
            root + block,
            "forward/backward",
            f"root (embedding, final norm{head}) {_fmt(root)}, held from its forward to the end of "
            f"backward, + the last block's all-gather buffer {_fmt(block)}, kept to the root's "
            "forward end (the loss)",
        )
    sharded_grads, root_end = fsdp_backward_end(groups, p, grad_w, q.world_size)
    return rows + [
        gathered,
        MemoryRow(
            "sharded block gradients",
            sharded_grads,
            "backward end",
            f"{groups.block_trainable:,} x {grad_w} B / {q.world_size} ranks (reduce-scattered), + the first "
            f"block's reduce-scatter input {_fmt(groups.block_grad * grad_w)}",
        ),
        MemoryRow(
            "FSDP root at backward end",
            root_end,
            "backward end",
            "gathered root"
            + (
                " + its unsharded gradient twice (the embedding's backward adds a new [V, D] gradient into the head's)"
                if groups.root_trainable
                else ""
            ),
        ),
    ]


def _activations_detail(config: ModelConfig, q: MemoryQuery, plan: Plan, p: Precision, block: int) -> str:
    full, _ = activations(config, q, plan, p, False)
    ckpt, _ = activations(config, q, plan, p, True)
    return (
        f"{config.n_layers} blocks, largest {_fmt(block)}; without checkpointing {_fmt(full)}, with "
        f"{_fmt(ckpt)} + one recomputed block"
    )


def _inference_rows(config: ModelConfig, q: MemoryQuery, plan: Plan, p: Precision) -> list[MemoryRow]:
    slots = q.kv_cache_tokens or q.seq
    return [
        MemoryRow(
            "KV cache",
            kv_cache_bytes(config, q, p),
            "persistent",
            f"{q.batch} x {slots:,} slots x {config.kv_cache_bytes_per_token(p.s):,} B/token",
        ),
        MemoryRow(
            "activations",
            prefill_working_set(config, q, plan, p),
            "prefill",
            f"no-grad prefill of {q.batch} x {q.seq} tokens: one block's temporaries at a time",
        ),
        MemoryRow(
            "logits",
            q.batch * config.vocab_size * (p.s + 4),
            "prefill",
            "last position only [B, V], and its fp32 copy for sampling",
        ),
    ]


def _assemble(
    config: ModelConfig, q: MemoryQuery, plan: Plan, p: Precision, rows: list[MemoryRow], params: int, trainable: int
) -> MemoryEstimate:
    phases = {r.phase for r in rows if r.phase != "persistent"}
    sums = {ph: sum(r.bytes for r in rows if r.phase == ph) for ph in phases}
    peak_phase = max(sums, key=sums.get) if sums else "persistent"
    total = sum(r.bytes for r in rows if r.phase == "persistent") + sums.get(peak_phase, 0)
    est = MemoryEstimate(
        rows=rows, total=total, peak_phase=peak_phase, params=params, trainable=trainable, notes=_notes(config, q)
    )
    if q.training:
        local = q.per_rank()
        est.activations_full, est.activations_per_layer = activations(config, local, plan, p, False)
        kept, block = activations(config, local, plan, p, True)
        est.activations_checkpointed = kept + block
    return est


def _notes(config: ModelConfig, q: MemoryQuery) -> list[str]:
    if q.device == "cpu":
        notes = [
            (
                f"not included: the Python process (torch, slimlm) itself, about {_fmt(CPU_RUNTIME_BYTES)} of RSS, "
                "plus ~85 MiB once a tokenizer is loaded"
            )
        ]
        if q.training:
            notes.append(
                "RSS follows this total when freed tensors go back to the OS (MALLOC_MMAP_THRESHOLD_=131072)"
                "; with glibc's default, memory freed during the step stays resident: RSS measured 15-50 % "
                "of the step's non-persistent bytes above it on SmolLM2-135M (bench/bench_memory.py)"
            )
    else:
        notes = [
            (
                "not included: the CUDA context (0.3-0.6 GiB, outside max_memory_allocated) and cuBLAS workspaces "
                "(~8 MiB); the caching allocator may reserve more than it allocates (torch.cuda.memory_reserved). "
                "CUDA totals are not yet checked against a GPU"
            )
        ]
    if q.distributed:
        notes.insert(
            0,
            f"per rank: one of {q.world_size} processes ({q.strategy}), each running "
            f"{q.batch // q.world_size} of the micro-batch's {q.batch} sequences; the job needs "
            f"{q.world_size} x this total, plus {q.world_size} x the runtime",
        )
    if max(q.seq, q.kv_cache_tokens or 0) > config.max_seq_len:
        notes.append(f"longer than the model's context of {config.max_seq_len:,} tokens")
    if q.optimizer == "adamw8bit":
        notes.append("adamw8bit is bitsandbytes' optimizer; slimlm's trainer uses torch AdamW")
    return notes


def _weights_detail(config: ModelConfig, plan: Plan, q: MemoryQuery) -> str:
    n = config.num_params()
    if plan.nf4:
        detail = f"{n / 1e6:,.1f} M params: block projections NF4 (~4.13 bits), the rest {q.weights_dtype}"
    else:
        detail = f"{n / 1e6:,.1f} M params x {DTYPE_BYTES[q.weights_dtype]} B ({q.weights_dtype})"
    if q.strategy == "fsdp":
        return (
            detail
            + f"; FSDP2 keeps 1/{q.world_size} of each parameter per rank"
            + (" (NF4 codes are buffers: whole on every rank)" if plan.nf4 else "")
        )
    return detail + ("; whole on every rank (DDP)" if q.strategy == "ddp" else "")


def _trainable_detail(config: ModelConfig, plan: Plan, q: MemoryQuery, trainable: int, total: int) -> str:
    if plan.base_trains:
        return f"{trainable / 1e6:,.1f} M: every weight (counted in weights)"
    targets = "all-linear" if set(q.lora_targets) == set(LINEARS) else ",".join(q.lora_targets)
    what = {
        "lora": f"LoRA r={q.lora_rank} on {targets}",
        "qlora": f"LoRA r={q.lora_rank} on {targets}",
        "adapter": f"{q.adapter_style} adapters, bottleneck {q.adapter_bottleneck}",
        "bitfit": "biases" + (" + norm gains" if q.bitfit_train_norms else ""),
        "prefix": f"{q.num_virtual_tokens} key/value slots per layer",
        "prompt": f"{q.num_virtual_tokens} soft-prompt tokens",
    }.get(q.method, "")
    share = f" = {100 * trainable / max(total, 1):.2f} % of {total / 1e6:,.1f} M" if q.training else ""
    return f"{what}: {trainable:,} trainable{share}"


def _optimizer_detail(q: MemoryQuery, w: int) -> str:
    return {
        "adamw": f"exp_avg + exp_avg_sq, {2 * w} B/param",
        "adamw8bit": "two 8-bit states, 2 B/param",
        "sgd": "none",
        "sgd-momentum": f"momentum buffer, {w} B/param",
    }[q.optimizer]


def _master_detail(q: MemoryQuery, p: Precision) -> str:
    if p.autocast:
        return f"none extra: the fp32 weights are the master copy, autocast computes in {q.dtype} from them"
    if p.w < 4:
        return f"none: pure {q.weights_dtype} training (weights, gradients and AdamW states in {q.weights_dtype})"
    return "none: fp32 training"


def _fmt(n: float) -> str:
    """Bytes for humans: KiB / MiB / GiB with 3 significant digits."""
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:,.3g} {unit}" if n / size < 1000 else f"{n / size:,.0f} {unit}"
    return f"{int(n)} B"
