// Shared helpers of the CPU kernels (csrc/cpu/*.cpp): how many threads a call gets and running it on them,
// dtype dispatch onto storage types, row load/store through fp32, and vectorizable fp32 exp and erf.
// Header-only, torch-free.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/dtype.h"
#include "common/float_convert.h"

namespace phi_fast::cpu {

// ---- threads ----
//
// Every launcher takes num_threads, the caller's thread budget (torch's at::get_num_threads() from csrc/ops),
// and decides from an estimate of its own single-core time how many of those threads to use. An OpenMP team
// costs a few microseconds when its threads are spinning on free cores, but far more when they sleep or share
// the cores with other teams (MKL's, torch's) or other processes: on a 2-core machine under load, a decode-sized
// op that forked a team ran 10-40x slower than on one thread. So a call is split only into parts of at least
// kMinThreadWorkNs each, and smaller calls run on the calling thread with no team at all.
constexpr double kMinThreadWorkNs = 100e3;

// Single-core throughputs behind the estimates (rough; measured on a 2-core AMD EPYC VM, bench/NOTES.md).
// Streaming is one core's DRAM rate; rows already in L2/L3 go 2-4x faster, so estimates err towards forking.
constexpr double kStreamBytesPerNs = 20.0;  // rows read or written
constexpr double kGemmFlopsPerNs = 40.0;    // the attention kernels' fp32 register tiles (~50 measured)

// Estimated single-core nanoseconds of streaming `bytes` through memory.
inline double stream_ns(double bytes) { return bytes / kStreamBytesPerNs; }

// Threads for a call of about work_ns single-core nanoseconds: at most max_threads and at most one per
// kMinThreadWorkNs of work (so 1 for small calls).
inline int threads_for(double work_ns, int max_threads) {
  const double by_work = std::floor(work_ns / kMinThreadWorkNs);
  return static_cast<int>(std::clamp<double>(by_work, 1.0, std::max(max_threads, 1)));
}

// Runs body(thread, num_threads) once on each of num_threads threads, or once on the calling thread, with no
// team, when num_threads <= 1. The team is forked at OpenMP's default size (the size of torch's and MKL's
// teams in this thread) and its threads past num_threads only join the barrier: a team smaller than libgomp's
// pool makes libgomp end the surplus threads, and the next full-size team re-creates them (torch's
// at::parallel_for avoids num_threads clauses for the same reason). body gets the number of threads that
// work, which can be smaller than asked (a smaller team, e.g. inside another parallel region).
template <typename Body>
void run_threads(int num_threads, Body&& body) {
  if (num_threads <= 1) {
    body(0, 1);
    return;
  }
#pragma omp parallel
  {
    const int working = std::min(num_threads, omp_get_num_threads());
    const int thread = omp_get_thread_num();
    if (thread < working) body(thread, working);
  }
}

// Software prefetch for a block of `rows` weight rows read side by side (row_bytes each, the next block right
// after; GEMV kernels): the address `traffic` bytes of the block's reading ahead of byte o of a row, i.e.
// traffic / rows further along the row, continued into the same row of the next block past the row's end (at most
// one block ahead). A distance per row, not per block, keeps long rows' lines from being evicted before use.
struct RowAhead {
  int64_t row_bytes, along, wrap;
  RowAhead(int64_t rows, int64_t row_bytes, int64_t traffic)
      : row_bytes(row_bytes), along(std::min(row_bytes, traffic / rows)), wrap((rows - 1) * row_bytes) {}
  // p: byte o of a row of the block.
  const char* operator()(const void* p, int64_t o) const {
    return static_cast<const char*>(p) + along + (o + along >= row_bytes ? wrap : 0);
  }
};

// Part `part` of [0, n) cut into `parts` contiguous near-equal ranges: [begin, end).
struct Range {
  int64_t begin, end;
};
inline Range part_of(int64_t n, int part, int parts) { return {n * part / parts, n * (part + 1) / parts}; }

// fn(begin, end) over [0, rows) in one contiguous range per thread (static schedule, for rows of equal cost),
// with threads_for(work_ns, max_threads) threads, never more than rows.
template <typename Fn>
void parallel_rows(int64_t rows, double work_ns, int max_threads, Fn&& fn) {
  const int threads = static_cast<int>(std::min<int64_t>(threads_for(work_ns, max_threads), rows));
  run_threads(threads, [&](int thread, int team) {
    const Range r = part_of(rows, thread, team);
    if (r.begin < r.end) fn(r.begin, r.end);
  });
}

// ---- dtypes and rows ----

// Calls fn(T{}) with T the storage type of dtype: float, Half or BFloat16.
template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f32: fn(float{}); return;
    case DType::f16: fn(Half{}); return;
    case DType::bf16: fn(BFloat16{}); return;
  }
  throw std::invalid_argument("phi_fast cpu: unknown dtype " + std::to_string(static_cast<int>(dtype)));
}

// dst[i] = float(src[i]) for i < n.
template <typename T>
inline void load_row(float* dst, const T* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

// dst[i] = T(src[i]) for i < n, round to nearest even.
template <typename T>
inline void store_row(T* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_float<T>(src[i]);
}

// The n values of src as fp32: src itself when T is float (no copy), else converted into buffer.
template <typename T>
inline const float* row_as_float(const T* src, int64_t n, float* buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    load_row(buffer, src, n);
    return buffer;
  }
}

// exp(x) in fp32 without a libm call, so loops over it vectorize: x = n ln2 + r with |r| <= ln2/2,
// exp(x) = 2^n * p(r), p the degree-7 Taylor polynomial (relative error < 2 ulp). Returns 0 below -87.33
// (where exp leaves the normal range), exp(88.37) above 88.37, NaN for NaN.
inline float exp_f32(float x) {
  const float clamped = x > 88.37f ? 88.37f : (x < -87.33f ? -87.33f : x);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
  const float shifted = clamped * 1.44269504088896341f + shifter;
  const float n = shifted - shifter;
  const int32_t n_int = static_cast<int32_t>(float_bits(shifted) - float_bits(shifter));
  float r = clamped - n * 0.693145751953125f;  // ln2 split in a high part exact in n * hi ...
  r = r - n * 1.42860682030941723e-6f;         // ... and the low remainder
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = bits_float(static_cast<uint32_t>(n_int + 127) << 23);
  return x < -87.33f ? 0.0f : p * scale;
}

// erf(x) in fp32 without a libm call (vectorizable): Abramowitz & Stegun 7.1.26,
// erf(|x|) = 1 - t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-x^2), t = 1 / (1 + p |x|), odd in x.
// Absolute error < 6e-7 in fp32 (so gelu's error is < 4e-7); exactly +-1 once exp(-x^2) underflows.
inline float erf_f32(float x) {
  const float a = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  const float poly =
      t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  return std::copysign(1.0f - poly * exp_f32(-a * a), x);
}

}  // namespace phi_fast::cpu
