// AVX2 + FMA + F16C building blocks of the CPU kernels (csrc/cpu/*.cpp): 8-wide fp32 loads/stores of every
// storage type and vector exp / erf / GELU / sigmoid with the same formulas as kernel_utils.h's scalar
// exp_f32 / erf_f32. Header-only, torch-free.
//
// These functions are compiled for AVX2 + FMA + F16C whatever the build's -march (target attribute), so the
// extension still loads on older x86 CPUs: callers test avx2::enabled() once per call and otherwise run their
// portable loops. A caller that uses these must itself carry PHI_FAST_TARGET_AVX2 (intrinsics inline only into
// functions of the same target) and must not use them inside lambdas (which do not inherit the attribute).
// PHI_FAST_CPU_AVX2 is defined when this header provides them (x86-64 with GCC or Clang).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define PHI_FAST_CPU_AVX2 1

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>

#include "common/float_convert.h"

#define PHI_FAST_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace phi_fast::cpu::avx2 {

// Whether to run the AVX2 paths: the CPU has AVX2, FMA and F16C, and PHI_FAST_CPU_PORTABLE=1 does not ask for
// the portable loops (which is how the tests reach those on AVX2 machines). Decided once per process.
inline bool enabled() {
  static const bool use = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c") && std::getenv("PHI_FAST_CPU_PORTABLE") == nullptr;
  return use;
}

// ---- 8 consecutive values as fp32, and back (rounding to nearest even like float_convert.h) ----

PHI_FAST_TARGET_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

PHI_FAST_TARGET_AVX2 inline __m256 load8(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

PHI_FAST_TARGET_AVX2 inline __m256 load8(const BFloat16* p) {  // bf16 is the top half of an fp32
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

PHI_FAST_TARGET_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

// F16C rounds to nearest even, makes subnormals and overflows to inf exactly like float_to_half; a NaN stays a
// quiet NaN (its payload may differ from float_to_half's canonical one).
PHI_FAST_TARGET_AVX2 inline void store8(Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// float_to_bf16 on 8 lanes: (u + 0x7FFF + lsb) >> 16, NaN -> (u >> 16) | 0x40 (quiet).
PHI_FAST_TARGET_AVX2 inline void store8(BFloat16* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i high = _mm256_srli_epi32(u, 16);
  const __m256i lsb = _mm256_and_si256(high, _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i quiet_nan = _mm256_or_si256(high, _mm256_set1_epi32(0x40));
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i bits = _mm256_blendv_epi8(rounded, quiet_nan, is_nan);  // each lane <= 0xFFFF: packus is exact
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1)));
}

// Sum of the 8 lanes.
PHI_FAST_TARGET_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lane maximum of the 8 lanes.
PHI_FAST_TARGET_AVX2 inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// The lane sums of four vectors: {hsum(a), hsum(b), hsum(c), hsum(d)}.
PHI_FAST_TARGET_AVX2 inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);  // per 128-bit half: partial sums of a, b, c, d
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// ---- vector math: the scalar exp_f32 / erf_f32 of kernel_utils.h on 8 lanes ----

// exp(x): x = n ln2 + r, 2^n * degree-7 Taylor p(r); 0 below -87.33, exp(88.37) above 88.37, NaN stays NaN.
PHI_FAST_TARGET_AVX2 inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33f), hi = _mm256_set1_ps(88.37f);
  const __m256 clamped = _mm256_min_ps(hi, _mm256_max_ps(lo, x));  // max/min return the 2nd operand on NaN
  const __m256 shifter = _mm256_set1_ps(12582912.0f);                // 1.5 * 2^23
  const __m256 shifted = _mm256_fmadd_ps(clamped, _mm256_set1_ps(1.44269504088896341f), shifter);
  const __m256 n = _mm256_sub_ps(shifted, shifter);
  const __m256i n_int = _mm256_sub_epi32(_mm256_castps_si256(shifted), _mm256_castps_si256(shifter));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), clamped);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860682030941723e-6f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n_int, _mm256_set1_epi32(127)), 23));
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, scale));
}

// erf(x): Abramowitz & Stegun 7.1.26 (absolute error < 6e-7 in fp32), odd in x.
PHI_FAST_TARGET_AVX2 inline __m256 erf8(__m256 x) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  const __m256 a = _mm256_andnot_ps(sign_mask, x);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), a, one));
  __m256 poly = _mm256_fmadd_ps(t, _mm256_set1_ps(1.061405429f), _mm256_set1_ps(-1.453152027f));
  poly = _mm256_fmadd_ps(t, poly, _mm256_set1_ps(1.421413741f));
  poly = _mm256_fmadd_ps(t, poly, _mm256_set1_ps(-0.284496736f));
  poly = _mm256_fmadd_ps(t, poly, _mm256_set1_ps(0.254829592f));
  poly = _mm256_mul_ps(t, poly);
  const __m256 e = exp8(_mm256_mul_ps(_mm256_xor_ps(a, sign_mask), a));  // exp(-x^2)
  const __m256 magnitude = _mm256_fnmadd_ps(poly, e, one);
  return _mm256_or_ps(magnitude, _mm256_and_ps(x, sign_mask));
}

// gelu_new: h / (1 + exp(-2u)), u = sqrt(2/pi) (h + 0.044715 h^3)  (= 0.5 h (1 + tanh(u))).
PHI_FAST_TARGET_AVX2 inline __m256 gelu_tanh8(__m256 h) {
  const __m256 h2 = _mm256_mul_ps(h, h);
  const __m256 inner = _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), h2, _mm256_set1_ps(1.0f));  // 1 + 0.044715 h^2
  const __m256 minus_2u = _mm256_mul_ps(_mm256_mul_ps(h, _mm256_set1_ps(-2.0f * 0.7978845608028654f)), inner);
  return _mm256_div_ps(h, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(minus_2u)));
}

// Exact GELU: 0.5 h (1 + erf(h / sqrt(2))).
PHI_FAST_TARGET_AVX2 inline __m256 gelu_erf8(__m256 h) {
  const __m256 half_h = _mm256_mul_ps(_mm256_set1_ps(0.5f), h);
  return _mm256_fmadd_ps(half_h, erf8(_mm256_mul_ps(h, _mm256_set1_ps(0.7071067811865476f))), half_h);
}

// quick_gelu: h / (1 + exp(-1.702 h)).
PHI_FAST_TARGET_AVX2 inline __m256 quick_gelu8(__m256 h) {
  return _mm256_div_ps(h, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_mul_ps(_mm256_set1_ps(-1.702f), h))));
}

}  // namespace phi_fast::cpu::avx2

#endif  // x86-64 GCC/Clang
