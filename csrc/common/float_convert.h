// Torch-free fp16 / bf16 <-> fp32 conversion on the host, round to nearest even, plus the storage types
// the CPU kernels use (csrc/cpu). Bit-exact with torch's `.to(dtype)` from fp32: NaN stays NaN (quiet),
// overflow rounds to inf, fp16 subnormals are produced and read exactly.
#pragma once

#include <cstdint>
#include <cstring>

namespace phi_fast {

// 16-bit storage types: plain bit containers, converted through the functions below.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// bf16 is the top half of an fp32: widen by shifting; narrow by rounding the dropped 16 bits to even.
inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// fp16: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0x1Fu) return bits_float(sign | 0x7F800000u | (mantissa << 13));  // inf, NaN
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in fp32
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));  // rebias 15 -> 127
}

inline uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return sign | 0x7E00u;  // NaN -> quiet NaN
  if (a >= 0x47800000u) return sign | 0x7C00u;  // |f| >= 65536 (or inf) -> inf
  if (a >= 0x38800000u) {                       // normal fp16 range, |f| >= 2^-14
    uint32_t r = a - 0x38000000u;               // rebias the exponent 127 -> 15
    r += 0x0FFFu + ((r >> 13) & 1u);            // round the 13 dropped bits to even; a carry into the
    return sign | static_cast<uint16_t>(r >> 13);  // exponent is right (65520 -> inf)
  }
  if (a < 0x33000000u) return sign;  // |f| <= 2^-25 rounds to zero (2^-25 itself ties to even 0)
  // Subnormal result: q = round(|f| / 2^-24) with |f| = m * 2^(e - 150), m the 24-bit significand.
  const uint32_t e = a >> 23;
  const uint32_t m = (a & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126u - e;  // 14..24
  uint32_t q = m >> shift;
  const uint32_t rest = m & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1u);
  q += (rest > halfway || (rest == halfway && (q & 1u))) ? 1u : 0u;  // q = 0x400 is the smallest normal
  return sign | static_cast<uint16_t>(q);
}

// Uniform load/store used by templated kernels: to_float(T) and from_float<T>(float).
inline float to_float(float x) { return x; }
inline float to_float(Half x) { return half_to_float(x.bits); }
inline float to_float(BFloat16 x) { return bf16_to_float(x.bits); }

template <typename T>
inline T from_float(float x);
template <>
inline float from_float<float>(float x) { return x; }
template <>
inline Half from_float<Half>(float x) { return Half{float_to_half(x)}; }
template <>
inline BFloat16 from_float<BFloat16>(float x) { return BFloat16{float_to_bf16(x)}; }

}  // namespace phi_fast
