// SIMT emulator (csrc/sim): the parts of <cuda_fp16.h> the kernels use. __half is 16 bits of IEEE fp16;
// conversions round to nearest even (csrc/common/float_convert.h, bit-exact with the hardware's cvt.rn).
#pragma once

#include <cstdint>

#include "common/float_convert.h"

struct __half {
  uint16_t __x;
  __half() = default;
  __half(float f) : __x(phi_fast::float_to_half(f)) {}
  operator float() const { return phi_fast::half_to_float(__x); }
};

struct alignas(4) __half2 {
  __half x, y;
};

inline float __half2float(__half h) { return phi_fast::half_to_float(h.__x); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
inline __half2 __float2half2_rn(float a) { return {__half(a), __half(a)}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline uint16_t __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(uint16_t u) {
  __half h;
  h.__x = u;
  return h;
}
