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

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t PER_LAYER = 16;  // tensors per layer in `layers`, in this order:
// norm1, wq, sq, wk, sk, wv, sv, wo, so, norm2, wg, sg, wu, su, wd, sd   (s*: scale [N], or an empty tensor)

// y [M, N] = x [M, K] . w^T: int8 weight with its row scale, or an fp32 weight.
void linear(const float* x, int64_t M, const at::Tensor& w, const at::Tensor& s, float* y) {
  const int64_t N = w.size(0), K = w.size(1);
  if (w.scalar_type() == at::kChar) {
    slimlm::int8_matmul(x, w.data_ptr<int8_t>(), s.data_ptr<float>(), y, M, K, N);
  } else {
    at::Tensor out = at::from_blob(y, {M, N}, at::kFloat);
    at::mm_out(out, at::from_blob(const_cast<float*>(x), {M, K}, at::kFloat), w.t());
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

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// One query head over cache positions [t0, t1]: out [hd] = softmax(q . K[t] * scale) . V[t]. scores: [t1 + 1].
void attend(const float* q, const float* K, const float* V, int64_t hd, int64_t t0, int64_t t1, float scale,
            float* scores, float* out) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t t = t0; t <= t1; ++t) {
    scores[t] = dot(q, K + t * hd, hd) * scale;
    mx = std::max(mx, scores[t]);
  }
  float sum = 0.f;
  for (int64_t t = t0; t <= t1; ++t) {
    scores[t] = std::exp(scores[t] - mx);
    sum += scores[t];
  }
  std::fill(out, out + hd, 0.f);
  for (int64_t t = t0; t <= t1; ++t) {
    const float p = scores[t] / sum;
    const float* vt = V + t * hd;
#pragma omp simd
    for (int64_t d = 0; d < hd; ++d) out[d] += p * vt[d];
  }
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
  at::Tensor x = x_in.contiguous().clone();  // [W, D], updated layer by layer (the residual stream)
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

  int64_t max_q = 0, max_kv = 0, max_ff = 0, max_s = 0;
  for (int64_t i = 0; i < L; ++i) {
    max_q = std::max(max_q, layers[i * PER_LAYER + 1].size(0));
    max_kv = std::max(max_kv, layers[i * PER_LAYER + 3].size(0));
    max_ff = std::max(max_ff, layers[i * PER_LAYER + 10].size(0));
    max_s = std::max(max_s, k_cache[i].size(2));
  }
  std::vector<float> h(W * std::max(D, max_q)), q(W * max_q), k(W * max_kv), v(W * max_kv), a(W * max_q),
      g(W * max_ff), u(W * max_ff), o(W * D);
  float* xp = x.data_ptr<float>();

  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor* t = layers.data() + i * PER_LAYER;
    const int64_t Hq = t[1].size(0) / hd, Hkv = k_cache[i].size(1), S = k_cache[i].size(2), F = t[10].size(0);
    const int64_t group = Hq / Hkv;
    // Attention.
    rmsnorm(xp, t[0].data_ptr<float>(), h.data(), W, D, static_cast<float>(eps));
    linear(h.data(), W, t[1], t[2], q.data());
    linear(h.data(), W, t[3], t[4], k.data());
    linear(h.data(), W, t[5], t[6], v.data());
    float* Kc = k_cache[i].data_ptr<float>();
    float* Vc = v_cache[i].data_ptr<float>();
    for (int64_t w = 0; w < W; ++w) {
      rope(q.data() + w * Hq * hd, Hq, hd, cos_.data() + w * hd, sin_.data() + w * hd);
      rope(k.data() + w * Hkv * hd, Hkv, hd, cos_.data() + w * hd, sin_.data() + w * hd);
      for (int64_t kh = 0; kh < Hkv; ++kh) {  // cache [slot, kh, p, :] <- this row's key and value
        const int64_t off = ((slot[w] * Hkv + kh) * S + p[w]) * hd;
        std::copy_n(k.data() + (w * Hkv + kh) * hd, hd, Kc + off);
        std::copy_n(v.data() + (w * Hkv + kh) * hd, hd, Vc + off);
      }
    }
    const float scale = 1.f / std::sqrt(static_cast<float>(hd));
    at::parallel_for(0, W * Hq, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> scores(max_s);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t w = b / Hq, hq = b % Hq, kh = hq / group;
        const int64_t base = (slot[w] * Hkv + kh) * S * hd;
        const int64_t t0 = window > 0 ? std::max<int64_t>(0, p[w] - window + 1) : 0;
        attend(q.data() + (w * Hq + hq) * hd, Kc + base, Vc + base, hd, t0, p[w], scale, scores.data(),
               a.data() + (w * Hq + hq) * hd);
      }
    });
    linear(a.data(), W, t[7], t[8], o.data());
    for (int64_t j = 0; j < W * D; ++j) xp[j] += o[j];
    // MLP.
    rmsnorm(xp, t[9].data_ptr<float>(), h.data(), W, D, static_cast<float>(eps));
    linear(h.data(), W, t[10], t[11], g.data());
    linear(h.data(), W, t[12], t[13], u.data());
    for (int64_t j = 0; j < W * F; ++j) g[j] = g[j] / (1.f + std::exp(-g[j])) * u[j];  // silu(gate) * up
    linear(g.data(), W, t[14], t[15], o.data());
    for (int64_t j = 0; j < W * D; ++j) xp[j] += o[j];
  }
  return x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slimlm, m) {
  m.def("decode_layers(Tensor x, Tensor slots, Tensor positions, Tensor inv_freq, Tensor[] layers, "
        "Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, float eps, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(slimlm, CPU, m) { m.impl("decode_layers", &decode_layers); }
