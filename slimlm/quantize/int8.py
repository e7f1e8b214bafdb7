"""INT8 linear layers: weight-only (per output channel) and dynamic (weights per channel, activations per token).

Both store the weight the same way: int8 codes q [out, in] and one fp32 scale per output row, W ≈ q * scale[:, None]
(symmetric, absmax / 127). They differ in how they multiply:

- `Int8WeightOnlyLinear` keeps activations in floating point and reads the int8 weight directly (no dense copy). On
  CPU it runs slimlm's own kernel (`slimlm.kernels.int8_linear`: fp32 activations and accumulation, 1.3-2.5x faster
  than torch's kernel on an AVX2 EPYC), built on first use; with SLIMLM_KERNELS=0, on CUDA, under TorchScript
  tracing (the .pt file must run without slimlm) or when the kernel cannot be built, it calls
  `torch._weight_int8pack_mm`, whose vectorised CPU path takes bf16 activations (its fp32 path is a slow reference
  loop), so activations are cast to bf16 for that matmul and the result cast back.
- `DynamicInt8Linear` also quantizes each activation row at run time (absmax / 127 per token) and multiplies int8 x
  int8 -> int32 with `torch._int_mm` (oneDNN/VNNI on CPU), then rescales: y = (xq @ q^T) * sx[:, None] * scale.
- `StaticInt8Linear` is the same GEMM with one activation scale fixed ahead of time by calibration (buffer
  `input_scale`, from compress/static_int8.py's observers): no per-token max at run time; values beyond the calibrated
  range clip.

`Int8Embedding` is a per-row int8 embedding table; with tied embeddings the LM head shares its codes and scales
(the head is one of the layers above, so under `int8` it takes the same kernel).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimlm import kernels


def quantize_int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (int8 codes [out, in], fp32 scale [out]) with w ≈ codes * scale[:, None]."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # [out]
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations x [M, in] -> (int8 [M, in], fp32 scale [M, 1]): one absmax scale per row (token)."""
    x = x.float()
    scale = (x.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


class _Int8Base(nn.Module):
    """Shared storage: buffers qweight [out, in] int8 and scale [out] fp32; bias (optional) in the model dtype."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> _Int8Base:
        q, s = quantize_int8_weight(linear.weight)
        return cls(q, s, linear.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [out, in] this layer stands for."""
        return self.qweight.to(dtype) * self.scale.to(dtype)[:, None]

    def _out(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def use_cpu_kernel(x: torch.Tensor) -> bool:
    """Whether slimlm's int8 CPU kernel takes this call (see the module docstring for when it does not)."""
    return x.device.type == "cpu" and not torch.jit.is_tracing() and kernels.int8_linear_available()


class Int8WeightOnlyLinear(_Int8Base):
    """y = x @ (q * scale)^T + b, with the int8 weight read by slimlm's CPU kernel or torch._weight_int8pack_mm."""

    scheme = "int8"

    def _scale_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The scale in the kernel's activation dtype, converted once per (scale tensor, dtype), not per call."""
        cached = getattr(self, "_scale_cache", None)
        if cached is None or cached[0] is not self.scale or cached[1].dtype != dtype:
            self._scale_cache = cached = (self.scale, self.scale.to(dtype))
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_cpu_kernel(x):
            return self._out(kernels.int8_linear(x, self.qweight, self.scale), x)  # [..., out] in x's dtype
        return self.torch_forward(x)

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same product with torch's own int8 kernel (the path off CPU and when slimlm's kernel is off)."""
        x2 = x.reshape(-1, self.in_features)  # [M, in]
        if x2.device.type == "cpu":  # the vectorised CPU kernel is the bf16 one
            x2 = x2.to(torch.bfloat16)
        return self._out(torch._weight_int8pack_mm(x2, self.qweight, self._scale_as(x2.dtype)), x)


class DynamicInt8Linear(_Int8Base):
    """y = dequant(quant_per_token(x) @ q^T) + b with an int8 x int8 -> int32 GEMM (torch._int_mm)."""

    scheme = "int8-dynamic"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, sx = quantize_int8_rows(x.reshape(-1, self.in_features))  # [M, in] int8, [M, 1]
        acc = torch._int_mm(xq, self.qweight.t())  # [M, out] int32
        return self._out(acc.float() * sx * self.scale, x)


class StaticInt8Linear(_Int8Base):
    """y = dequant(clamp(round(x / s_x)) @ q^T) + b with a calibrated per-tensor activation scale s_x."""

    scheme = "int8-static"

    def __init__(
        self,
        qweight: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        input_scale: torch.Tensor | float = 1.0,
    ):
        super().__init__(qweight, scale, bias)
        self.register_buffer(
            "input_scale", torch.as_tensor(input_scale, dtype=torch.float32, device=qweight.device).reshape(())
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_scale: float = 1.0) -> StaticInt8Linear:
        q, s = quantize_int8_weight(linear.weight)
        return cls(q, s, linear.bias, input_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()  # [M, in]
        xq = torch.round(x2 / self.input_scale).clamp(-127, 127).to(torch.int8)
        acc = torch._int_mm(xq, self.qweight.t())  # [M, out] int32
        return self._out(acc.float() * (self.input_scale * self.scale), x)


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with one scale per row (the layout of an int8 LM head)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.dtype = dtype

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> Int8Embedding:
        q, s = quantize_int8_weight(emb.weight)
        return cls(q, s, emb.weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Gather the int8 rows first, then dequantize only those: [B, T, D]
        return F.embedding(ids, self.qweight).to(self.dtype) * self.scale[ids].to(self.dtype)[..., None]

    @property
    def weight(self) -> torch.Tensor:
        """The dense table (model.dtype and device properties read it)."""
        return self.qweight.new_empty(0, dtype=self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"
