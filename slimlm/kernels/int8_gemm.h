// What int8_gemm.cpp offers the other kernels (decode.cpp): its matmuls on raw pointers.
#pragma once

#include <cstdint>

namespace slimlm {

// y [M, N] fp32 = x [M, K] fp32 . (q [N, K] int8 * s [N])^T; all contiguous, y not aliasing x. Threads split N.
void int8_matmul(const float* x, const int8_t* q, const float* s, float* y, int64_t M, int64_t K, int64_t N);

// x [M, K] -> xq [M, K] int16 and sx [M] with x ~ sx * xq, one scale per row (what int8_matmul_rows reads).
void quantize_rows_i16(const float* x, int64_t M, int64_t K, int16_t* xq, float* sx);

// Output columns [r0, r1) of y = (sx * xq) . (q * s)^T only, on the calling thread (for callers that split the work
// among their own threads, best in multiples of row_group()).
void int8_matmul_rows(const int16_t* xq, const float* sx, const int8_t* q, const float* s, float* y, int64_t M,
                      int64_t K, int64_t N, int64_t r0, int64_t r1);
// y [M, N] = x [M, K] . w [N, K]^T with an fp32 weight, columns [r0, r1), on the calling thread.
void fp32_matmul_rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t r0,
                      int64_t r1);
int64_t row_group();

}  // namespace slimlm
