// The vector type the kernels are written in: VL fp32 lanes (AVX-512: 16, AVX2 + FMA: 8), loaded from fp32 or
// widened from int8. Code under `#if SLIMLM_SIMD` uses it; every kernel keeps a scalar loop for the rest (and for
// CPUs with neither, where VL is 0 and SLIMLM_SIMD is 0).
#pragma once

#include <cstdint>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define SLIMLM_SIMD 1
#else
#define SLIMLM_SIMD 0
#endif

namespace slimlm::simd {

#if defined(__AVX512F__)
constexpr int64_t VL = 16;
constexpr const char* ISA = "avx512";
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset1(float a) { return _mm512_set1_ps(a); }
inline Vec load_x(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec load_w(const int8_t* p) {  // 16 int8 -> 16 int32 -> 16 fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline Vec load_w(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline float hsum(Vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t VL = 8;
constexpr const char* ISA = "avx2";
using Vec = __m256;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset1(float a) { return _mm256_set1_ps(a); }
inline Vec load_x(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec load_w(const int8_t* p) {  // 8 int8 (one 64-bit load) -> 8 int32 -> 8 fp32
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline Vec load_w(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline float hsum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // 8 -> 4
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                        // 4 -> 2
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));                                 // 2 -> 1
  return _mm_cvtss_f32(s);
}
#else
constexpr int64_t VL = 0;
constexpr const char* ISA = "scalar";
#endif

}  // namespace slimlm::simd
