// The decoder layers of one decode step in one call: torch.ops.slimlm.decode_layers.
//
// A decode step of a small model on a CPU is mostly overhead: SmolLM2-135M runs ~55 torch ops and ~12 module
// calls per layer, 30 layers, for vectors of 576 floats, and eager PyTorch spends ~16 ms per step on that against
// ~8 ms reading the weights. This op runs every layer of the Llama block for W rows (one new token each) as plain
// loops over preallocated buffers, so a step costs the weight reads plus a few microseconds per layer:
//
//   h = rmsnorm(x) * norm1;  q, k, v = h Wq^T, h Wk^T, h Wv^T;  rope(q, k) at each row's position
//   write k, v into the row's cache slot;  a = softmax(q K^T / sqrt(hd)) V over positions [start, pos]
//   x += a Wo^T;  h = rmsnorm(x) * norm2;  x += (silu(h Wg^T) * h Wu^T) Wd^T
//
// It is the same arithmetic as slimlm/model.py (fp32 throughout; HF's rotate-half RoPE; GQA by head groups) and
// is tested against it. Weights are int8 (+ fp32 scale per output row, read by int8_matmul) or fp32 (torch's GEMM).
// The Python side (engine/fused_decode.py) decides when the model qualifies; this file assumes it does.

#include "int8_gemm.h"
#include "simd.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <utility>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using namespace slimlm::simd;

constexpr int64_t PER_LAYER = 16;  // tensors per layer in `layers`, in this order:
// norm1, wq, sq, wk, sk, wv, sv, wo, so, norm2, wg, sg, wu, su, wd, sd   (s*: scale [N], or an empty tensor)

// A projection's input [M, K]: fp32 (for fp32 weights) and its int16 rows with their scales (for int8 weights,
// see int8_gemm.cpp), made once per input and shared by the projections that read it.
struct Act {
  const float* x;
  int16_t* xq;
  float* sx;
  int64_t K;

  void quantize_row(int64_t m) const { slimlm::quantize_rows_i16(x + m * K, 1, K, xq + m * K, sx + m); }
};

// The rows of one step that use LoRA slot `slot` (rows with an adapter, grouped so that each slot's A and B^T are
// read once per step however many rows use it).
struct LoraGroup {
  int64_t slot;
  std::vector<int64_t> rows;
};

// A projection's LoRA slots (engine/multi_lora.py): A [S + 1, r, K] and B^T [S + 1, r, N] fp32 with the scaling
// folded into B. A row that uses slot s adds (x . A[s]^T) . B^T[s] to its output; rows without an adapter skip both
// products. h [W, r] holds each adapter row's x . A[s]^T, made before the projection runs.
struct Lora {
  const float* A = nullptr;
  const float* Bt = nullptr;
  int64_t r = 0;
  float* h = nullptr;

  // h[m] <- x_m . A[s]^T for the group's rows x_m [K]: four rows of A at a time, each used by every row of the group.
  void down(const float* x, int64_t K, const LoraGroup& grp) const {
    const float* a = A + grp.slot * r * K;
    int64_t j = 0;
#if SLIMLM_SIMD
    if (K % VL == 0)
      for (; j + 4 <= r; j += 4)
        for (const int64_t m : grp.rows) {
          const float* xm = x + m * K;
          Vec acc[4] = {vzero(), vzero(), vzero(), vzero()};
          for (int64_t k = 0; k < K; k += VL) {
            const Vec xv = load_x(xm + k);
            for (int i = 0; i < 4; ++i) acc[i] = vfma(xv, load_x(a + (j + i) * K + k), acc[i]);
          }
          hsum4(acc[0], acc[1], acc[2], acc[3], h + m * r + j);
        }
#endif
    for (; j < r; ++j)
      for (const int64_t m : grp.rows) {
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k) acc += x[m * K + k] * a[j * K + k];
        h[m * r + j] = acc;
      }
  }

  // y [M, N] columns [r0, r1) += h[m] . B^T[s] for each group's rows m: each B^T row slice read once per group.
  void up(const std::vector<LoraGroup>& groups, int64_t N, float* y, int64_t r0, int64_t r1) const {
    for (const LoraGroup& grp : groups)
      for (int64_t j = 0; j < r; ++j) {
        const float* b = Bt + (grp.slot * r + j) * N;
        for (const int64_t m : grp.rows) {
          const float c = h[m * r + j];
          float* ym = y + m * N;
#pragma omp simd
          for (int64_t n = r0; n < r1; ++n) ym[n] += c * b[n];
        }
      }
  }
};

// One projection's weight: int8 [N, K] with a row scale [N], or fp32 [N, K] (scale == nullptr), and its LoRA slots.
struct Proj {
  const void* w = nullptr;
  const float* scale = nullptr;
  int64_t N = 0, K = 0;
  Lora lora;

  static Proj of(const at::Tensor& w, const at::Tensor& s) {
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && (w.scalar_type() == at::kChar || w.scalar_type() == at::kFloat),
                "decode_layers: a weight must be a contiguous int8 or fp32 [N, K] tensor");
    const bool q = w.scalar_type() == at::kChar;
    TORCH_CHECK(!q || (s.scalar_type() == at::kFloat && s.numel() == w.size(0) && s.is_contiguous()),
                "decode_layers: an int8 weight needs an fp32 scale per row");
    return {w.data_ptr(), q ? s.data_ptr<float>() : nullptr, w.size(0), w.size(1)};
  }

  // Its LoRA slots A [S + 1, r, K], B^T [S + 1, r, N] (empty tensors: none) and room for h [W, r].
  void attach(const at::Tensor& A, const at::Tensor& Bt, std::vector<float>& h, int64_t W) {
    if (A.numel() == 0) return;
    TORCH_CHECK(A.scalar_type() == at::kFloat && Bt.scalar_type() == at::kFloat && A.is_contiguous() &&
                    Bt.is_contiguous() && A.dim() == 3 && Bt.dim() == 3 && A.size(2) == K && Bt.size(2) == N &&
                    A.size(1) == Bt.size(1) && A.size(0) == Bt.size(0),
                "decode_layers: LoRA slots must be fp32 A [S + 1, r, K] and B^T [S + 1, r, N] matching the weight");
    h.assign(W * A.size(1), 0.f);
    lora = {A.data_ptr<float>(), Bt.data_ptr<float>(), A.size(1), h.data()};
  }

  // Output columns [r0, r1) of y [M, N] = x [M, K] . W^T (+ the LoRA terms of the groups' rows), on this thread.
  void rows(const Act& x, int64_t M, float* y, int64_t r0, int64_t r1, const std::vector<LoraGroup>& groups) const {
    if (r0 >= r1) return;
    if (scale != nullptr)
      slimlm::int8_matmul_rows(x.xq, x.sx, static_cast<const int8_t*>(w), scale, y, M, K, N, r0, r1);
    else
      slimlm::fp32_matmul_rows(x.x, static_cast<const float*>(w), y, M, K, N, r0, r1);
    if (lora.A != nullptr) lora.up(groups, N, y, r0, r1);
  }
};

// The LoRA down-projections of the projections that read x, one work item per (projection, adapter group), split
// among the threads (the caller's barrier ends them).
void lora_down(const Act& x, std::initializer_list<const Proj*> projs, const std::vector<LoraGroup>& groups) {
  if (groups.empty()) return;
  const int64_t G = static_cast<int64_t>(groups.size()), P = static_cast<int64_t>(projs.size());
#pragma omp for schedule(static)
  for (int64_t item = 0; item < P * G; ++item) {
    const Proj* pr = projs.begin()[item / G];
    if (pr->lora.A != nullptr) pr->lora.down(x.x, x.K, groups[item % G]);
  }
}

struct Layer {
  const float* norm1;
  const float* norm2;
  Proj q, k, v, o, gate, up, down;
};

// This thread's share of the output columns of projections that all read x [M, K]: their columns are counted as
// one run [q | k | v] and cut into equal runs of whole row groups, one per thread, so one barrier ends them all.
void share(const Act& x, int64_t M, std::initializer_list<std::pair<const Proj*, float*>> projs, int tid,
           int nth, const std::vector<LoraGroup>& lora) {
  int64_t total = 0;
  for (const auto& pr : projs) total += pr.first->N;
  const int64_t G = slimlm::row_group(), groups = (total + G - 1) / G;
  const int64_t a = groups * tid / nth * G, b = std::min(total, groups * (tid + 1) / nth * G);
  int64_t off = 0;
  for (const auto& pr : projs) {
    const int64_t N = pr.first->N;
    pr.first->rows(x, M, pr.second, std::max(a, off) - off, std::min(b, off + N) - off, lora);
    off += N;
  }
}

// out [M, D] = x / rms(x) * w, row by row (as RMSNorm.forward: normalise in fp32, then scale).
void rmsnorm(const float* x, const float* w, float* out, int64_t M, int64_t D, float eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * D;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t d = 0; d < D; ++d) ss += xm[d] * xm[d];
    const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
    float* om = out + m * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) om[d] = w[d] * (xm[d] * r);
  }
}

// Rotate each of n heads [hd] of v in place by the angles pos * inv_freq (HF's half-split layout).
void rope(float* v, int64_t n, int64_t hd, const float* cos_, const float* sin_) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < n; ++h) {
    float* x = v + h * hd;
    for (int64_t j = 0; j < half; ++j) {
      const float x1 = x[j], x2 = x[j + half];
      x[j] = x1 * cos_[j] - x2 * sin_[j];
      x[j + half] = x2 * cos_[j + half] + x1 * sin_[j + half];
    }
  }
}

// ---- the cache: fp32 or fp16 entries (the engine's default on a CPU: half the bytes that attention reads) ----

// Rounded to nearest even, as torch's fp32 -> fp16 copy does, so both paths write the same cache entries.
inline void from_f32(const float* src, int64_t n, float* dst) { std::copy_n(src, n, dst); }
inline void from_f32(const float* src, int64_t n, at::Half* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<at::Half>(src[i]);
}

// p [n] <- exp(p - m); returns their sum. Vectors then a scalar tail: which entries take which path depends on n
// alone, so a row's result does not depend on the batch.
float exp_shifted(float* p, int64_t n, float m) {
  int64_t t = 0;
  float sum = 0.f;
#if SLIMLM_SIMD
  Vec acc = vzero();
  for (; t + VL <= n; t += VL) {
    const Vec e = vexp(vadd(load_x(p + t), vset1(-m)));
    store(p + t, e);
    acc = vadd(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; t < n; ++t) sum += (p[t] = std::exp(p[t] - m));
  return sum;
}

constexpr int64_t BLOCK_T = 64;  // cache positions per block of the online softmax

// Online softmax of a block: per head, the new running max, the rescale factor c of what earlier blocks added, the
// running sum; s <- exp(s - max).
inline void softmax_block(float* s, int64_t G, int64_t n, float* m, float* l, float* c) {
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * BLOCK_T;
    const float m_new = std::max(m[g], *std::max_element(sg, sg + n));
    c[g] = std::exp(m[g] - m_new);  // 0 before the first block (m = -inf)
    l[g] = l[g] * c[g] + exp_shifted(sg, n, m_new);
    m[g] = m_new;
  }
}


#if SLIMLM_SIMD
inline Vec load_kv(const float* p) { return load_x(p); }
#if SLIMLM_F16
inline Vec load_kv(const at::Half* p) { return load_h(p); }
#endif

// s [GC][BLOCK_T] <- scale * q_g . K[t] for GC query heads q [GC, NV * VL] and keys K[0 .. n), four keys at a time:
// each key vector is loaded (and converted) once for the GC heads, and one hsum4 reduces four dot products.
template <int GC, int NV, typename T>
void qk_block(const float* q, const T* K, int64_t n, float scale, float* s) {
  constexpr int64_t hd = NV * VL;
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    Vec acc[GC][4];
    for (int g = 0; g < GC; ++g)
      for (int i = 0; i < 4; ++i) acc[g][i] = vzero();
    for (int j = 0; j < NV; ++j) {
      Vec kv[4];
      for (int i = 0; i < 4; ++i) kv[i] = load_kv(K + (t + i) * hd + j * VL);
      for (int g = 0; g < GC; ++g) {
        const Vec qv = load_x(q + g * hd + j * VL);
        for (int i = 0; i < 4; ++i) acc[g][i] = vfma(qv, kv[i], acc[g][i]);
      }
    }
    for (int g = 0; g < GC; ++g) {
      float four[4];
      hsum4(acc[g][0], acc[g][1], acc[g][2], acc[g][3], four);
      for (int i = 0; i < 4; ++i) s[g * BLOCK_T + t + i] = four[i] * scale;
    }
  }
  for (; t < n; ++t)
    for (int g = 0; g < GC; ++g) {
      Vec acc = vzero();
      for (int j = 0; j < NV; ++j) acc = vfma(load_x(q + g * hd + j * VL), load_kv(K + t * hd + j * VL), acc);
      s[g * BLOCK_T + t] = hsum(acc) * scale;
    }
}

// out [GC, hd] = c_g * out_g + sum_t p[g][t] V[t] over t in [0, n): each value vector loaded once for GC heads.
template <int GC, int NV, typename T>
void pv_block(const float* p, const T* V, int64_t n, const float* c, float* out) {
  constexpr int64_t hd = NV * VL;
  Vec acc[GC][NV];
  for (int g = 0; g < GC; ++g)
    for (int j = 0; j < NV; ++j) acc[g][j] = vmul(load_x(out + g * hd + j * VL), vset1(c[g]));
  for (int64_t t = 0; t < n; ++t) {
    Vec vv[NV];
    for (int j = 0; j < NV; ++j) vv[j] = load_kv(V + t * hd + j * VL);
    for (int g = 0; g < GC; ++g) {
      const Vec pt = vset1(p[g * BLOCK_T + t]);
      for (int j = 0; j < NV; ++j) acc[g][j] = vfma(pt, vv[j], acc[g][j]);
    }
  }
  for (int g = 0; g < GC; ++g)
    for (int j = 0; j < NV; ++j) store(out + g * hd + j * VL, acc[g][j]);
}

// The G query heads q [G, hd] that share one key/value head, over cache positions [t0, t1] of K, V [*, hd]:
// out [G, hd] = softmax(q . K[t] / sqrt(hd)) . V[t], with hd = NV * VL. Blocks of BLOCK_T positions with a running
// max and sum per head (online softmax); keys and values are read straight from the cache (fp16 converted in
// registers), each once per block for up to GC heads. buf: G * BLOCK_T + 3 * G floats.
template <int NV, typename T>
void attend_group_simd(const float* q, int64_t G, const T* K, const T* V, int64_t t0, int64_t t1, float scale,
                       float* buf, float* out) {
  constexpr int64_t hd = NV * VL;
  constexpr int QC = 4, PC = NV <= 4 ? 4 : 16 / NV;  // heads per pass: registers for QC x 4 dot products, PC x NV sums
  float *s = buf, *m = s + G * BLOCK_T, *l = m + G, *c = l + G;
  std::fill(out, out + G * hd, 0.f);
  std::fill(m, m + G, -std::numeric_limits<float>::infinity());
  std::fill(l, l + G, 0.f);
  for (int64_t b0 = t0; b0 <= t1; b0 += BLOCK_T) {
    const int64_t n = std::min(BLOCK_T, t1 - b0 + 1);
    const T* Kb = K + b0 * hd;
    const T* Vb = V + b0 * hd;
    for (int64_t g = 0; g < G; g += QC) {
      switch (std::min<int64_t>(QC, G - g)) {
        case 4: qk_block<4, NV>(q + g * hd, Kb, n, scale, s + g * BLOCK_T); break;
        case 3: qk_block<3, NV>(q + g * hd, Kb, n, scale, s + g * BLOCK_T); break;
        case 2: qk_block<2, NV>(q + g * hd, Kb, n, scale, s + g * BLOCK_T); break;
        default: qk_block<1, NV>(q + g * hd, Kb, n, scale, s + g * BLOCK_T);
      }
    }
    softmax_block(s, G, n, m, l, c);
    for (int64_t g = 0; g < G; g += PC) {
      const int64_t gc = std::min<int64_t>(PC, G - g);
      float* o = out + g * hd;
      if (gc == 4) pv_block<(PC >= 4 ? 4 : 1), NV>(s + g * BLOCK_T, Vb, n, c + g, o);
      else if (gc == 3) pv_block<(PC >= 3 ? 3 : 1), NV>(s + g * BLOCK_T, Vb, n, c + g, o);
      else if (gc == 2) pv_block<(PC >= 2 ? 2 : 1), NV>(s + g * BLOCK_T, Vb, n, c + g, o);
      else pv_block<1, NV>(s + g * BLOCK_T, Vb, n, c + g, o);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < hd; ++d) out[g * hd + d] /= l[g];
}
#endif

// Scalar attention for head sizes the vector code does not take (and CPUs without SIMD): the same blocks.
template <typename T>
void attend_group_scalar(const float* q, int64_t G, const T* K, const T* V, int64_t hd, int64_t t0, int64_t t1,
                         float scale, float* buf, float* out) {
  float *s = buf, *m = s + G * BLOCK_T, *l = m + G, *c = l + G;
  std::fill(out, out + G * hd, 0.f);
  std::fill(m, m + G, -std::numeric_limits<float>::infinity());
  std::fill(l, l + G, 0.f);
  for (int64_t b0 = t0; b0 <= t1; b0 += BLOCK_T) {
    const int64_t n = std::min(BLOCK_T, t1 - b0 + 1);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t t = 0; t < n; ++t) {
        float acc = 0.f;
        for (int64_t d = 0; d < hd; ++d) acc += q[g * hd + d] * static_cast<float>(K[(b0 + t) * hd + d]);
        s[g * BLOCK_T + t] = acc * scale;
      }
    softmax_block(s, G, n, m, l, c);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < hd; ++d) {
        float acc = out[g * hd + d] * c[g];
        for (int64_t t = 0; t < n; ++t) acc += s[g * BLOCK_T + t] * static_cast<float>(V[(b0 + t) * hd + d]);
        out[g * hd + d] = acc;
      }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < hd; ++d) out[g * hd + d] /= l[g];
}

// Dispatch on the head size: vector code for hd of 1, 2, 4 or 8 vectors (AVX-512: 16 .. 128; AVX2: 8 .. 64).
template <typename T>
void attend_group(const float* q, int64_t group, const T* K, const T* V, int64_t hd, int64_t t0, int64_t t1,
                  float scale, float* buf, float* out) {
#if SLIMLM_SIMD
  const bool vec = hd % VL == 0 && (std::is_same_v<T, float> || SLIMLM_F16);
  switch (vec ? hd / VL : 0) {
    case 1: return attend_group_simd<1>(q, group, K, V, t0, t1, scale, buf, out);
    case 2: return attend_group_simd<2>(q, group, K, V, t0, t1, scale, buf, out);
    case 4: return attend_group_simd<4>(q, group, K, V, t0, t1, scale, buf, out);
    case 8: return attend_group_simd<8>(q, group, K, V, t0, t1, scale, buf, out);
    default: break;
  }
#endif
  attend_group_scalar(q, group, K, V, hd, t0, t1, scale, buf, out);
}

// silu(g) * u in place over g [n] (vectors, then a scalar tail that depends on n alone).
void silu_mul(float* g, const float* u, int64_t n) {
  int64_t j = 0;
#if SLIMLM_SIMD
  for (; j + VL <= n; j += VL) {
    const Vec x = load_x(g + j);
    const Vec e = vexp(vmul(x, vset1(-1.f)));
    store(g + j, vmul(vdiv(x, vadd(vset1(1.f), e)), load_x(u + j)));
  }
#endif
  for (; j < n; ++j) g[j] = g[j] / (1.f + std::exp(-g[j])) * u[j];
}

// x [W, D] fp32 (the embedded tokens); slots, positions [W] int64: each row's cache slot and position.
// layers: PER_LAYER tensors per layer; k_cache, v_cache: [n_slots, Hkv, S, hd] of T (fp32 or fp16) per layer,
// written in place. window: sliding-window size (0: none). Returns the hidden states after the last layer [W, D]
// (not final-normed).
template <typename T>
at::Tensor decode_layers_impl(const at::Tensor& x_in, const at::Tensor& slots, const at::Tensor& positions,
                              const at::Tensor& inv_freq, at::TensorList layers, at::TensorList k_cache,
                              at::TensorList v_cache, double eps, int64_t window, at::TensorList lora,
                              const at::Tensor& lora_rows) {
  const int64_t L = static_cast<int64_t>(k_cache.size());
  at::Tensor x = x_in.clone(at::MemoryFormat::Contiguous);  // [W, D], updated layer by layer (the residual stream)
  const int64_t W = x.size(0), D = x.size(1);
  const at::Tensor sl = slots.to(at::kLong).contiguous(), pos = positions.to(at::kLong).contiguous();
  const int64_t* slot = sl.data_ptr<int64_t>();
  const int64_t* p = pos.data_ptr<int64_t>();
  const int64_t hd = k_cache[0].size(3), half = hd / 2;

  // cos/sin [W, hd] for each row's position, computed as rope_cos_sin does: fp32 angle pos * inv_freq, duplicated.
  const at::Tensor inv = inv_freq.to(at::kFloat).contiguous();
  std::vector<float> cos_(W * hd), sin_(W * hd);
  for (int64_t w = 0; w < W; ++w)
    for (int64_t j = 0; j < half; ++j) {
      const float a = static_cast<float>(p[w]) * inv.data_ptr<float>()[j];
      cos_[w * hd + j] = cos_[w * hd + j + half] = std::cos(a);
      sin_[w * hd + j] = sin_[w * hd + j + half] = std::sin(a);
    }

  // LoRA: each row's slot (-1: no adapter), or none at all when no row uses one.
  const at::Tensor lr = lora_rows.numel() ? lora_rows.to(at::kLong).contiguous() : lora_rows;
  const int64_t* lslot = lora_rows.numel() && !lora.empty() ? lr.data_ptr<int64_t>() : nullptr;
  TORCH_CHECK(lslot == nullptr || (lr.numel() == W && static_cast<int64_t>(lora.size()) == L * 14),
              "decode_layers: lora needs 14 tensors per layer (A, B^T of q, k, v, o, gate, up, down) and one slot per row");
  std::vector<std::vector<float>> lora_h(lslot ? L * 7 : 0);  // each projection's h [W, r]
  std::vector<LoraGroup> groups;  // the rows of each slot in use, slots in order of first use
  for (int64_t w = 0; lslot != nullptr && w < W; ++w) {
    if (lslot[w] < 0) continue;
    auto it = std::find_if(groups.begin(), groups.end(), [&](const LoraGroup& g) { return g.slot == lslot[w]; });
    if (it == groups.end()) groups.push_back({lslot[w], {w}});
    else it->rows.push_back(w);
  }

  std::vector<Layer> lay(L);
  int64_t max_q = 0, max_kv = 0, max_ff = 0, max_group = 1;
  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor* t = layers.data() + i * PER_LAYER;
    lay[i] = {t[0].data_ptr<float>(), t[9].data_ptr<float>(), Proj::of(t[1], t[2]), Proj::of(t[3], t[4]),
              Proj::of(t[5], t[6]), Proj::of(t[7], t[8]), Proj::of(t[10], t[11]), Proj::of(t[12], t[13]),
              Proj::of(t[14], t[15])};
    if (lslot != nullptr) {
      Proj* projs[7] = {&lay[i].q, &lay[i].k, &lay[i].v, &lay[i].o, &lay[i].gate, &lay[i].up, &lay[i].down};
      for (int j = 0; j < 7; ++j) projs[j]->attach(lora[(i * 7 + j) * 2], lora[(i * 7 + j) * 2 + 1], lora_h[i * 7 + j], W);
    }
    TORCH_CHECK(k_cache[i].scalar_type() == k_cache[0].scalar_type() &&
                    v_cache[i].scalar_type() == k_cache[0].scalar_type() && k_cache[i].is_contiguous() &&
                    v_cache[i].is_contiguous() && k_cache[i].size(3) == hd && lay[i].k.N == k_cache[i].size(1) * hd &&
                    lay[i].q.N % lay[i].k.N == 0,
                "decode_layers: layer ", i, "'s cache must be [slots, Hkv, S, hd] of the first layer's dtype, "
                "matching its k projection");
    max_q = std::max(max_q, lay[i].q.N);
    max_kv = std::max(max_kv, lay[i].k.N);
    max_ff = std::max(max_ff, lay[i].gate.N);
    max_group = std::max(max_group, lay[i].q.N / lay[i].k.N);
  }
  std::vector<float> h(W * D), q(W * max_q), k(W * max_kv), v(W * max_kv), a(W * max_q), g(W * max_ff),
      u(W * max_ff), o(W * D), sx(W);
  std::vector<int16_t> xq(W * std::max({D, max_q, max_ff}));
  float* xp = x.data_ptr<float>();
  const float e = static_cast<float>(eps), scale = 1.f / std::sqrt(static_cast<float>(hd));
  constexpr int64_t SILU_CHUNK = 256;  // silu work items: a row's gate/up in chunks (scalar tails at row ends only)
  // One parallel region for the whole step: the threads meet at a barrier between dependent phases (~1 us)
  // instead of forking and joining for each of the layer's seven matmuls. Serial phases (norms, RoPE) are tiny.
  const int nt = at::in_parallel_region() ? 1 : at::get_num_threads();
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    std::vector<float> buf(max_group * (BLOCK_T + 3));  // attend_group's scratch
    for (int64_t i = 0; i < L; ++i) {
      const Layer& ly = lay[i];
      const int64_t Hq = ly.q.N / hd, Hkv = ly.k.N / hd, S = k_cache[i].size(2), F = ly.gate.N, group = Hq / Hkv;
      T* Kc = k_cache[i].data_ptr<T>();
      T* Vc = v_cache[i].data_ptr<T>();
      // Attention.
      const Act hn{h.data(), xq.data(), sx.data(), D}, an{a.data(), xq.data(), sx.data(), ly.o.K},
          gn{g.data(), xq.data(), sx.data(), F};
      // Per-row phases (norms, activation rounding, RoPE, cache writes, residuals) split the rows among threads.
#pragma omp for schedule(static)
      for (int64_t w = 0; w < W; ++w) {
        rmsnorm(xp + w * D, ly.norm1, h.data() + w * D, 1, D, e);
        hn.quantize_row(w);
      }
      lora_down(hn, {&ly.q, &ly.k, &ly.v}, groups);
      share(hn, W, {{&ly.q, q.data()}, {&ly.k, k.data()}, {&ly.v, v.data()}}, tid, nth, groups);
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t w = 0; w < W; ++w) {
        rope(q.data() + w * Hq * hd, Hq, hd, cos_.data() + w * hd, sin_.data() + w * hd);
        rope(k.data() + w * Hkv * hd, Hkv, hd, cos_.data() + w * hd, sin_.data() + w * hd);
        for (int64_t kh = 0; kh < Hkv; ++kh) {  // cache [slot, kh, p, :] <- this row's key and value
          const int64_t off = ((slot[w] * Hkv + kh) * S + p[w]) * hd;
          from_f32(k.data() + (w * Hkv + kh) * hd, hd, Kc + off);
          from_f32(v.data() + (w * Hkv + kh) * hd, hd, Vc + off);
        }
      }
      // One work item per row and key/value head: its `group` query heads are consecutive in q and a. Dealt out
      // round-robin: the rows of a prompt chunk attend over more and more positions.
#pragma omp for schedule(static, 1)
      for (int64_t b = 0; b < W * Hkv; ++b) {
        const int64_t w = b / Hkv, kh = b % Hkv;
        const int64_t base = (slot[w] * Hkv + kh) * S * hd;
        const int64_t t0 = window > 0 ? std::max<int64_t>(0, p[w] - window + 1) : 0;
        attend_group(q.data() + b * group * hd, group, Kc + base, Vc + base, hd, t0, p[w], scale, buf.data(),
                     a.data() + b * group * hd);
      }
#pragma omp for schedule(static)
      for (int64_t w = 0; w < W; ++w) an.quantize_row(w);
      lora_down(an, {&ly.o}, groups);
      share(an, W, {{&ly.o, o.data()}}, tid, nth, groups);
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t w = 0; w < W; ++w) {
        for (int64_t j = w * D; j < (w + 1) * D; ++j) xp[j] += o[j];
        rmsnorm(xp + w * D, ly.norm2, h.data() + w * D, 1, D, e);
        hn.quantize_row(w);
      }
      lora_down(hn, {&ly.gate, &ly.up}, groups);
      // MLP.
      share(hn, W, {{&ly.gate, g.data()}, {&ly.up, u.data()}}, tid, nth, groups);
#pragma omp barrier
      const int64_t chunks = (F + SILU_CHUNK - 1) / SILU_CHUNK;
#pragma omp for schedule(static)
      for (int64_t c = 0; c < W * chunks; ++c) {
        const int64_t j0 = (c / chunks) * F + (c % chunks) * SILU_CHUNK;
        silu_mul(g.data() + j0, u.data() + j0, std::min(SILU_CHUNK, F - (c % chunks) * SILU_CHUNK));
      }
#pragma omp for schedule(static)
      for (int64_t w = 0; w < W; ++w) gn.quantize_row(w);
      lora_down(gn, {&ly.down}, groups);
      share(gn, W, {{&ly.down, o.data()}}, tid, nth, groups);
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t j = 0; j < W * D; ++j) xp[j] += o[j];
    }
  }
  return x;
}

at::Tensor decode_layers(const at::Tensor& x_in, const at::Tensor& slots, const at::Tensor& positions,
                         const at::Tensor& inv_freq, at::TensorList layers, at::TensorList k_cache,
                         at::TensorList v_cache, double eps, int64_t window, at::TensorList lora,
                         const at::Tensor& lora_rows) {
  const int64_t L = static_cast<int64_t>(k_cache.size());
  TORCH_CHECK(L > 0, "decode_layers: no layers");
  TORCH_CHECK(static_cast<int64_t>(layers.size()) == L * PER_LAYER && static_cast<int64_t>(v_cache.size()) == L,
              "decode_layers: expected ", PER_LAYER, " tensors and one k and v cache per layer");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 2, "decode_layers: x must be fp32 [W, D]");
  switch (k_cache[0].scalar_type()) {
    case at::kFloat:
      return decode_layers_impl<float>(x_in, slots, positions, inv_freq, layers, k_cache, v_cache, eps, window, lora,
                                       lora_rows);
    case at::kHalf:
      return decode_layers_impl<at::Half>(x_in, slots, positions, inv_freq, layers, k_cache, v_cache, eps, window,
                                          lora, lora_rows);
    default:
      TORCH_CHECK(false, "decode_layers: the KV cache must be fp32 or fp16, got ", k_cache[0].scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slimlm, m) {
  m.def("decode_layers(Tensor x, Tensor slots, Tensor positions, Tensor inv_freq, Tensor[] layers, "
        "Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, float eps, int window, Tensor[] lora, Tensor lora_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(slimlm, CPU, m) { m.impl("decode_layers", &decode_layers); }
