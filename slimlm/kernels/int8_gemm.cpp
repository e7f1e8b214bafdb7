// int8 weight-only GEMM for the CPU: y[M, N] = x[M, K] . (q[N, K] * s[N])^T, accumulated in fp32.
//
// Registered as torch.ops.slimlm.int8_linear(x, qweight, scale) -> y (x: [..., K] fp32/bf16/fp16, y in x's
// dtype). It is what Int8WeightOnlyLinear runs on CPU in place of torch._weight_int8pack_mm, whose CPU path is
// several times slower than the memory bandwidth allows on AVX2 machines.
//
// Small M (decode, serving batches): a register-tiled kernel. A tile is MR rows of x by one row of q, and q is read
// row after row; each step over K widens VL int8 weights to fp32 once and multiplies them with all MR x rows, so
// every weight byte is read and converted once per MR activation rows. The scale is applied once per output, after
// the dot product. Threads split the output rows with at::parallel_for (torch's own intra-op pool), or the caller
// splits them (int8_matmul_rows, for decode.cpp's own parallel region). The same tiles also take an fp32 weight.
// Large M (prefill): compute-bound, so q is dequantized to fp32 a slice of rows at a time and the product is left
// to torch's GEMM (MKL / oneDNN), which beats any hand-written loop here.
//
// It deliberately does not: handle bias (the Python layer adds it), run on CUDA, or use int8 dot-product
// instructions (they would need the activations quantized, which changes the numerics of a weight-only layer).

#include "int8_gemm.h"
#include "simd.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>

namespace {

using namespace slimlm::simd;

// Weights are read row after row, so the whole matrix is one sequential stream (measured on the AVX2 EPYC, a
// 106 MB int8 matrix from DRAM at M = 1: 34 GB/s, level with a plain streaming read, against 18 GB/s for tiles that
// interleave 8 q rows, whose 576-byte runs are too short for the hardware prefetcher). Software prefetch runs
// PREFETCH_BYTES ahead of the stream. Each loaded weight vector serves the MR activation rows of the tile; U
// independent accumulators per row along K keep enough FMAs in flight to hide their latency when MR is small.
constexpr int64_t PREFETCH_BYTES = 2048;

// y[i] = s * sum_k x[i, k] * w[k] for i < MR: one q row w [K] against MR x rows (row stride K); y stride ldy.
template <int MR, typename WT>
inline void tile(const float* x, const WT* w, const float* s, float* y, int64_t K, int64_t ldy) {
  float acc[MR];
  int64_t k = 0;
#if SLIMLM_SIMD
  constexpr int U = MR >= 4 ? 2 : 8 / MR;  // accumulators per x row: MR * U in {8, 8, 6, 8}
  constexpr int64_t STEP_BYTES = VL * U * static_cast<int64_t>(sizeof(WT));
  Vec vacc[MR][U];
  for (int i = 0; i < MR; ++i)
    for (int u = 0; u < U; ++u) vacc[i][u] = vzero();
  const char* pf = reinterpret_cast<const char*>(w) + PREFETCH_BYTES;
  for (; k + VL * U <= K; k += VL * U) {
    for (int64_t b = 0; b < STEP_BYTES; b += 64) _mm_prefetch(pf + k * sizeof(WT) + b, _MM_HINT_T0);
    for (int u = 0; u < U; ++u) {
      const Vec wv = load_w(w + k + u * VL);  // widened once, used for all MR activation rows
      for (int i = 0; i < MR; ++i) vacc[i][u] = vfma(load_x(x + i * K + k + u * VL), wv, vacc[i][u]);
    }
  }
  for (; k + VL <= K; k += VL) {
    const Vec wv = load_w(w + k);
    for (int i = 0; i < MR; ++i) vacc[i][0] = vfma(load_x(x + i * K + k), wv, vacc[i][0]);
  }
  for (int i = 0; i < MR; ++i) {
    for (int u = 1; u < U; ++u) vacc[i][0] = vadd(vacc[i][0], vacc[i][u]);
    acc[i] = hsum(vacc[i][0]);
  }
#else
  for (int i = 0; i < MR; ++i) acc[i] = 0.f;
#endif
  for (; k < K; ++k)  // the K % VL tail (all of K without SIMD)
    for (int i = 0; i < MR; ++i) acc[i] += x[i * K + k] * static_cast<float>(w[k]);
  for (int i = 0; i < MR; ++i) y[i * ldy] = s == nullptr ? acc[i] : acc[i] * *s;
}

// Output columns [n0, n1) of y for activation rows [m0, m0 + MR), one q row at a time.
template <int MR, typename WT>
void tile_rows(const float* x, const WT* q, const float* s, float* y, int64_t K, int64_t N, int64_t m0,
               int64_t n0, int64_t n1) {
  const float* xm = x + m0 * K;
  float* ym = y + m0 * N;
  for (int64_t n = n0; n < n1; ++n) tile<MR>(xm, q + n * K, s == nullptr ? nullptr : s + n, ym + n, K, N);
}

template <typename WT>
void tile_rows_any(int64_t mr, const float* x, const WT* q, const float* s, float* y, int64_t K, int64_t N,
                   int64_t m0, int64_t n0, int64_t n1) {
  switch (mr) {
    case 4: return tile_rows<4>(x, q, s, y, K, N, m0, n0, n1);
    case 3: return tile_rows<3>(x, q, s, y, K, N, m0, n0, n1);
    case 2: return tile_rows<2>(x, q, s, y, K, N, m0, n0, n1);
    default: return tile_rows<1>(x, q, s, y, K, N, m0, n0, n1);
  }
}

constexpr int64_t MR_MAX = 4;          // activation rows per tile
constexpr int64_t ROW_GROUP = 16;      // q rows per unit of thread work
constexpr int64_t L1_WEIGHTS = 16384;  // int8 weights per block kept hot in L1 while all x rows pass over it
constexpr int64_t MIN_MACS = 65536;    // fewer multiply-adds than this per thread: not worth waking a thread

// Output rows [r0, r1) of y [M, N] = x [M, K] . (q [N, K] * s [N])^T on the calling thread.
template <typename WT>
void matmul_rows(const float* x, const WT* q, const float* s, float* y, int64_t M, int64_t K, int64_t N,
                 int64_t r0, int64_t r1) {
  const int64_t block = std::max<int64_t>(ROW_GROUP, L1_WEIGHTS / std::max<int64_t>(1, K) / ROW_GROUP * ROW_GROUP);
  for (int64_t b0 = r0; b0 < r1; b0 += block) {  // one L1-sized block of q rows ...
    const int64_t b1 = std::min(r1, b0 + block);
    for (int64_t m0 = 0; m0 < M; m0 += MR_MAX)  // ... used by every group of MR_MAX activation rows
      tile_rows_any(std::min(MR_MAX, M - m0), x, q, s, y, K, N, m0, b0, b1);
  }
}

// y [M, N] fp32 = x [M, K] fp32 . (q [N, K] * s [N])^T with the tiled kernel; all contiguous.
void gemm_small_m(const float* x, const int8_t* q, const float* s, float* y, int64_t M, int64_t K, int64_t N) {
  const int64_t groups = (N + ROW_GROUP - 1) / ROW_GROUP;
  const int64_t grain = std::max<int64_t>(1, MIN_MACS / std::max<int64_t>(1, ROW_GROUP * K * M));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    matmul_rows(x, q, s, y, M, K, N, g0 * ROW_GROUP, std::min(N, g1 * ROW_GROUP));
  });
}

// Prefill: dequantize q to fp32 a slice of rows at a time (bounded temporary) and use torch's GEMM.
void gemm_large_m(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, at::Tensor& y) {
  const int64_t N = q.size(0), K = q.size(1);
  const int64_t rows = std::max<int64_t>(64, (int64_t{1} << 20) / std::max<int64_t>(1, K));  // ~4 MB of fp32
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t nb = std::min(rows, N - n0);
    at::Tensor w = q.narrow(0, n0, nb).to(at::kFloat).mul_(s.narrow(0, n0, nb).unsqueeze(1));  // [nb, K]
    at::Tensor out = y.narrow(1, n0, nb);                                                   // [M, nb] view
    at::mm_out(out, x, w.t());
  }
}

// Above this many activation rows the GEMM path takes over. Measured on an AVX2 EPYC (Zen 3, one thread, SmolLM2
// shapes): the tiled kernel is level with dequantize + MKL at M = 32-64 and ahead on the [49152, 576] head, the two
// are within noise at M = 96, and the GEMM path is 10-30 % ahead from M = 128.
constexpr int64_t LARGE_M = 64;

}  // namespace

void slimlm::int8_matmul_rows(const float* x, const int8_t* q, const float* s, float* y, int64_t M, int64_t K,
                              int64_t N, int64_t r0, int64_t r1) {
  matmul_rows(x, q, s, y, M, K, N, r0, r1);
}

void slimlm::fp32_matmul_rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t r0,
                              int64_t r1) {
  matmul_rows(x, w, nullptr, y, M, K, N, r0, r1);
}

int64_t slimlm::row_group() { return ROW_GROUP; }

void slimlm::int8_matmul(const float* x, const int8_t* q, const float* s, float* y, int64_t M, int64_t K, int64_t N) {
  if (M <= 0 || N <= 0) return;
  if (M > LARGE_M) {
    at::Tensor yt = at::from_blob(y, {M, N}, at::kFloat);
    gemm_large_m(at::from_blob(const_cast<float*>(x), {M, K}, at::kFloat),
                 at::from_blob(const_cast<int8_t*>(q), {N, K}, at::kChar),
                 at::from_blob(const_cast<float*>(s), {N}, at::kFloat), yt);
  } else {
    gemm_small_m(x, q, s, y, M, K, N);
  }
}

namespace {

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale) {
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu() && scale.device().is_cpu(),
              "slimlm::int8_linear is a CPU kernel; got tensors on ", x.device(), ", ", qweight.device(), ", ",
              scale.device());
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2, "qweight must be int8 [N, K], got ",
              qweight.scalar_type(), " ", qweight.sizes());
  const int64_t N = qweight.size(0), K = qweight.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "x must be [..., ", K, "], got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(scale.numel() == N, "scale must have ", N, " elements (one per qweight row), got ", scale.numel());

  const at::Tensor x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();  // [M, K]; no copy if fp32 contiguous
  const at::Tensor q = qweight.contiguous();
  const at::Tensor s = scale.reshape({N}).to(at::kFloat).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty({M, N}, x2.options());  // [M, N] fp32
  slimlm::int8_matmul(x2.data_ptr<float>(), q.data_ptr<int8_t>(), s.data_ptr<float>(), y.data_ptr<float>(), M, K, N);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(N);
  return y.to(x.scalar_type()).view(shape);
}

std::string int8_kernel_isa() { return ISA; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(slimlm, m) {
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scale) -> Tensor");
  m.def("int8_kernel_isa() -> str", &int8_kernel_isa);
}

TORCH_LIBRARY_IMPL(slimlm, CPU, m) { m.impl("int8_linear", &int8_linear); }
