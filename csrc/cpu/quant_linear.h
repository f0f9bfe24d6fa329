// CPU launchers of the weight-only quantized linear layer (csrc/cpu/quant_linear.cpp). Torch-free: raw pointers,
// sizes, DType; conventions as in linear.h (output first and contiguous, fp32 accumulation, num_threads is the
// caller's budget of which a call uses only what its size pays for).
//
// Formats (phi_fast/quant.py writes them; spec of the math: phi_fast/reference.py dequantize):
// - int8: data int8 [N, K], w[n, k] = data[n, k] * scales[n] (one fp32 scale per output channel).
// - int4: data uint8 [N, Kp / 2], Kp = K rounded up to the group size G (a multiple of 32), scales fp32
//   [N, Kp / G], G a power of two (32, 64, 128). Each run of 32 weights k0 .. k0 + 31 (k0 % 32 == 0) is 16 bytes: byte i holds weight k0 + i in
//   its low nibble and weight k0 + 16 + i in its high nibble, as q + 8 with q in [-8, 7];
//   w[n, k] = q * scales[n, k / G]. Weights k >= K (padding) are never used.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace phi_fast::cpu {

enum class QuantFormat : int32_t { int8 = 0, int4 = 1 };

// A quantized weight [N, K] as the kernels read it (layouts above).
struct QuantWeight {
  const void* data;     // int8 [N, K] or uint8 [N, Kp / 2], contiguous
  const float* scales;  // [N] or [N, Kp / G], contiguous
  QuantFormat format;
  int64_t N, K;
  int64_t group_size;  // int4: G (multiple of 32); int8: K
};

// dst[r, j] = w[n0 + r, j] (fp32) for r < rows, j < K; dst rows dst_stride floats apart (dst_stride >= K rounded
// up to 32: whole 32-weight runs are written, the values past K are padding).
void dequantize_rows(float* dst, int64_t dst_stride, const QuantWeight& w, int64_t n0, int64_t rows);

// out = x @ w^T + bias (bias may be null) for a few rows of x (decode: M = batch <= 16), reading each packed
// weight row once for all M rows. x is quantized on the fly to int8 per block of 32 inputs (scale max|x| / 127,
// round half to even) and multiplied with integer dot products; that rounding of x is the only difference from
// the reference (dequantize, then matmul).
// out: [M, N] contiguous in dtype; x: [M, K] in dtype with row stride x_stride; bias: [N] in dtype or null.
void quant_linear(void* out, const void* x, int64_t x_stride, const QuantWeight& w, const void* bias, int64_t M,
                  DType dtype, int num_threads);

}  // namespace phi_fast::cpu
