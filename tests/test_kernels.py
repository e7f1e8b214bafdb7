"""slimlm/kernels: the int8 weight-only CPU kernel against the fp32 reference, and its use by Int8WeightOnlyLinear.

The first run builds the kernel (~30 s on 2 cores, then cached under $SLIMLM_CACHE/kernels); every test skips when
it cannot be built (no compiler), except the one checking that a failed build falls back quietly.
"""

from __future__ import annotations

import logging

import pytest
import torch

from slimlm import kernels
from slimlm.quantize.int8 import Int8WeightOnlyLinear


@pytest.fixture(scope="module")
def kernel() -> None:
    if not kernels.load():
        pytest.skip("slimlm's CPU kernels could not be built here (see the logged warning)")


def int8_weight(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes q [n, k] over the full int8 range and positive scales s [n]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    return q, torch.rand(n, generator=g) * 0.02 + 1e-3


def reference(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [..., k] @ (q * s)^T in float64 (exact enough to judge fp32 round-off)."""
    return x.double() @ (q.double() * s.double()[:, None]).T


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


# The kernel rounds each activation row to int16 with its own scale (int8_gemm.cpp): each entry moves by at most
# 1/65534 of the row's largest, so outputs agree with the exact product to ~1e-5 of their scale; 1e-4 bounds it.
INT16_TOL = 1e-4


@pytest.mark.parametrize("m", [1, 3, 4, 5, 17, 64, 70, 130])  # 130: two chunks of 128 rows
@pytest.mark.parametrize("k,n", [(64, 13), (96, 48), (608, 37), (100, 24)])  # 100: K % 8 != 0 (scalar tail)
def test_int8_linear_matches_fp32_reference(kernel, m, k, n):
    q, s = int8_weight(n, k)
    x = torch.randn(m, k)
    y = kernels.int8_linear(x, q, s)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert rel_err(y, reference(x, q, s)) < INT16_TOL


def test_int8_linear_bf16_in_bf16_out(kernel):
    q, s = int8_weight(40, 96)
    x = torch.randn(5, 96).bfloat16()
    y = kernels.int8_linear(x, q, s)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, reference(x.float(), q, s)) < 1e-2  # fp32 accumulation, one bf16 rounding of the output


def test_int8_linear_3d_and_non_contiguous_inputs(kernel):
    q, s = int8_weight(21, 64)
    x = torch.randn(2, 3, 128)[..., ::2]  # [B, T, K] with stride 2 in K
    assert not x.is_contiguous()
    y = kernels.int8_linear(x, q, s)
    assert y.shape == (2, 3, 21)
    assert rel_err(y, reference(x, q, s)) < INT16_TOL
    xt = torch.randn(64, 6).t()  # [6, 64], transposed storage
    assert rel_err(kernels.int8_linear(xt, q, s), reference(xt, q, s)) < INT16_TOL


def test_int8_linear_splits_rows_across_threads(kernel):
    q, s = int8_weight(1000, 576)  # enough work per call for the intra-op pool to split the output rows
    x = torch.randn(4, 576)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = kernels.int8_linear(x, q, s)
    finally:
        torch.set_num_threads(threads)
    assert rel_err(y, reference(x, q, s)) < INT16_TOL


def test_int8_linear_rows_do_not_depend_on_the_batch(kernel):
    """Integer sums: a row's output is bit-identical alone, in any batch and tiling, and past the int32 flush."""
    torch.manual_seed(0)  # fixed data: with K = 4100 about 1 random draw in 150 puts one row's error just past 1e-4
    for k in (96, 4100):  # 4100: longer than one int32 partial sum (2048) and not a multiple of 16
        q, s = int8_weight(30, k)
        x = torch.randn(9, k) * torch.logspace(-3, 3, 9)[:, None]  # rows of very different scales
        batch = kernels.int8_linear(x, q, s)
        for i in range(9):
            assert torch.equal(kernels.int8_linear(x[i : i + 1], q, s), batch[i : i + 1])
        assert rel_err(batch, reference(x, q, s)) < INT16_TOL * 1e3  # the rows differ in scale by 1e6
        for i in range(9):
            assert rel_err(batch[i], reference(x[i], q, s)) < INT16_TOL


def test_int8_linear_rejects_bad_inputs(kernel):
    q, s = int8_weight(8, 64)
    with pytest.raises(RuntimeError, match="x must be"):
        kernels.int8_linear(torch.randn(2, 63), q, s)
    with pytest.raises(RuntimeError, match="qweight must be int8"):
        kernels.int8_linear(torch.randn(2, 64), q.float(), s)
    with pytest.raises(RuntimeError, match="scale must have 8"):
        kernels.int8_linear(torch.randn(2, 64), q, s[:4])


def test_int8_linear_op_has_a_fake_impl(kernel):
    q, s = int8_weight(8, 64)
    torch.library.opcheck(
        torch.ops.slimlm.int8_linear, (torch.randn(3, 64), q, s), test_utils=("test_schema", "test_faketensor")
    )


@pytest.mark.parametrize("bias", [False, True])
def test_weight_only_layer_uses_kernel_and_matches_torch_path(kernel, monkeypatch, bias):
    lin = torch.nn.Linear(96, 50, bias=bias)
    layer = Int8WeightOnlyLinear.from_linear(lin)
    x = torch.randn(2, 3, 96)
    with torch.no_grad():
        y = layer(x)
        exact = x @ layer.dequantize().T + (lin.bias if bias else 0)
        torch_path = layer.torch_forward(x)  # bf16 activations: looser
        monkeypatch.setenv("SLIMLM_KERNELS", "0")
        off = layer(x)
    assert y.shape == (2, 3, 50) and y.dtype == torch.float32
    assert rel_err(y, exact.double()) < INT16_TOL
    assert rel_err(y, torch_path.double()) < 2e-2
    assert torch.equal(off, torch_path)  # SLIMLM_KERNELS=0 is exactly the old path


def test_failed_build_logs_one_warning_and_falls_back(monkeypatch, caplog):
    def no_compiler() -> None:
        raise RuntimeError("Error building extension 'slimlm_kernels'\nc++: not found")

    monkeypatch.setattr(kernels, "_loaded", None)  # as in a fresh process
    monkeypatch.setattr(kernels, "_build", no_compiler)
    layer = Int8WeightOnlyLinear.from_linear(torch.nn.Linear(64, 8))
    x = torch.randn(2, 64)
    with caplog.at_level(logging.WARNING, logger="slimlm.kernels"), torch.no_grad():
        assert not kernels.int8_linear_available()
        assert torch.equal(layer(x), layer.torch_forward(x))
        assert torch.equal(layer(x), layer.torch_forward(x))
    assert len(caplog.records) == 1 and "c++: not found" in caplog.records[0].message
