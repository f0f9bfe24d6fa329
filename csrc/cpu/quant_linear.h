// CPU launchers of the weight-only quantized linear layer (csrc/cpu/quant_linear.cpp). Torch-free: raw pointers,
// sizes, DType; conventions as in linear.h (output first and contiguous, fp32 accumulation, num_threads is the
// caller's budget of which a call uses only what its size pays for).
//
// Formats: csrc/common/quant_weight.h.
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/quant_weight.h"

namespace phi_fast::cpu {

using ::phi_fast::QuantFormat;
using ::phi_fast::QuantWeight;

// dst[r, j] = w[n0 + r, j] (fp32) for r < rows, j < K; dst rows dst_stride floats apart (dst_stride >= K rounded
// up to 32: whole 32-weight runs are written, the values past K are padding). Rows are split over up to
// num_threads threads when there are enough of them to pay for a team.
void dequantize_rows(float* dst, int64_t dst_stride, const QuantWeight& w, int64_t n0, int64_t rows, int num_threads);

// out = x @ w^T + bias (bias may be null) for a few rows of x (decode: M = batch <= 16), reading each packed
// weight row once for all M rows. x is quantized on the fly to int8 per block of 32 inputs (scale max|x| / 127,
// round half to even) and multiplied with integer dot products; that rounding of x is the only difference from
// the reference (dequantize, then matmul).
// out: [M, N] contiguous in dtype; x: [M, K] in dtype with row stride x_stride; bias: [N] in dtype or null.
void quant_linear(void* out, const void* x, int64_t x_stride, const QuantWeight& w, const void* bias, int64_t M,
                  DType dtype, int num_threads);

// The same function as quant_linear (x quantized to int8 blocks, integer dot products) for prompt-sized M, as a
// blocked GEMM (csrc/cpu/quant_gemm.cpp): each packed weight read once per call, M any size.
void quant_gemm(void* out, const void* x, int64_t x_stride, const QuantWeight& w, const void* bias, int64_t M,
                DType dtype, int num_threads);

// Whether prompts take quant_gemm: false on CPUs with AMX (torch's bf16 GEMM on dequantized tiles is faster
// there) or with PHI_FAST_CPU_DEQUANT_PROMPTS=1 set; those dequantize tile by tile into torch's GEMM.
// Decided once per process.
bool quant_gemm_enabled();

}  // namespace phi_fast::cpu
