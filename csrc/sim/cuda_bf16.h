// SIMT emulator (csrc/sim): the parts of <cuda_bf16.h> the kernels use. __nv_bfloat16 is the top 16 bits of an
// fp32; conversions round to nearest even (csrc/common/float_convert.h).
#pragma once

#include <cstdint>

#include "common/float_convert.h"
#include "cuda_fp16.h"

struct __nv_bfloat16 {
  uint16_t __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(phi_fast::float_to_bf16(f)) {}
  operator float() const { return phi_fast::bf16_to_float(__x); }
};

struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __bfloat162float(__nv_bfloat16 h) { return phi_fast::bf16_to_float(h.__x); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return {__nv_bfloat16(a), __nv_bfloat16(a)}; }
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }
inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(uint16_t u) {
  __nv_bfloat16 h;
  h.__x = u;
  return h;
}
