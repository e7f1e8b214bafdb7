"""What a MemoryQuery sets up in the model: which tensors train (Plan), their sizes, and element sizes (Precision).

Parameter counts follow slimlm/peft (what `peft.trainable_summary` reports), weight bytes follow the dense and
NF4 storage of slimlm/quantize. This module counts tensors that exist for the whole run; what a step adds on top
(activations, loss buffers, optimizer states) is slimlm.memory.activations and slimlm.memory.estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimlm.config import ModelConfig
from slimlm.memory.query import ADAPTER_STYLES, DTYPE_BYTES, LINEARS, MLP, MemoryQuery

NF4_BLOCK, NF4_GROUP = 64, 256  # quantize/nf4.py: BLOCK_SIZE, SCALE_GROUP (tests check they agree)


# ---- what trains -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Which tensors of the model train or are added, as the query's PEFT method sets them up (slimlm/peft)."""

    base_trains: bool = False  # full: every weight
    norms_train: bool = False  # full; bitfit with train_norms
    lora: tuple[str, ...] = ()  # projections with LoRA (lora, qlora)
    rank: int = 0
    biases: tuple[str, ...] = ()  # bitfit: projections with a trainable bias
    adapters: tuple[str, ...] = ()  # projections whose output passes a bottleneck adapter
    bottleneck: int = 0
    prefix: int = 0  # prefix tuning: key/value slots per layer
    prompt: int = 0  # prompt tuning: soft-prompt tokens
    nf4: bool = False  # frozen NF4 base (qlora)

    def trains(self, name: str) -> bool:
        """Does the output of projection `name` depend on a trainable tensor?"""
        return self.base_trains or name in self.lora or name in self.biases

    def needs_input(self, name: str) -> bool:
        """Does projection `name` keep its input for backward (its weight or its LoRA A trains)?"""
        return self.base_trains or name in self.lora


def make_plan(q: MemoryQuery) -> Plan:
    m = q.method
    if m == "full":
        return Plan(base_trains=True, norms_train=True)
    if m in ("lora", "qlora"):
        return Plan(lora=tuple(q.lora_targets), rank=q.lora_rank, nf4=m == "qlora")
    if m == "adapter":
        return Plan(adapters=ADAPTER_STYLES[q.adapter_style], bottleneck=q.adapter_bottleneck)
    if m == "bitfit":
        return Plan(biases=LINEARS, norms_train=q.bitfit_train_norms)
    if m == "prefix":
        return Plan(prefix=q.num_virtual_tokens)
    if m == "prompt":
        return Plan(prompt=q.num_virtual_tokens)
    return Plan()  # inference on plain weights


def projection_shapes(config: ModelConfig, i: int) -> dict[str, tuple[int, int]]:
    """(in, out) features of every projection of layer i."""
    s, d, hd = config.layer_size(i), config.dim, config.head_dim
    q, kv, ff = s["n_heads"] * hd, s["n_kv_heads"] * hd, s["intermediate_size"]
    return {
        "q_proj": (d, q),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (q, d),
        "gate_proj": (d, ff),
        "up_proj": (d, ff),
        "down_proj": (ff, d),
    }


def all_projections(config: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) features of every projection of every layer, layer by layer."""
    return [shape for i in range(config.n_layers) for shape in projection_shapes(config, i).values()]


def added_params(config: ModelConfig, plan: Plan) -> int:
    """Parameters the method adds to the model (LoRA A/B, adapters, new biases, prefixes, soft prompt)."""
    return plan.prompt * config.dim + sum(layer_added_params(config, plan, i) for i in range(config.n_layers))


def layer_added_params(config: ModelConfig, plan: Plan, i: int) -> int:
    """Parameters the method adds inside block i (all but the soft prompt, which sits before the blocks)."""
    shapes = projection_shapes(config, i)
    n = plan.prefix * 2 * config.n_kv_heads * config.head_dim
    n += sum(plan.rank * (shapes[t][0] + shapes[t][1]) for t in plan.lora)
    n += sum(shapes[t][1] for t in plan.biases if not _has_bias(config, t))
    return n + len(plan.adapters) * (2 * config.dim * plan.bottleneck + plan.bottleneck + config.dim)


def _has_bias(config: ModelConfig, name: str) -> bool:
    if name in MLP:
        return config.mlp_bias
    return config.attention_bias and (name != "o_proj" or config.model_type == "llama")


def trainable_params(config: ModelConfig, plan: Plan) -> int:
    """What `peft.trainable_summary` reports as trainable after applying the method."""
    if plan.base_trains:
        return config.num_params()
    n = added_params(config, plan)
    layers = [projection_shapes(config, i) for i in range(config.n_layers)]  # + biases the model already has:
    n += sum(shapes[t][1] for shapes in layers for t in plan.biases if _has_bias(config, t))
    return n + ((2 * config.n_layers + 1) * config.dim if plan.norms_train else 0)


def nf4_bytes(numel: int) -> int:
    """Bytes of an NF4 tensor as NF4Linear stores it: 4-bit codes, int8 absmax per 64, fp32 scale per 256 blocks,
    one fp32 offset (the same count as quantize/nf4.py's nf4_bytes)."""
    nb = numel // NF4_BLOCK
    return numel // 2 + nb + 4 * (-(-nb // NF4_GROUP)) + 4


def weight_bytes(config: ModelConfig, plan: Plan, w: int) -> int:
    """The base model's weights: all dense in w bytes each, or NF4 block projections + the rest dense (QLoRA keeps
    embeddings, LM head, norms and biases in full precision)."""
    if not plan.nf4:
        return config.num_params() * w
    sizes = [a * b for a, b in all_projections(config)]
    return sum(nf4_bytes(n) for n in sizes) + (config.num_params() - sum(sizes)) * w


# ---- precision ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    """Element sizes (bytes) of the tensors a step makes."""

    w: int  # a stored weight (and its gradient and AdamW state: torch keeps states in the parameter's dtype)
    s: int  # the residual stream and RMSNorm outputs: fp32 under autocast (fp32 weights, fp32 residual adds)
    c: int  # matmul outputs, attention and MLP tensors: the autocast dtype, else s
    autocast: bool

    @classmethod
    def of(cls, q: MemoryQuery) -> Precision:
        w, c = DTYPE_BYTES[q.weights_dtype], DTYPE_BYTES[q.dtype]
        autocast = q.training and q.weights_dtype != q.dtype  # slimlm's mixed precision: fp32 weights + autocast
        return cls(w=w, s=w, c=c, autocast=autocast)
