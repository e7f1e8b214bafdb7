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
#include <vector>

namespace {

constexpr int64_t PER_LAYER = 16;  // tensors per layer in `layers`, in this order:
// norm1, wq, sq, wk, sk, wv, sv, wo, so, norm2, wg, sg, wu, su, wd, sd   (s*: scale [N], or an empty tensor)

// A projection's input [M, K]: fp32 (for fp32 weights) and its int16 rows with their scales (for int8 weights,
// see int8_gemm.cpp), made once per input and shared by the projections that read it.
struct Act {
  const float* x;
  int16_t* xq;
  float* sx;
  int64_t K;

  const Act& quantize(int64_t M) const {
    slimlm::quantize_rows_i16(x, M, K, xq, sx);
    return *this;
  }
};

// One projection's weight: int8 [N, K] with a row scale [N], or fp32 [N, K] (scale == nullptr).
struct Proj {
  const void* w = nullptr;
  const float* scale = nullptr;
  int64_t N = 0, K = 0;

  static Proj of(const at::Tensor& w, const at::Tensor& s) {
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && (w.scalar_type() == at::kChar || w.scalar_type() == at::kFloat),
                "decode_layers: a weight must be a contiguous int8 or fp32 [N, K] tensor");
    const bool q = w.scalar_type() == at::kChar;
    TORCH_CHECK(!q || (s.scalar_type() == at::kFloat && s.numel() == w.size(0) && s.is_contiguous()),
                "decode_layers: an int8 weight needs an fp32 scale per row");
    return {w.data_ptr(), q ? s.data_ptr<float>() : nullptr, w.size(0), w.size(1)};
  }

  // Output columns [r0, r1) of y [M, N] = x [M, K] . W^T, on this thread.
  void rows(const Act& x, int64_t M, float* y, int64_t r0, int64_t r1) const {
    if (r0 >= r1) return;
    if (scale != nullptr)
      slimlm::int8_matmul_rows(x.xq, x.sx, static_cast<const int8_t*>(w), scale, y, M, K, N, r0, r1);
    else
      slimlm::fp32_matmul_rows(x.x, static_cast<const float*>(w), y, M, K, N, r0, r1);
  }
};

struct Layer {
  const float* norm1;
  const float* norm2;
  Proj q, k, v, o, gate, up, down;
};

// This thread's share of the output columns of projections that all read x [M, K]: their columns are counted as
// one run [q | k | v] and cut into equal runs of whole row groups, one per thread, so one barrier ends them all.
void share(const Act& x, int64_t M, std::initializer_list<std::pair<const Proj*, float*>> projs, int tid,
           int nth) {
  int64_t total = 0;
  for (const auto& pr : projs) total += pr.first->N;
  const int64_t G = slimlm::row_group(), groups = (total + G - 1) / G;
  const int64_t a = groups * tid / nth * G, b = std::min(total, groups * (tid + 1) / nth * G);
  int64_t off = 0;
  for (const auto& pr : projs) {
    const int64_t N = pr.first->N;
    pr.first->rows(x, M, pr.second, std::max(a, off) - off, std::min(b, off + N) - off);
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

using namespace slimlm::simd;

// scores[t] = q . K[t] * scale for t in [t0, t1]; K: [*, hd] rows. Four keys at a time, so that four independent
// FMA chains run (one dot product alone waits on its accumulator at every step).
void qk_scores(const float* q, const float* K, int64_t hd, int64_t t0, int64_t t1, float scale, float* scores) {
  int64_t t = t0;
#if SLIMLM_SIMD
  if (hd % VL == 0) {
    for (; t + 3 <= t1; t += 4) {
      const float* k0 = K + t * hd;
      Vec a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
      for (int64_t d = 0; d < hd; d += VL) {
        const Vec qv = load_x(q + d);
        a0 = vfma(qv, load_x(k0 + d), a0);
        a1 = vfma(qv, load_x(k0 + hd + d), a1);
        a2 = vfma(qv, load_x(k0 + 2 * hd + d), a2);
        a3 = vfma(qv, load_x(k0 + 3 * hd + d), a3);
      }
      scores[t] = hsum(a0) * scale;
      scores[t + 1] = hsum(a1) * scale;
      scores[t + 2] = hsum(a2) * scale;
      scores[t + 3] = hsum(a3) * scale;
    }
  }
#endif
  for (; t <= t1; ++t) {
    float acc = 0.f;
    for (int64_t d = 0; d < hd; ++d) acc += q[d] * K[t * hd + d];
    scores[t] = acc * scale;
  }
}

// out [hd] = sum_t p[t] V[t] for t in [t0, t1], the NV vectors of out held in registers over all t.
template <int NV>
void pv_fixed(const float* p, const float* V, int64_t t0, int64_t t1, float* out) {
#if SLIMLM_SIMD
  constexpr int64_t hd = NV * VL;
  Vec acc[NV];
  for (int j = 0; j < NV; ++j) acc[j] = vzero();
  for (int64_t t = t0; t <= t1; ++t) {
    const Vec pt = vset1(p[t]);
    for (int j = 0; j < NV; ++j) acc[j] = vfma(pt, load_x(V + t * hd + j * VL), acc[j]);
  }
  for (int j = 0; j < NV; ++j) store(out + j * VL, acc[j]);
#endif
}

void pv(const float* p, const float* V, int64_t hd, int64_t t0, int64_t t1, float* out) {
#if SLIMLM_SIMD
  switch (hd / VL * (hd % VL == 0)) {  // the head sizes of the Llama family: 64, 128 (and 32, 256)
    case 2: return pv_fixed<2>(p, V, t0, t1, out);
    case 4: return pv_fixed<4>(p, V, t0, t1, out);
    case 8: return pv_fixed<8>(p, V, t0, t1, out);
    case 16: return pv_fixed<16>(p, V, t0, t1, out);
    case 32: return pv_fixed<32>(p, V, t0, t1, out);
    default: break;
  }
#endif
  std::fill(out, out + hd, 0.f);
  for (int64_t t = t0; t <= t1; ++t)
    for (int64_t d = 0; d < hd; ++d) out[d] += p[t] * V[t * hd + d];
}

// One query head over cache positions [t0, t1]: out [hd] = softmax(q . K[t] * scale) . V[t]. scores: [t1 + 1].
void attend(const float* q, const float* K, const float* V, int64_t hd, int64_t t0, int64_t t1, float scale,
            float* scores, float* out) {
  qk_scores(q, K, hd, t0, t1, scale, scores);
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t t = t0; t <= t1; ++t) mx = std::max(mx, scores[t]);
  float sum = 0.f;
  for (int64_t t = t0; t <= t1; ++t) {
    scores[t] = std::exp(scores[t] - mx);
    sum += scores[t];
  }
  pv(scores, V, hd, t0, t1, out);  // unnormalised, then one multiply by 1 / sum
  const float inv = 1.f / sum;
  for (int64_t d = 0; d < hd; ++d) out[d] *= inv;
}

// x [W, D] fp32 (the embedded tokens); slots, positions [W] int64: each row's cache slot and position.
// layers: PER_LAYER tensors per layer; k_cache, v_cache: [n_slots, Hkv, S, hd] fp32 per layer (written in place).
// window: sliding-window size (0: none). Returns the hidden states after the last layer [W, D] (not final-normed).
at::Tensor decode_layers(const at::Tensor& x_in, const at::Tensor& slots, const at::Tensor& positions,
                         const at::Tensor& inv_freq, at::TensorList layers, at::TensorList k_cache,
                         at::TensorList v_cache, double eps, int64_t window) {
  const int64_t L = static_cast<int64_t>(k_cache.size());
  TORCH_CHECK(static_cast<int64_t>(layers.size()) == L * PER_LAYER && static_cast<int64_t>(v_cache.size()) == L,
              "decode_layers: expected ", PER_LAYER, " tensors and one k and v cache per layer");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 2, "decode_layers: x must be fp32 [W, D]");
  at::Tensor x = x_in.clone(at::MemoryFormat::Contiguous);  // [W, D], updated layer by layer (the residual stream)
  const int64_t W = x.size(0), D = x.size(1);
  const at::Tensor sl = slots.to(at::kLong).contiguous(), pos = positions.to(at::kLong).contiguous();
  const int64_t* slot = sl.data_ptr<int64_t>();
  const int64_t* p = pos.data_ptr<int64_t>();
  TORCH_CHECK(L > 0, "decode_layers: no layers");
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

  std::vector<Layer> lay(L);
  int64_t max_q = 0, max_kv = 0, max_ff = 0, max_s = 0;
  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor* t = layers.data() + i * PER_LAYER;
    lay[i] = {t[0].data_ptr<float>(), t[9].data_ptr<float>(), Proj::of(t[1], t[2]), Proj::of(t[3], t[4]),
              Proj::of(t[5], t[6]), Proj::of(t[7], t[8]), Proj::of(t[10], t[11]), Proj::of(t[12], t[13]),
              Proj::of(t[14], t[15])};
    TORCH_CHECK(k_cache[i].scalar_type() == at::kFloat && k_cache[i].is_contiguous() && v_cache[i].is_contiguous() &&
                    k_cache[i].size(3) == hd && lay[i].k.N == k_cache[i].size(1) * hd && lay[i].q.N % lay[i].k.N == 0,
                "decode_layers: layer ", i, "'s cache must be fp32 [slots, Hkv, S, hd] matching its k projection");
    max_q = std::max(max_q, lay[i].q.N);
    max_kv = std::max(max_kv, lay[i].k.N);
    max_ff = std::max(max_ff, lay[i].gate.N);
    max_s = std::max(max_s, k_cache[i].size(2));
  }
  std::vector<float> h(W * D), q(W * max_q), k(W * max_kv), v(W * max_kv), a(W * max_q), g(W * max_ff),
      u(W * max_ff), o(W * D), sx(W);
  std::vector<int16_t> xq(W * std::max({D, max_q, max_ff}));
  float* xp = x.data_ptr<float>();
  const float e = static_cast<float>(eps), scale = 1.f / std::sqrt(static_cast<float>(hd));
  // One parallel region for the whole step: the threads meet at a barrier between dependent phases (~1 us)
  // instead of forking and joining for each of the layer's seven matmuls. Serial phases (norms, RoPE) are tiny.
  const int nt = at::in_parallel_region() ? 1 : at::get_num_threads();
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    std::vector<float> scores(max_s);
    for (int64_t i = 0; i < L; ++i) {
      const Layer& ly = lay[i];
      const int64_t Hq = ly.q.N / hd, Hkv = ly.k.N / hd, S = k_cache[i].size(2), F = ly.gate.N, group = Hq / Hkv;
      float* Kc = k_cache[i].data_ptr<float>();
      float* Vc = v_cache[i].data_ptr<float>();
      // Attention.
      const Act hn{h.data(), xq.data(), sx.data(), D}, an{a.data(), xq.data(), sx.data(), ly.o.K},
          gn{g.data(), xq.data(), sx.data(), F};
#pragma omp single
      rmsnorm(xp, ly.norm1, h.data(), W, D, e), hn.quantize(W);
      share(hn, W, {{&ly.q, q.data()}, {&ly.k, k.data()}, {&ly.v, v.data()}}, tid, nth);
#pragma omp barrier
#pragma omp single
      for (int64_t w = 0; w < W; ++w) {
        rope(q.data() + w * Hq * hd, Hq, hd, cos_.data() + w * hd, sin_.data() + w * hd);
        rope(k.data() + w * Hkv * hd, Hkv, hd, cos_.data() + w * hd, sin_.data() + w * hd);
        for (int64_t kh = 0; kh < Hkv; ++kh) {  // cache [slot, kh, p, :] <- this row's key and value
          const int64_t off = ((slot[w] * Hkv + kh) * S + p[w]) * hd;
          std::copy_n(k.data() + (w * Hkv + kh) * hd, hd, Kc + off);
          std::copy_n(v.data() + (w * Hkv + kh) * hd, hd, Vc + off);
        }
      }
#pragma omp for schedule(static)
      for (int64_t b = 0; b < W * Hq; ++b) {
        const int64_t w = b / Hq, hq = b % Hq, kh = hq / group;
        const int64_t base = (slot[w] * Hkv + kh) * S * hd;
        const int64_t t0 = window > 0 ? std::max<int64_t>(0, p[w] - window + 1) : 0;
        attend(q.data() + b * hd, Kc + base, Vc + base, hd, t0, p[w], scale, scores.data(), a.data() + b * hd);
      }
#pragma omp single
      an.quantize(W);
      share(an, W, {{&ly.o, o.data()}}, tid, nth);
#pragma omp barrier
#pragma omp single
      {
        for (int64_t j = 0; j < W * D; ++j) xp[j] += o[j];
        rmsnorm(xp, ly.norm2, h.data(), W, D, e);
        hn.quantize(W);
      }
      // MLP.
      share(hn, W, {{&ly.gate, g.data()}, {&ly.up, u.data()}}, tid, nth);
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t j = 0; j < W * F; ++j) g[j] = g[j] / (1.f + std::exp(-g[j])) * u[j];  // silu(gate) * up
#pragma omp single
      gn.quantize(W);
      share(gn, W, {{&ly.down, o.data()}}, tid, nth);
#pragma omp barrier
#pragma omp single
      for (int64_t j = 0; j < W * D; ++j) xp[j] += o[j];
    }
  }
  return x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slimlm, m) {
  m.def("decode_layers(Tensor x, Tensor slots, Tensor positions, Tensor inv_freq, Tensor[] layers, "
        "Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, float eps, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(slimlm, CPU, m) { m.impl("decode_layers", &decode_layers); }
