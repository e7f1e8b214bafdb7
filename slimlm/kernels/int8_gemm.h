// What int8_gemm.cpp offers the other kernels (decode.cpp): the int8 weight-only matmul on raw pointers.
#pragma once

#include <cstdint>

namespace slimlm {

// y [M, N] fp32 = x [M, K] fp32 . (q [N, K] int8 * s [N])^T; all contiguous, y not aliasing x. Threads split N.
void int8_matmul(const float* x, const int8_t* q, const float* s, float* y, int64_t M, int64_t K, int64_t N);

}  // namespace slimlm
