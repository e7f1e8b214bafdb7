"""Activations: the bytes a training forward keeps for backward, block by block, as slimlm.model's code keeps them.

`activations` walks the blocks from the embedding, tracking which tensors need a gradient under the query's PEFT
method (a frozen prefix of the network keeps nothing), and counts per token what each op saves: RMSNorm, the
projections' inputs, SDPA, the MLP's factors, adapters. `autocast_copies` counts the bf16 weight casts autocast
keeps. The loss, the optimizer and inference are not here (slimlm.memory.estimate).
"""

from __future__ import annotations

from dataclasses import dataclass

from slimlm.config import ModelConfig
from slimlm.memory.plan import Plan, Precision, projection_shapes
from slimlm.memory.query import ATTENTION, MLP, MemoryQuery


def _norm_saved(dim: int, grad_in: bool, gain_trains: bool, p: Precision) -> int:
    """RMSNorm (model.py) per token: pow keeps x in fp32 [D] and rsqrt its result [1] when x needs a gradient;
    `weight * x_normed` keeps x_normed [D] (stream dtype) only when the gain trains."""
    return (4 * dim + 4 if grad_in else 0) + (p.s * dim if gain_trains else 0)


def _inputs_saved(width: int, names: tuple[str, ...], plan: Plan, p: Precision, x_bytes: int, cast: bool) -> int:
    """Projections reading one input [width] keep it when their weight or LoRA A trains. Without autocast they
    share one tensor; under autocast each projection casts an fp32 input itself and keeps its own bf16 copy."""
    keep = [n for n in names if plan.needs_input(n)]
    if not keep:
        return 0
    return len(keep) * p.c * width if cast else x_bytes * width


@dataclass
class Saved:
    """What one block keeps for backward: bytes per token, and bf16 weight copies (autocast only, bytes)."""

    per_token: float = 0.0
    frozen_copies: int = 0  # casts of frozen weights: made for each matmul, kept for the input's gradient
    trained_copies: int = 0  # casts of trainable weights: autocast caches them until the forward ends

    def projection_copies(self, name: str, shapes: dict, plan: Plan, p: Precision, grad_x: bool) -> None:
        """A matmul keeps its (cast) weight when its input needs a gradient. LoRA's A is an nn.Linear (kept the
        same way); its B is cast explicitly in LoRAAdapter.add_to and kept whenever A trains. NF4 weights
        dequantize inside their own autograd function and keep nothing."""
        if not p.autocast:
            return
        n_in, n_out = shapes[name]
        if grad_x and not plan.nf4:
            if plan.base_trains:
                self.trained_copies += 2 * n_in * n_out
            else:
                self.frozen_copies += 2 * n_in * n_out
        if name in plan.lora:
            self.trained_copies += 2 * plan.rank * (n_out + n_in * grad_x)

    def adapter(self, dim: int, plan: Plan, p: Precision, grad_y: bool) -> None:
        """Bottleneck adapter on y [D]: down keeps y, the activation its input, up its output [bottleneck]."""
        self.per_token += p.c * (dim + 2 * plan.bottleneck)
        if p.autocast:
            self.trained_copies += 2 * dim * plan.bottleneck * (1 + grad_y)


def _attention_saved(
    s: Saved, shapes: dict, heads: int, plan: Plan, p: Precision, grad_in: bool, seq: int, batch: int
) -> bool:
    """Per token: q/k/v inputs, LoRA A outputs [r], SDPA's q, k, v, out [heads*hd] and logsumexp [heads] (fp32),
    and a prefix's extra key/value slots and float mask. Returns whether the attention output needs a gradient."""
    d, q, kv = shapes["o_proj"][1], shapes["q_proj"][1], shapes["k_proj"][1]
    s.per_token += _inputs_saved(d, ("q_proj", "k_proj", "v_proj"), plan, p, p.s, cast=p.autocast)
    s.per_token += p.c * plan.rank * sum(1 for n in ATTENTION if n in plan.lora)
    for name in ("q_proj", "k_proj", "v_proj"):
        s.projection_copies(name, shapes, plan, p, grad_in)
    sdpa = grad_in or plan.prefix > 0 or any(plan.trains(n) for n in ("q_proj", "k_proj", "v_proj"))
    if sdpa:
        kv_slots = (seq + plan.prefix) / seq  # prefix tuning puts P learned slots in front of the keys/values
        s.per_token += p.c * (2 * q + 2 * kv * kv_slots) + 4 * heads
        if plan.prefix:
            s.per_token += p.c * (seq + plan.prefix) / batch  # the [1, 1, T, P+T] mask, as a float, per layer
    elif plan.needs_input("o_proj"):
        s.per_token += p.c * q  # o_proj's input (otherwise it is SDPA's kept output)
    s.projection_copies("o_proj", shapes, plan, p, sdpa)
    out_grad = sdpa or plan.trains("o_proj")
    if "o_proj" in plan.adapters:
        s.adapter(d, plan, p, out_grad)
        out_grad = True
    return out_grad


def _mlp_saved(s: Saved, shapes: dict, plan: Plan, p: Precision, grad_in: bool) -> bool:
    """Per token of down(silu(gate(x)) * up(x)): inputs, silu's input, the product's two factors, down's input."""
    d, ff = shapes["gate_proj"]
    s.per_token += _inputs_saved(d, ("gate_proj", "up_proj"), plan, p, p.s, cast=p.autocast)
    s.per_token += p.c * plan.rank * sum(1 for n in MLP if n in plan.lora)
    gate_grad, up_grad = grad_in or plan.trains("gate_proj"), grad_in or plan.trains("up_proj")
    s.per_token += p.c * ff * (2 * gate_grad + up_grad)  # silu keeps gate(x); the product keeps both factors
    if plan.needs_input("down_proj"):
        s.per_token += p.c * ff  # the product, down's input
    for name in ("gate_proj", "up_proj"):
        s.projection_copies(name, shapes, plan, p, grad_in)
    s.projection_copies("down_proj", shapes, plan, p, gate_grad or up_grad)
    out_grad = gate_grad or up_grad or plan.trains("down_proj")
    if "down_proj" in plan.adapters:
        s.adapter(d, plan, p, out_grad)
        out_grad = True
    return out_grad


def block_saved(
    config: ModelConfig, i: int, plan: Plan, p: Precision, grad_in: bool, seq: int, batch: int
) -> tuple[Saved, bool]:
    """What block i keeps for backward, and whether its output needs a gradient.

    The block is x + attn(norm(x)), then x + mlp(norm(x)): residual adds keep nothing, RoPE keeps cos/sin (shared
    by all blocks, counted once in `activations`).
    """
    shapes, heads, s = projection_shapes(config, i), config.layer_size(i)["n_heads"], Saved()
    s.per_token += _norm_saved(config.dim, grad_in, plan.norms_train, p)
    normed_grad = grad_in or plan.norms_train  # a trained gain makes the norm's output need a gradient
    grad_mid = _attention_saved(s, shapes, heads, plan, p, normed_grad, seq, batch) or grad_in
    s.per_token += _norm_saved(config.dim, grad_mid, plan.norms_train, p)
    return s, _mlp_saved(s, shapes, plan, p, grad_mid or plan.norms_train) or grad_mid


def _blocks(config: ModelConfig, q: MemoryQuery, plan: Plan, p: Precision) -> tuple[list[Saved], bool]:
    """Every block's Saved, walking the gradient requirement from the embedding; and the final norm's input flag."""
    grad = plan.base_trains or plan.prompt > 0  # does the embedding output need a gradient?
    blocks = []
    for i in range(config.n_layers):
        saved, grad = block_saved(config, i, plan, p, grad, q.seq, q.batch)
        blocks.append(saved)
    return blocks, grad


def activations(config: ModelConfig, q: MemoryQuery, plan: Plan, p: Precision, checkpointing: bool) -> tuple[int, int]:
    """(bytes the forward keeps for backward, bytes of the largest block), for the whole micro-batch.

    With gradient checkpointing each block keeps only its input x [D] (torch.utils.checkpoint holds it); the
    backward then recomputes one block at a time, so the largest block's activations come back during backward.
    """
    tokens = q.batch * q.seq
    blocks, grad = _blocks(config, q, plan, p)
    per_block = [b.per_token for b in blocks]
    rope = any(per_block)  # cos/sin [T, hd] each, kept by RoPE's multiplications once any q or k needs a gradient
    fixed = 2 * config.head_dim * p.s * rope + _norm_saved(config.dim, grad, plan.norms_train, p)
    fixed += 8 * plan.base_trains + 9 * (plan.prompt > 0)  # embedding indices (int64); prompt's where-mask (bool)
    kept = config.n_layers * config.dim * p.s if checkpointing else sum(per_block)
    return int((kept + fixed) * tokens), int(max(per_block) * tokens)


def autocast_copies(config: ModelConfig, q: MemoryQuery, plan: Plan, p: Precision, checkpointing: bool) -> int:
    """bf16 weight copies that autocast makes and the matmuls keep for backward (mixed precision only; see Saved).
    With checkpointing, frozen weights' copies live for one recomputed block at a time."""
    blocks, _ = _blocks(config, q, plan, p)
    frozen = [b.frozen_copies for b in blocks]
    return sum(b.trained_copies for b in blocks) + (max(frozen) if checkpointing else sum(frozen))
