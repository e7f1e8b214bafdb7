"""INT4 weight-only linear layers: grouped, asymmetric, two codes per byte.

A weight [out, in] is cut along `in` into groups of g (32, 64 or 128) values. Each group stores a scale and a zero
point so that w ≈ (q - 8) * scale + zero with q in 0..15 (the layout of PyTorch's int4 "tinygemm" kernels; zero is
the value of code 8, i.e. the group's midpoint). That is 4 + 2*16/g bits per weight with bf16 scale/zero.

Storage (`Int4WeightOnlyLinear` buffers, what is saved): qweight [out, in/2] uint8 (code of column 2j in the high
nibble, 2j+1 in the low one), scale and zero [out, in/g] bf16. For the matmul the codes are repacked once into the
CPU kernel's own layout (`torch._convert_weight_to_int4pack_for_cpu`) and multiplied by
`torch._weight_int4pack_mm_for_cpu`, which takes bf16 activations; the dense weight is never rebuilt.

`quantize_int4_weight` is round-to-nearest (RTN); compress/gptq.py fills the same codes with a data-aware method.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimlm.errors import InputError

GROUP_SIZES = (32, 64, 128)


def int4_round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The grid's code (0..15, as float) nearest to w; scale/zero broadcast against w."""
    return torch.round((w - zero) / scale + 8).clamp(0, 15)


def int4_value(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The value a code stands for: (q - 8) * scale + zero."""
    return (q - 8) * scale + zero


def int4_params(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero) [out, in/g] fp32 spanning each group's [min, max] with 16 levels."""
    out, n_in = w.shape
    wg = w.detach().float().reshape(out, n_in // group, group)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    return scale, lo + 8 * scale  # zero = value of code 8


def int4_params_searched(
    w: torch.Tensor,
    group: int,
    importance: torch.Tensor | None = None,
    shrink: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero) whose range [lo, hi] * p, p in `shrink`, minimises the group's rounding error.

    Clipping a group's extremes trades their error for finer steps everywhere else. importance [in] weighs each
    input column's squared error (GPTQ passes diag(H), the mean squared input); None weighs all equally.
    """
    out, n_in = w.shape
    wg = w.detach().float().reshape(out, n_in // group, group)  # [out, ng, g]
    imp = torch.ones(n_in) if importance is None else importance.float()
    imp = imp.reshape(1, n_in // group, group)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    best_err = torch.full(lo.shape, float("inf"))
    best_s, best_z = torch.zeros_like(lo), torch.zeros_like(lo)
    for p in shrink:
        scale = ((hi - lo) * p / 15).clamp(min=1e-8).bfloat16().float()
        zero = ((lo + hi) / 2 + scale / 2).bfloat16().float()  # lo*p + 8*scale, centred like the full range
        s, z = scale[..., None], zero[..., None]
        err = ((int4_value(int4_round(wg, s, z), s, z) - wg) ** 2 * imp).sum(dim=-1)  # [out, ng]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, scale, best_s), torch.where(better, zero, best_z)
    return best_s, best_z


def int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Round w [out, in] to codes 0..15 (uint8, one per byte) under per-group scale/zero [out, in/g]."""
    group = w.shape[1] // scale.shape[1]
    s = scale.repeat_interleave(group, dim=1)
    z = zero.repeat_interleave(group, dim=1)
    return int4_round(w.float(), s, z).to(torch.uint8)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes [out, in] uint8 in 0..15 -> [out, in/2] uint8, two per byte (even column high nibble)."""
    return (codes[:, 0::2] << 4) | codes[:, 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[out, in/2] uint8 -> codes [out, in] uint8."""
    return torch.stack((packed >> 4, packed & 0x0F), dim=-1).reshape(packed.shape[0], -1)


def check_int4_shape(out_features: int, in_features: int, group: int) -> None:
    if group not in GROUP_SIZES:
        raise InputError(f"int4 group size must be one of {GROUP_SIZES}, got {group}")
    if in_features % group:
        raise InputError(f"int4 with group {group} needs in_features divisible by {group}, got {in_features}")


def quantize_int4_weight(w: torch.Tensor, group: int = 64) -> dict[str, torch.Tensor]:
    """Round-to-nearest INT4 of w [out, in]: {'qweight' [out, in/2] uint8, 'scale', 'zero' [out, in/g] bf16}."""
    check_int4_shape(*w.shape, group)
    scale, zero = int4_params(w, group)
    scale, zero = scale.to(torch.bfloat16), zero.to(torch.bfloat16)  # round first: codes see the stored values
    codes = int4_codes(w, scale.float(), zero.float())
    return {"qweight": pack_int4(codes), "scale": scale, "zero": zero}


def dequantize_int4(
    qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The dense weight [out, in] of stored int4 codes."""
    codes = unpack_int4(qweight).to(dtype)
    group = codes.shape[1] // scale.shape[1]
    s = scale.to(dtype).repeat_interleave(group, dim=1)
    z = zero.to(dtype).repeat_interleave(group, dim=1)
    return int4_value(codes, s, z)


class Int4WeightOnlyLinear(nn.Module):
    """y = x @ W^T + b with W stored as grouped int4 (see the module docstring)."""

    scheme = "int4"

    def __init__(
        self, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None = None
    ):
        super().__init__()
        self.out_features, self.in_features = qweight.shape[0], qweight.shape[1] * 2
        self.group_size = self.in_features // scale.shape[1]
        check_int4_shape(self.out_features, self.in_features, self.group_size)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # The CPU kernel's layout of (qweight, scale/zero), made on first use: (the qweight it was made from, packed,
        # scale_zero), so loading new codes into the buffer (load_state_dict(assign=True)) rebuilds it.
        self._kernel: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: int = 64) -> Int4WeightOnlyLinear:
        return cls(**quantize_int4_weight(linear.weight, group), bias=linear.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.scale, self.zero, dtype)

    def _kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._kernel is None or self._kernel[0] is not self.qweight:
            if self.qweight.device.type != "cpu":
                raise NotImplementedError("int4 layers run on CPU only for now (torch._weight_int4pack_mm_for_cpu)")
            codes = unpack_int4(self.qweight).to(torch.int32)  # [out, in]
            packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
            scale_zero = torch.stack([self.scale, self.zero], dim=-1).transpose(0, 1).contiguous()  # [in/g, out, 2]
            self._kernel = (self.qweight, packed, scale_zero.to(torch.bfloat16))
        return self._kernel[1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed, scale_zero = self._kernel_weights()
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # [M, in]: the kernel takes bf16 activations
        y = torch._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, scale_zero)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"int4 group {self.group_size}"
        )
