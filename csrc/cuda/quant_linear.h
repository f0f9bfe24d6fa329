// CUDA launchers of the weight-only quantized linear layer (kernels in csrc/cuda/quant_linear.cu). Declarations
// only, no CUDA types (conventions of csrc/cuda/norm.h: outputs first, strides in elements, `stream` a
// cudaStream_t as void*, nothing launched for empty work, launch errors checked by the caller, no sync).
// Formats: csrc/common/quant_weight.h. Same math as the reference: the weights are dequantized exactly
// (q * scale in fp32) and multiplied in fp32; x is used as it is (no activation quantization, unlike the CPU).
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/quant_weight.h"

namespace phi_fast::cuda {

// Most rows of x quant_linear takes (decode batches); more rows go through dequantize_rows and a GEMM.
constexpr int64_t kQuantLinearMaxRows = 16;

// out = x @ w^T + bias (bias may be null), 1 <= M <= kQuantLinearMaxRows, reading each packed weight row once
// for all M rows of x.
// out: [M, N] contiguous in dtype; x: [M, K] in dtype with row stride x_stride; bias: [N] in dtype or null.
void quant_linear(void* out, const void* x, int64_t x_stride, const QuantWeight& w, const void* bias, int64_t M,
                  DType dtype, void* stream);

// dst[r, k] = w[n0 + r, k] rounded to dst_dtype, for r < rows, k < K (nothing else is written).
// dst: [rows, K] with row stride dst_stride (>= K).
void dequantize_rows(void* dst, int64_t dst_stride, const QuantWeight& w, int64_t n0, int64_t rows,
                     DType dst_dtype, void* stream);

}  // namespace phi_fast::cuda
