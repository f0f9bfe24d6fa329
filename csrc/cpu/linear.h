// CPU launcher of the small-M linear layer (csrc/cpu/linear.cpp). Torch-free: raw pointers, element strides,
// DType. Conventions as in norm.h: output first and contiguous; inputs validated by csrc/ops; weight and bias in
// x's DType; fp32 accumulation; num_threads is the caller's thread budget (at::get_num_threads()), of which a
// call uses only as many as its size pays for (kernel_utils.h).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace phi_fast::cpu {

// out = x @ weight^T + bias (bias may be null), for a few rows of x (decode: M = batch), reading each weight row
// once for all M rows.
// out: [M, N] contiguous; x: [M, K] with row stride x_stride; weight: [N, K] contiguous; bias: [N] or null.
void linear(void* out, const void* x, int64_t x_stride, const void* weight, const void* bias, int64_t M, int64_t N,
            int64_t K, DType dtype, int num_threads);

}  // namespace phi_fast::cpu
