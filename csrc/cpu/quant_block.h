// The activation rounding of the quantized linear kernels (quant_linear.cpp for decode, quant_gemm.cpp for
// prompts): one block of 32 inputs to int8, the same in both so that a prompt and a decode step agree.
// Header-only, torch-free.
#pragma once

#include <cmath>
#include <cstdint>

namespace phi_fast::cpu {

constexpr int kActBlock = 32;  // inputs per activation block

// Round to nearest, ties to even (torch.round), for |v| < 2^22: adding 1.5 * 2^23 leaves no fraction bits.
inline float round_even(float v) { return (v + 12582912.0f) - 12582912.0f; }

// q[i] = clamp(round_even(v[i] * 127 / max|v|), -127, 127) for the block's 32 inputs; returns its scale
// max|v| / 127 (0 for an all-zero block, whose q are 0).
inline float quantize_block(const float* v, int8_t* q) {
  float amax = 0.0f;
#pragma omp simd reduction(max : amax)
  for (int i = 0; i < kActBlock; ++i) amax = std::fabs(v[i]) > amax ? std::fabs(v[i]) : amax;
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
#pragma omp simd
  for (int i = 0; i < kActBlock; ++i) {
    const float r = round_even(v[i] * inv);
    q[i] = static_cast<int8_t>(r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r));
  }
  return amax / 127.0f;
}

}  // namespace phi_fast::cpu
