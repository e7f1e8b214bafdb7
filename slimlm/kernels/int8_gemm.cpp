// int8 weight-only GEMM for the CPU: y[M, N] = x[M, K] . (q[N, K] * s[N])^T.
//
// Registered as torch.ops.slimlm.int8_linear(x, qweight, scale) -> y (x: [..., K] fp32/bf16/fp16, y in x's
// dtype). It is what Int8WeightOnlyLinear runs on CPU in place of torch._weight_int8pack_mm, whose CPU path is
// several times slower than the memory bandwidth allows on AVX2 machines.
//
// Each row of x is first rounded to int16 with its own scale (x ~ sx * xq, |xq| <= 32767: a relative error of
// 1.5e-5 of the row's largest entry, ~250x finer than bf16), so the products are integer multiply-adds
// (AVX-512 VNNI vpdpwssd: 32 per instruction; AVX2 vpmaddwd: 16, against 8 fp32 FMAs after widening each weight to
// fp32) summed exactly in int32/int64; y = s * sx * sum. Exact integer sums make a row's result independent of the
// other rows in the batch and of the tiling: a request decodes the same tokens alone or among 15 others, and
// prefill computes what decode computes.
// Up to STREAM_M rows of x, q is read row after row (one sequential stream: memory-bound decode); more rows
// (batched decode, prefill: compute-bound) run register tiles of MR x rows by NR q rows over L1-sized blocks of q.
// Threads split the output columns with at::parallel_for (torch's intra-op pool), or the caller splits them
// (int8_matmul_rows, for decode.cpp's own parallel region). Measured on a 2-core AVX-512 VNNI EPYC (Zen 4) against
// one q row per tile: 576 -> 1536 at M = 16 in 120 vs 258 us, at M = 450 (prefill) in 2.8 vs 5.7 ms, where the
// 5.7 ms was torch's fp32 GEMM on dequantized weights, the prefill path before.
// fp32 weights (decode.cpp on unquantized models) take row-sequential tiles with FMAs.
//
// It deliberately does not: handle bias (the Python layer adds it) or run on CUDA.

#include "int8_gemm.h"
#include "simd.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace {

using namespace slimlm::simd;

// One activation row (M = 1, a decode step of one stream) is memory-bound: the weights are read row after row, so
// the whole matrix is one sequential stream (measured on an AVX2 EPYC, a 106 MB int8 matrix from DRAM at M = 1:
// 34 GB/s, level with a plain streaming read, against 18 GB/s for tiles that interleave 8 q rows, whose 576-byte runs
// are too short for the hardware prefetcher), with software prefetch PREFETCH_BYTES ahead of the stream and U
// independent accumulators along K. Several rows (batched decode, speculative verification, prefill) are
// compute-bound: register tiles of MR x rows by NR q rows (MR * NR accumulators) load each x vector once for NR
// rows and each widened weight vector once for MR rows (measured on an AVX-512 VNNI EPYC, 576 -> 1536 at M = 16:
// 146 us against 349 us for one q row per tile).
constexpr int64_t PREFETCH_BYTES = 2048;
constexpr int64_t MR_MAX = 4;          // activation rows per tile
constexpr int64_t STREAM_M = 8;        // up to this many x rows: one q row at a time, streaming
// q rows per tile (more x rows): with 512-bit vectors 4 x 4 int32 accumulators (of 32 registers); AVX2 keeps one q
// row per tile, which measured faster there than 4 x 2 tiles (16 registers).
constexpr bool WIDE = IL == 32;
constexpr int64_t NR = WIDE ? 4 : 1;
constexpr int64_t ROW_GROUP = 16;      // q rows per unit of thread work (a multiple of NR)
constexpr int64_t L1_WEIGHTS = 16384;  // weights per block kept hot in L1 while the x rows pass over it
constexpr int64_t M_CHUNK = 128;       // x rows per pass over a block (int16: 128 x K fit in L2 for K <= 2048)
constexpr int64_t MIN_MACS = 65536;    // fewer multiply-adds than this per thread: not worth waking a thread
// int8 x int16 products summed in int32 lanes: 2 * 127 * 32767 per lane and step of 16 or more, so at most 2048 of
// K per int32 partial sum (1.07e9 < 2^31); longer rows add partial sums in int64.
constexpr int64_t FLUSH_K = 2048;

// ---- int8 weights: y[i] = s * sx[i] * sum_k xq[i, k] * w[k], exact integer sums ----
// Every path below sums the same integers exactly, so a row's result does not depend on the path, the tile or the
// other rows in the call.

inline float dequant(int64_t sum, float sx, float s) {
  return static_cast<float>(static_cast<double>(sum) * sx * s);
}

// One q row w [K] against MR int16 x rows (stride K), streaming: sums [MR] in int64.
template <int MR>
inline void dot_stream(const int16_t* x, const int8_t* w, int64_t K, int64_t* sums) {
  for (int i = 0; i < MR; ++i) sums[i] = 0;
  int64_t k = 0;
#if SLIMLM_ISIMD
  constexpr int CHAINS = IL == 32 ? 2 : 4;  // independent accumulators wanted in flight
  constexpr int U = MR >= CHAINS ? 1 : CHAINS / MR;  // int32 accumulators per x row
  const char* pf = reinterpret_cast<const char*>(w) + PREFETCH_BYTES;
  while (k + IL * U <= K) {
    const int64_t end = std::min(K, k + FLUSH_K);
    IVec acc[MR][U];
    for (int i = 0; i < MR; ++i)
      for (int u = 0; u < U; ++u) acc[i][u] = izero();
    for (; k + IL * U <= end; k += IL * U) {
      if ((k & 63) < IL * U) _mm_prefetch(pf + k, _MM_HINT_T0);
      for (int u = 0; u < U; ++u) {
        const IVec wv = iload_w(w + k + IL * u);  // widened once, for all MR rows
        for (int i = 0; i < MR; ++i) acc[i][u] = idot(acc[i][u], iload_x(x + i * K + k + IL * u), wv);
      }
    }
    for (int i = 0; i < MR; ++i) {
      for (int u = 1; u < U; ++u) acc[i][0] = iadd(acc[i][0], acc[i][u]);
      sums[i] += ihsum(acc[i][0]);
    }
  }
#endif
  for (; k < K; ++k)
    for (int i = 0; i < MR; ++i) sums[i] += static_cast<int32_t>(x[i * K + k]) * w[k];
}

template <int MR>
void stream_rows(const int16_t* xq, const float* sx, const int8_t* q, const float* s, float* y, int64_t K, int64_t N,
                 int64_t n0, int64_t n1) {
  int64_t sums[MR];
  for (int64_t n = n0; n < n1; ++n) {
    dot_stream<MR>(xq, q + n * K, K, sums);
    for (int i = 0; i < MR; ++i) y[i * N + n] = dequant(sums[i], sx[i], s[n]);
  }
}

// MR int16 x rows (stride K) by R q rows (stride K): sums [MR * R] in int64, row-major.
template <int MR, int R>
inline void tile_i16(const int16_t* x, const int8_t* w, int64_t K, int64_t* sums) {
  for (int i = 0; i < MR * R; ++i) sums[i] = 0;
  int64_t k = 0;
#if SLIMLM_ISIMD
  const char* next = reinterpret_cast<const char*>(w + R * K);  // the next tile's q rows, prefetched as we go
  while (k + IL <= K) {
    const int64_t end = std::min(K, k + FLUSH_K);
    IVec acc[MR][R];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < R; ++j) acc[i][j] = izero();
    for (; k + IL <= end; k += IL) {
      if ((k & 63) < IL)
        for (int j = 0; j < R; ++j) _mm_prefetch(next + j * K + k, _MM_HINT_T0);
      IVec wv[R];
      for (int j = 0; j < R; ++j) wv[j] = iload_w(w + j * K + k);  // widened once, for all MR rows
      for (int i = 0; i < MR; ++i) {
        const IVec xv = iload_x(x + i * K + k);  // loaded once, for all R rows
        for (int j = 0; j < R; ++j) acc[i][j] = idot(acc[i][j], xv, wv[j]);
      }
    }
    for (int i = 0; i < MR; ++i) {
      if constexpr (R == 4) {
        int32_t four[4];
        ihsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3], four);
        for (int j = 0; j < 4; ++j) sums[i * R + j] += four[j];
      } else {
        for (int j = 0; j < R; ++j) sums[i * R + j] += ihsum(acc[i][j]);
      }
    }
  }
#endif
  for (; k < K; ++k)  // the tail (all of K without SIMD): the same integer sums
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < R; ++j) sums[i * R + j] += static_cast<int32_t>(x[i * K + k]) * w[j * K + k];
}

// Rows [m0, m0 + MR) of y, columns [n0, n1): NR q rows per tile, then single rows for the rest.
template <int MR>
void rows_i16(const int16_t* xq, const float* sx, const int8_t* q, const float* s, float* y, int64_t K, int64_t N,
              int64_t m0, int64_t n0, int64_t n1) {
  int64_t sums[MR * NR];
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    tile_i16<MR, NR>(xq + m0 * K, q + n * K, K, sums);
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) y[(m0 + i) * N + n + j] = dequant(sums[i * NR + j], sx[m0 + i], s[n + j]);
  }
  for (; n < n1; ++n) {
    tile_i16<MR, 1>(xq + m0 * K, q + n * K, K, sums);
    for (int i = 0; i < MR; ++i) y[(m0 + i) * N + n] = dequant(sums[i], sx[m0 + i], s[n]);
  }
}

void rows_i16_any(int64_t mr, const int16_t* xq, const float* sx, const int8_t* q, const float* s, float* y,
                  int64_t K, int64_t N, int64_t m0, int64_t n0, int64_t n1) {
  switch (mr) {
    case 4: return rows_i16<4>(xq, sx, q, s, y, K, N, m0, n0, n1);
    case 3: return rows_i16<3>(xq, sx, q, s, y, K, N, m0, n0, n1);
    case 2: return rows_i16<2>(xq, sx, q, s, y, K, N, m0, n0, n1);
    default: return rows_i16<1>(xq, sx, q, s, y, K, N, m0, n0, n1);
  }
}

// ---- fp32 weights (decode.cpp's unquantized models): y[i] = sum_k x[i, k] * w[k] ----

template <int MR>
inline void tile_f32(const float* x, const float* w, float* y, int64_t K, int64_t ldy) {
  float acc[MR];
  int64_t k = 0;
#if SLIMLM_SIMD
  // Two accumulators per x row whatever MR is, so a row's sum is added in the same order alone or in a batch.
  constexpr int U = 2;
  Vec vacc[MR][U];
  for (int i = 0; i < MR; ++i)
    for (int u = 0; u < U; ++u) vacc[i][u] = vzero();
  const char* pf = reinterpret_cast<const char*>(w) + PREFETCH_BYTES;
  for (; k + VL * U <= K; k += VL * U) {
    for (int64_t b = 0; b < VL * U * 4; b += 64) _mm_prefetch(pf + k * 4 + b, _MM_HINT_T0);
    for (int u = 0; u < U; ++u) {
      const Vec wv = load_w(w + k + u * VL);
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
  for (; k < K; ++k)
    for (int i = 0; i < MR; ++i) acc[i] += x[i * K + k] * w[k];
  for (int i = 0; i < MR; ++i) y[i * ldy] = acc[i];
}

void rows_f32_any(int64_t mr, const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t m0,
                  int64_t n0, int64_t n1) {
  const float* xm = x + m0 * K;
  float* ym = y + m0 * N;
  for (int64_t n = n0; n < n1; ++n) {
    switch (mr) {
      case 4: tile_f32<4>(xm, w + n * K, ym + n, K, N); break;
      case 3: tile_f32<3>(xm, w + n * K, ym + n, K, N); break;
      case 2: tile_f32<2>(xm, w + n * K, ym + n, K, N); break;
      default: tile_f32<1>(xm, w + n * K, ym + n, K, N);
    }
  }
}

// Columns [r0, r1) of y for all M rows: L1-sized blocks of weight rows, each used by M_CHUNK x rows, MR at a time.
template <typename Rows>
void blocked(int64_t M, int64_t K, int64_t r0, int64_t r1, int64_t weight_bytes, Rows rows) {
  const int64_t fit = L1_WEIGHTS / weight_bytes / std::max<int64_t>(1, K) / ROW_GROUP * ROW_GROUP;  // whole groups
  const int64_t block = std::max<int64_t>(ROW_GROUP, fit);
  for (int64_t mc = 0; mc < M; mc += M_CHUNK)
    for (int64_t b0 = r0; b0 < r1; b0 += block)
      for (int64_t m0 = mc; m0 < std::min(M, mc + M_CHUNK); m0 += MR_MAX)
        rows(std::min(MR_MAX, M - m0), m0, b0, std::min(r1, b0 + block));
}

// Prefill without 512-bit integer tiles (AVX2): dequantize q to fp32 a slice of rows at a time (bounded temporary) and
// use torch's GEMM (MKL/oneDNN), which ran these compute-bound shapes faster than the AVX2 integer tiles (prefill of
// 450 tokens 483 vs 423 tok/s on an AVX2 EPYC). x arrives already rounded through int16, so the result differs from
// the integer path's by fp32 round-off only, not by a rounding step of the activations. With AVX-512 the integer
// tiles win (2.0x at M = 450) and every M takes them.
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

// Above this many activation rows the GEMM path takes over (never with 512-bit tiles).
constexpr int64_t LARGE_M = WIDE ? std::numeric_limits<int64_t>::max() : 64;

}  // namespace

void slimlm::quantize_rows_i16(const float* x, int64_t M, int64_t K, int16_t* xq, float* sx) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    int16_t* qm = xq + m * K;
    int64_t k = 0;
    float amax = 0.f;
#if defined(__AVX512F__)
    __m512 vmax = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xm + k)));
    amax = _mm512_reduce_max_ps(vmax);
#endif
    for (; k < K; ++k) amax = std::max(amax, std::fabs(xm[k]));
    const float scale = amax > 0.f ? amax / 32767.f : 1.f, inv = 1.f / scale;
    sx[m] = scale;
    k = 0;
#if defined(__AVX512F__)
    // The same rounding as the scalar loop: round to nearest even (the default mode), then saturate to int16.
    const __m512 vinv = _mm512_set1_ps(inv);
    for (; k + 16 <= K; k += 16) {
      const __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xm + k), vinv));
      const __m512i c = _mm512_max_epi32(_mm512_min_epi32(r, _mm512_set1_epi32(32767)), _mm512_set1_epi32(-32767));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qm + k), _mm512_cvtepi32_epi16(c));
    }
#endif
    for (; k < K; ++k)
      qm[k] = static_cast<int16_t>(std::max(-32767.f, std::min(32767.f, std::nearbyint(xm[k] * inv))));
  }
}

void slimlm::int8_matmul_rows(const int16_t* xq, const float* sx, const int8_t* q, const float* s, float* y,
                              int64_t M, int64_t K, int64_t N, int64_t r0, int64_t r1) {
  if (M <= STREAM_M) {
    switch (M) {
      case 1: return stream_rows<1>(xq, sx, q, s, y, K, N, r0, r1);
      case 2: return stream_rows<2>(xq, sx, q, s, y, K, N, r0, r1);
      case 3: return stream_rows<3>(xq, sx, q, s, y, K, N, r0, r1);
      case 4: return stream_rows<4>(xq, sx, q, s, y, K, N, r0, r1);
      case 5: return stream_rows<5>(xq, sx, q, s, y, K, N, r0, r1);
      case 6: return stream_rows<6>(xq, sx, q, s, y, K, N, r0, r1);
      case 7: return stream_rows<7>(xq, sx, q, s, y, K, N, r0, r1);
      default: return stream_rows<8>(xq, sx, q, s, y, K, N, r0, r1);
    }
  }
  blocked(M, K, r0, r1, 1, [&](int64_t mr, int64_t m0, int64_t n0, int64_t n1) {
    rows_i16_any(mr, xq, sx, q, s, y, K, N, m0, n0, n1);
  });
}

void slimlm::fp32_matmul_rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t r0,
                              int64_t r1) {
  blocked(M, K, r0, r1, 4, [&](int64_t mr, int64_t m0, int64_t n0, int64_t n1) {
    rows_f32_any(mr, x, w, y, K, N, m0, n0, n1);
  });
}

int64_t slimlm::row_group() { return ROW_GROUP; }

void slimlm::int8_matmul(const float* x, const int8_t* q, const float* s, float* y, int64_t M, int64_t K, int64_t N) {
  if (M <= 0 || N <= 0) return;
  std::vector<int16_t> xq(M * K);
  std::vector<float> sx(M);
  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, K)), [&](int64_t m0, int64_t m1) {
    quantize_rows_i16(x + m0 * K, m1 - m0, K, xq.data() + m0 * K, sx.data() + m0);
  });
  if (M > LARGE_M) {  // prefill on AVX2: the same int16-rounded rows, multiplied by torch's GEMM
    at::Tensor xd = at::from_blob(xq.data(), {M, K}, at::kShort).to(at::kFloat)
                        .mul_(at::from_blob(sx.data(), {M, 1}, at::kFloat));
    at::Tensor yt = at::from_blob(y, {M, N}, at::kFloat);
    gemm_large_m(xd, at::from_blob(const_cast<int8_t*>(q), {N, K}, at::kChar),
                 at::from_blob(const_cast<float*>(s), {N}, at::kFloat), yt);
    return;
  }
  const int64_t groups = (N + ROW_GROUP - 1) / ROW_GROUP;
  const int64_t grain = std::max<int64_t>(1, MIN_MACS / std::max<int64_t>(1, ROW_GROUP * K * M));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    int8_matmul_rows(xq.data(), sx.data(), q, s, y, M, K, N, g0 * ROW_GROUP, std::min(N, g1 * ROW_GROUP));
  });
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
