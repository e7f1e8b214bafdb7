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
inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec vmin(Vec a, Vec b) { return _mm512_min_ps(a, b); }
inline float hmax(Vec v) { return _mm512_reduce_max_ps(v); }
// The four lane sums of a, b, c, d at once (fewer shuffles than four hsum): out [4].
inline void hsum4(Vec a, Vec b, Vec c, Vec d, float* out) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a b a b per 128 bits
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                                    _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}
inline Vec vdiv(Vec a, Vec b) { return _mm512_div_ps(a, b); }
inline Vec vround(Vec v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec vfnmadd(Vec a, Vec b, Vec c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
inline Vec vpow2(Vec p, Vec n) { return _mm512_scalef_ps(p, n); }             // p * 2^n, n integral
#define SLIMLM_F16 1
inline Vec load_h(const void* p) {  // 16 fp16 -> 16 fp32
  return _mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
}
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
inline void hsum4(Vec a, Vec b, Vec c, Vec d, float* out) {
  const __m256 ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));  // a b a b per 128 bits
  const __m256 cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
  const __m256 abcd = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(ab), _mm256_castps_pd(cd))),
                                    _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(ab), _mm256_castps_pd(cd))));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
}
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec vmin(Vec a, Vec b) { return _mm256_min_ps(a, b); }
inline float hmax(Vec v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}
inline Vec vdiv(Vec a, Vec b) { return _mm256_div_ps(a, b); }
inline Vec vround(Vec v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec vfnmadd(Vec a, Vec b, Vec c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a * b
inline Vec vpow2(Vec p, Vec n) {  // p * 2^n for integral n in [-126, 127]: n + 127 is the exponent field
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#if defined(__F16C__)
#define SLIMLM_F16 1
inline Vec load_h(const void* p) {  // 8 fp16 -> 8 fp32
  return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p)));
}
#endif
#else
constexpr int64_t VL = 0;
constexpr const char* ISA = "scalar";
#endif
#ifndef SLIMLM_F16
#define SLIMLM_F16 0
#endif

#if SLIMLM_SIMD
// exp(x) for x in [-87.3, 88] (clamped there: below, ~1e-38 instead of 0), Cephes' expf: x = n ln2 + r with
// |r| <= ln2 / 2 (Cody-Waite split of ln2), exp(r) by a degree-7 polynomial, times 2^n. Within 2 ulp of expf.
inline Vec vexp(Vec x) {
  x = vmin(vmax(x, vset1(-87.3f)), vset1(88.0f));
  const Vec n = vround(vmul(x, vset1(1.44269504088896341f)));
  Vec r = vfnmadd(n, vset1(0.693359375f), x);
  r = vfnmadd(n, vset1(-2.12194440e-4f), r);
  Vec y = vset1(1.9875691500e-4f);
  y = vfma(y, r, vset1(1.3981999507e-3f));
  y = vfma(y, r, vset1(8.3334519073e-3f));
  y = vfma(y, r, vset1(4.1665795894e-2f));
  y = vfma(y, r, vset1(1.6666665459e-1f));
  y = vfma(y, r, vset1(5.0000001201e-1f));
  y = vfma(y, vmul(r, r), vadd(r, vset1(1.f)));
  return vpow2(y, n);
}
#endif

// int16 x int16 multiply-adds for the int8 kernels: IL int16 lanes per vector (AVX-512BW: 32, AVX2: 16). idot adds
// the products of each adjacent pair of lanes into one int32 lane: vpdpwssd with AVX-512 VNNI (one instruction),
// else vpmaddwd + vpaddd. Code under `#if SLIMLM_ISIMD` uses it.
#if defined(__AVX512BW__)
#define SLIMLM_ISIMD 1
constexpr int64_t IL = 32;
using IVec = __m512i;
inline IVec izero() { return _mm512_setzero_si512(); }
inline IVec iload_x(const int16_t* p) { return _mm512_loadu_si512(p); }
inline IVec iload_w(const int8_t* p) {  // 32 int8 -> 32 int16
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline IVec idot(IVec acc, IVec x, IVec w) {
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, x, w);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(x, w));
#endif
}
inline IVec iadd(IVec a, IVec b) { return _mm512_add_epi32(a, b); }
inline int32_t ihsum(IVec v) { return _mm512_reduce_add_epi32(v); }
// The four lane sums of a, b, c, d at once (fewer shuffles than four ihsum): out [4] int32.
inline void ihsum4(IVec a, IVec b, IVec c, IVec d, int32_t* out) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                   _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
}
#elif defined(__AVX2__)
#define SLIMLM_ISIMD 1
constexpr int64_t IL = 16;
using IVec = __m256i;
inline IVec izero() { return _mm256_setzero_si256(); }
inline IVec iload_x(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline IVec iload_w(const int8_t* p) {  // 16 int8 -> 16 int16
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline IVec idot(IVec acc, IVec x, IVec w) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(acc, x, w);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(x, w));
#endif
}
inline IVec iadd(IVec a, IVec b) { return _mm256_add_epi32(a, b); }
inline int32_t ihsum(IVec v) {
  __m128i h = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
  return _mm_cvtsi128_si32(h);
}
inline void ihsum4(IVec a, IVec b, IVec c, IVec d, int32_t* out) {
  out[0] = ihsum(a), out[1] = ihsum(b), out[2] = ihsum(c), out[3] = ihsum(d);
}
#else
#define SLIMLM_ISIMD 0
constexpr int64_t IL = 0;
#endif

}  // namespace slimlm::simd
