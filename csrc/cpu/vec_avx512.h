// AVX-512 (F + BW + VL + DQ) building blocks of the CPU kernels, and the run-time CPU feature checks behind the
// AVX-512 and native-bf16 paths. Header-only, torch-free.
//
// Like vec_avx2.h: functions carry PHI_FAST_TARGET_AVX512 whatever the build's -march, so the extension loads on
// AVX2-only CPUs; callers test avx512::enabled() once per call and otherwise take their AVX2 or portable loops.
// PHI_FAST_CPU_AVX512 is defined when this header provides them (x86-64 with GCC or Clang).
#pragma once

#include <cstdlib>

#if defined(__x86_64__) && defined(__GNUC__)
#define PHI_FAST_CPU_AVX512 1

#include <immintrin.h>

#define PHI_FAST_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

namespace phi_fast::cpu::avx512 {

// Whether to run the AVX-512 paths: the CPU has AVX-512 F/BW/VL/DQ, and neither PHI_FAST_CPU_PORTABLE=1 (portable
// loops) nor PHI_FAST_CPU_NO_AVX512=1 (the AVX2 paths, which is how the tests reach those on AVX-512 machines) is
// set. Decided once per process.
inline bool enabled() {
  static const bool use = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          std::getenv("PHI_FAST_CPU_PORTABLE") == nullptr &&
                          std::getenv("PHI_FAST_CPU_NO_AVX512") == nullptr;
  return use;
}

// Sum of the 16 lanes.
PHI_FAST_TARGET_AVX512 inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

}  // namespace phi_fast::cpu::avx512

#endif  // x86-64 GCC/Clang

namespace phi_fast::cpu {

// Whether the CPU multiplies bf16 natively (AVX512-BF16 dot products or AMX-BF16 tiles), so that torch's bf16 GEMM
// (oneDNN) is fast; without them it runs several times slower than fp32 (bench/NOTES.md). PHI_FAST_CPU_NO_BF16=1
// answers false, to test the fallback on any CPU. Decided once per process.
inline bool native_bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool native = (__builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16")) &&
                             std::getenv("PHI_FAST_CPU_NO_BF16") == nullptr;
  return native;
#else
  return false;  // other CPUs: the fp32 path, which is never slow
#endif
}

}  // namespace phi_fast::cpu
