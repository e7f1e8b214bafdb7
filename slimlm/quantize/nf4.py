"""NF4: 4-bit NormalFloat weights with double-quantized block scales (QLoRA, Dettmers et al. 2023).

A weight [out, in] is cut into blocks of 64 consecutive values; each block stores its absmax and 64 4-bit codes that
index the 16 NF4 levels (quantiles of a standard normal, scaled to [-1, 1]). "Double quantization" then stores the
absmax values themselves in 8 bits: minus their mean, in groups of 256 with one fp32 scale per group. That is
4 + 8/64 + 32/(64*256) ≈ 4.13 bits per weight.

`NF4Linear` is a frozen base layer: it dequantizes its weight on the fly for each matmul (forward and backward) and
never keeps the dense weight alive, which is what lets QLoRA train on top of a 4-bit model. This module is the
storage format and the layer; it is not a fast 4-bit kernel.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimlm.errors import InputError

# The 16 NF4 levels, as in bitsandbytes / the QLoRA paper.
NF4_LEVELS = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)
BLOCK_SIZE = 64
SCALE_GROUP = 256  # absmax values per double-quantization group


def quantize_nf4(w: torch.Tensor, block_size: int = BLOCK_SIZE, group: int = SCALE_GROUP) -> dict[str, torch.Tensor]:
    """Quantize any tensor whose size is a multiple of 2*block_size; returns the packed state (see NF4Linear)."""
    if w.numel() % block_size or block_size % 2:
        raise InputError(f"NF4 needs a tensor size divisible by the block size {block_size}; got {tuple(w.shape)}")
    blocks = w.detach().float().reshape(-1, block_size)  # [nb, 64]
    absmax = blocks.abs().amax(dim=1).clamp(min=1e-12)  # [nb]
    normed = blocks / absmax[:, None]  # in [-1, 1]
    # Nearest level: bucketize against the midpoints between consecutive levels.
    mids = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
    codes = torch.bucketize(normed, mids).to(torch.uint8).reshape(-1)  # [numel] in 0..15
    packed = (codes[0::2] << 4) | codes[1::2]  # two codes per byte: [numel / 2]
    return {"codes": packed, **quantize_absmax(absmax, group)}


def quantize_absmax(absmax: torch.Tensor, group: int = SCALE_GROUP) -> dict[str, torch.Tensor]:
    """Double quantization: absmax [nb] -> int8 codes [nb], fp32 scale per group of 256, fp32 offset (the mean)."""
    offset = absmax.mean()
    centered = absmax - offset
    n_groups = -(-centered.numel() // group)
    padded = F.pad(centered, (0, n_groups * group - centered.numel())).reshape(n_groups, group)
    scale = (padded.abs().amax(dim=1) / 127).clamp(min=1e-12)  # [ng]
    q = torch.round(padded / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(-1)[: centered.numel()]
    return {"absmax_codes": q, "absmax_scale": scale, "absmax_offset": offset.reshape(1)}


def dequantize_absmax(state: dict[str, torch.Tensor], group: int = SCALE_GROUP) -> torch.Tensor:
    q = state["absmax_codes"].float()
    scale = state["absmax_scale"].repeat_interleave(group)[: q.numel()]
    return q * scale + state["absmax_offset"]


def dequantize_nf4(
    state: dict[str, torch.Tensor],
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """The dense tensor of a quantize_nf4 state."""
    packed = state["codes"]
    codes = torch.stack((packed >> 4, packed & 0x0F), dim=1).reshape(-1)  # [numel], original order
    levels = NF4_LEVELS.to(device=packed.device, dtype=dtype)
    values = levels[codes.long()].reshape(-1, block_size)  # [nb, 64]
    return (values * dequantize_absmax(state).to(dtype)[:, None]).reshape(shape)


class _NF4MatMul(torch.autograd.Function):
    """y = x @ W^T with W dequantized in forward and again in backward, so no dense W is saved for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return x @ layer.dequantize(x.dtype).T

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantize(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer with an NF4 weight; `bias` (None or a Parameter) stays in full precision."""

    def __init__(self, linear: nn.Linear, block_size: int = BLOCK_SIZE):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block_size = block_size
        for name, t in quantize_nf4(linear.weight, block_size).items():
            self.register_buffer(name, t.to(linear.weight.device))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.num_weight_elements = self.in_features * self.out_features  # counted by peft.trainable_summary

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [out, in] this layer computes with."""
        state = {
            "codes": self.codes,
            "absmax_codes": self.absmax_codes,
            "absmax_scale": self.absmax_scale,
            "absmax_offset": self.absmax_offset,
        }
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        return dequantize_nf4(state, (self.out_features, self.in_features), dtype, self.block_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast, compute in the autocast dtype (bf16 for QLoRA), as bitsandbytes does.
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = _NF4MatMul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, nf4 block {self.block_size}"
        )


def quantize_model_nf4_(
    model: nn.Module,
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
) -> int:
    """Swap the decoder blocks' linear layers for NF4Linear, in place (embeddings and LM head stay dense, as in
    QLoRA). Returns the number of layers quantized."""
    n = 0
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for attr in targets:
                lin = getattr(parent, attr, None)
                if isinstance(lin, nn.Linear):
                    setattr(parent, attr, NF4Linear(lin))
                    n += 1
    return n


def nf4_bytes(numel: int, block_size: int = BLOCK_SIZE, group: int = SCALE_GROUP) -> int:
    """Storage of an NF4 tensor: packed codes + int8 absmax + fp32 group scales + the offset."""
    nb = numel // block_size
    return numel // 2 + nb + 4 * (-(-nb // group)) + 4
