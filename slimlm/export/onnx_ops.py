"""Quantized layers for export: ONNX Runtime's MatMulNBits (com.microsoft) as a PyTorch custom op.

slimlm's int8 and int4 layers (quantize/int8.py, int4.py) are swapped, for export only, for `NBitsLinear`, which
holds the same codes in MatMulNBits' layout and calls `slimlm::matmul_nbits`. In PyTorch that op dequantizes and
multiplies (it runs only while tracing and in parity checks); the ONNX exporter writes it as one MatMulNBits node,
so the .onnx file keeps 8-bit or 4-bit weights and ONNX Runtime multiplies them with its own CPU kernels.

MatMulNBits layout: B [N, K/block, block*bits/8] uint8 (4-bit: element 2j in the low nibble), scales
[N, K/block] float, no zero points (meaning 2^(bits-1)); the weight is (q - 2^(bits-1)) * scale. accuracy_level 4
lets ORT quantize the activations to int8 per block (int8 compute, the analogue of our int8-dynamic); 0 computes
in fp32. Measured on this CPU (ORT 1.32, one 576x1536 layer, batch 1): 4-bit without zero points 215 us (fp32
compute) / 120 us (int8 compute), with float zero points 4,300 us (a slow generic path, hence the group offset
below); 8-bit 55 us with int8 compute but 4,650 us with fp32 compute; a plain fp32 MatMul 154 us.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimlm.errors import InputError
from slimlm.quantize.int4 import Int4WeightOnlyLinear, unpack_int4
from slimlm.quantize.int8 import DynamicInt8Linear, Int8Embedding, Int8WeightOnlyLinear, StaticInt8Linear

NBITS_BLOCKS = (128, 64, 32, 16)  # MatMulNBits block sizes: powers of two >= 16


@torch.library.custom_op("slimlm::matmul_nbits", mutates_args=())
def matmul_nbits(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    K: int,
    N: int,
    bits: int,
    block_size: int,
    accuracy_level: int,
) -> torch.Tensor:
    """x [..., K] @ dequant(qweight)^T -> [..., N], MatMulNBits' arithmetic (default zero point) in fp32."""
    return x @ nbits_dequantize(qweight, scales, K, N, bits, block_size).t().to(x.dtype)


@matmul_nbits.register_fake
def _(x, qweight, scales, K, N, bits, block_size, accuracy_level):
    return x.new_empty(*x.shape[:-1], N)


def nbits_dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, K: int, N: int, bits: int, block_size: int
) -> torch.Tensor:
    """The dense [N, K] fp32 weight of a MatMulNBits node without zero points: (q - 2^(bits-1)) * scale."""
    nb = K // block_size
    if bits == 8:
        q = qweight.reshape(N, nb, block_size)
    else:  # low nibble first
        q = torch.stack([qweight & 0xF, qweight >> 4], dim=-1).reshape(N, nb, block_size)
    return ((q.float() - 2 ** (bits - 1)) * scales.reshape(N, nb, 1)).reshape(N, K)


def _onnx_matmul_nbits():
    """The ONNX translation of slimlm::matmul_nbits (onnx has no schema for contrib ops: register ORT's)."""
    import onnx
    import onnxscript
    from onnx.defs import OpSchema
    from onnxscript._internal.values import Op

    if not onnx.defs.has("MatMulNBits", "com.microsoft"):
        p = OpSchema.FormalParameter
        opt = OpSchema.FormalParameterOption.Optional
        schema = OpSchema(
            "MatMulNBits",
            "com.microsoft",
            1,
            inputs=[p("A", "T1"), p("B", "T2"), p("scales", "T1"), p("zero_points", "T3", param_option=opt)],
            outputs=[p("Y", "T1")],
            type_constraints=[
                ("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                ("T2", ["tensor(uint8)"], ""),
                ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
            ],
            attributes=[OpSchema.Attribute(n, OpSchema.AttrType.INT, "") for n in ("K", "N", "bits", "block_size")]
            + [OpSchema.Attribute("accuracy_level", OpSchema.AttrType.INT, "", required=False)],
        )
        onnx.defs.register_schema(schema)
    op = Op(onnxscript.values.Opset("com.microsoft", 1), "MatMulNBits")

    def translate(x, qweight, scales, K: int, N: int, bits: int, block_size: int, accuracy_level: int):
        return op(x, qweight, scales, K=K, N=N, bits=bits, block_size=block_size, accuracy_level=accuracy_level)

    return translate


def custom_translation_table() -> dict:
    return {torch.ops.slimlm.matmul_nbits.default: _onnx_matmul_nbits()}


class NBitsLinear(nn.Module):
    """A linear layer as one MatMulNBits node, plus a per-group offset and a bias where the layer has them.

    MatMulNBits is given no zero points: ORT's fast CPU kernels take none or integer ones, and slimlm's int4
    groups have a real-valued offset (w = (q - 8) * s + z, z any value). So the offset is applied outside the
    kernel, exactly: x · (z broadcast over each group) = (x summed per group) @ z^T, a [.., K/g] x [K/g, N] matmul.
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        K: int,
        N: int,
        bits: int,
        block_size: int,
        group_offset: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        accuracy_level: int = 0,
    ):
        super().__init__()
        self.register_buffer("qweight", qweight)  # [N, K/block, block*bits/8] uint8
        self.register_buffer("scales", scales)  # [N, K/block] fp32
        self.register_buffer("group_offset", group_offset)  # [N, K/block] fp32 or None
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.K, self.N, self.bits, self.block_size, self.accuracy_level = K, N, bits, block_size, accuracy_level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = matmul_nbits(x, self.qweight, self.scales, self.K, self.N, self.bits, self.block_size, self.accuracy_level)
        if self.group_offset is not None:
            sums = x.reshape(*x.shape[:-1], self.K // self.block_size, self.block_size).sum(-1)  # [.., K/g]
            y = y + sums @ self.group_offset.t()
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        w = nbits_dequantize(self.qweight, self.scales, self.K, self.N, self.bits, self.block_size)
        if self.group_offset is not None:
            w = w + self.group_offset.repeat_interleave(self.block_size, dim=1)
        return w


def int8_block_size(K: int) -> int:
    block = next((b for b in NBITS_BLOCKS if K % b == 0), None)
    if block is None:
        raise InputError(f"an int8 layer with {K} inputs cannot be written as MatMulNBits (needs a multiple of 16)")
    return block


def nbits_from_int8(layer: nn.Module, accuracy_level: int = 0) -> NBitsLinear:
    """Per-channel int8 (q in -128..127, one scale per row) -> MatMulNBits 8-bit (q + 128, zero point 128), the
    row's scale repeated per block."""
    N, K = layer.qweight.shape
    block = int8_block_size(K)
    q = (layer.qweight.to(torch.int16) + 128).to(torch.uint8).reshape(N, K // block, block)
    scales = layer.scale.float().reshape(N, 1).expand(N, K // block).contiguous()
    return NBitsLinear(q, scales, K, N, 8, block, bias=getattr(layer, "bias", None), accuracy_level=accuracy_level)


def nbits_from_int4(layer: Int4WeightOnlyLinear, accuracy_level: int = 0) -> NBitsLinear:
    """Ours: w = (q - 8) * s + z, column 2j in the high nibble. MatMulNBits: (q - 8) * s, 2j in the low nibble;
    z becomes the group offset."""
    N, K, g = layer.out_features, layer.in_features, layer.group_size
    codes = unpack_int4(layer.qweight)  # [N, K] uint8 0..15
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(N, K // g, g // 2)
    return NBitsLinear(
        packed.contiguous(),
        layer.scale.float().contiguous(),
        K,
        N,
        4,
        g,
        group_offset=layer.zero.float().contiguous(),
        bias=layer.bias,
        accuracy_level=accuracy_level,
    )


class Int8GatherEmbedding(nn.Module):
    """Int8Embedding for export, holding its codes in MatMulNBits' 8-bit layout so that a tied LM head can share
    the very same tensors (one copy in the file): Gather the uint8 rows, then (q - 128) * scale."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.register_buffer("codes", codes)  # [V, D/block, block] uint8 (int8 + 128)
        self.register_buffer("scales", scales)  # [V, D/block] fp32, one value repeated along the row

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        V, nb, block = self.codes.shape
        rows = F.embedding(ids, self.codes.reshape(V, nb * block)).float() - 128.0  # [B, T, D]
        return rows * self.scales[:, 0][ids][..., None]

    @property
    def weight(self) -> torch.Tensor:
        """An empty fp32 tensor: the model's dtype/device properties read the embedding's weight."""
        return self.scales.new_empty(0)


def embedding_for_export(emb: Int8Embedding, head: NBitsLinear | None) -> Int8GatherEmbedding:
    """The export form of an int8 embedding; with a tied head (8-bit NBitsLinear), the head's own tensors."""
    if head is not None:
        return Int8GatherEmbedding(head.qweight, head.scales)
    nb = nbits_from_int8(emb)
    return Int8GatherEmbedding(nb.qweight, nb.scales)


def swap_quantized_for_export_(model: nn.Module, int8_compute: bool = True) -> dict[str, int]:
    """Replace slimlm's quantized layers by their export forms in place; returns {kind: count}.

    int8_compute: MatMulNBits with accuracy_level 4 (ORT quantizes each activation block to int8: its fast CPU
    path) for every layer; False keeps fp32 arithmetic (exact to slimlm's codes) except for int8-dynamic/static
    layers, which quantize their activations by definition.
    """
    level = 4 if int8_compute else 0
    counts: dict[str, int] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, Int4WeightOnlyLinear):
            new, kind = nbits_from_int4(module, level), "int4"
        elif isinstance(module, Int8WeightOnlyLinear):
            new, kind = nbits_from_int8(module, level), "int8"
        elif isinstance(module, (DynamicInt8Linear, StaticInt8Linear)):
            new, kind = nbits_from_int8(module, accuracy_level=4), "int8 (int8 compute)"
        else:
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
        counts[kind] = counts.get(kind, 0) + 1
    if isinstance(model.embed_tokens, Int8Embedding):
        tied = model.config.tie_word_embeddings and isinstance(model.lm_head, NBitsLinear)
        model.embed_tokens = embedding_for_export(model.embed_tokens, model.lm_head if tied else None)
        counts["int8 embedding"] = 1
    return counts
