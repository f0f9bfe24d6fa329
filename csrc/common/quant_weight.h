// The packed weight formats of the quantized linear layer, shared by the CPU and CUDA launchers (no torch or CUDA
// headers). phi_fast/quant.py writes them; the math is phi_fast/reference.py's dequantize.
// - int8: data int8 [N, K], w[n, k] = data[n, k] * scales[n] (one fp32 scale per output channel).
// - int4: data uint8 [N, Kp / 2], Kp = K rounded up to the group size G (a multiple of 32), scales fp16 (IEEE
//   binary16 bits) [N, Kp / G], G a power of two (32, 64, 128): 4.5 bits per weight at G = 32, as llama.cpp's Q4_0. Each run of 32 weights k0 .. k0 + 31 (k0 % 32 == 0) is 16 bytes:
//   byte i holds weight k0 + i in its low nibble and weight k0 + 16 + i in its high nibble, as q + 8 with q in
//   [-8, 7]; w[n, k] = q * scales[n, k / G]. Weights k >= K (padding) are never used.
#pragma once

#include <cstdint>

namespace phi_fast {

enum class QuantFormat : int32_t { int8 = 0, int4 = 1 };

// A quantized weight [N, K] as the kernels read it (layouts above).
struct QuantWeight {
  const void* data;     // int8 [N, K] or uint8 [N, Kp / 2], contiguous
  const void* scales;   // int8: fp32 [N]; int4: fp16 bits [N, Kp / G]; contiguous
  QuantFormat format;
  int64_t N, K;
  int64_t group_size;  // int4: G (multiple of 32); int8: K

  const float* channel_scales() const { return static_cast<const float*>(scales); }   // int8
  const uint16_t* group_scales() const { return static_cast<const uint16_t*>(scales); }  // int4
};

}  // namespace phi_fast
