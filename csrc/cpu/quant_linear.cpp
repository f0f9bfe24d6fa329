// CPU kernels of the weight-only quantized linear layer: out = x @ dequantize(w)^T + bias, for decode-sized M.
//
// Math: out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), w[n, k] = q[n, k] * scale (formats: quant_linear.h),
// fp32 accumulation, rounded once to the dtype. Activations stay in their precision (widened to fp32): no
// activation quantization, so the only error against the model dtype is the weights' rounding.
// At decode the call is a read of the packed weights (int8: 1 byte, int4: ~0.53 byte per weight), so the loop
// order makes that read happen once: output rows are taken kRows at a time; for each chunk of kChunk inputs,
// the kRows x kChunk weights are dequantized into an fp32 buffer (8 KB, stays in L1) and every row of x is dotted
// with it (tiles of 2 rows of x, kRows accumulators each) before the next chunk is read. The dequantization is
// paid once per weight whatever M is; the fp32 products are M per weight.
// Vectorization (chosen at run time): AVX-512 (16 lanes) when avx512::enabled(), else AVX2 + FMA (8 lanes), else
// portable loops. x is widened into a zero-padded fp32 buffer so that the dot loops need no tail.
// Threads: N split into one contiguous range of kRows-row blocks per thread, only when the call is big enough to
// pay for a team (kernel_utils.h).
#include "cpu/quant_linear.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/kernel_utils.h"
#include "cpu/vec_avx2.h"
#include "cpu/vec_avx512.h"

namespace phi_fast::cpu {
namespace {

constexpr int64_t kChunk = 512;  // inputs per chunk: a multiple of every group size (32..128 | 512)
constexpr int64_t kRows = 4;     // output rows per block
constexpr int64_t kRun = 32;     // int4 weights per 16-byte run

// Single-core cost of dequantizing one weight (unpack + convert + scale + store), for the thread estimate.
constexpr double kDequantNsPerWeight = 0.15;

enum class Isa { portable, avx2, avx512 };

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Row n of an int4 weight: its 16-byte runs and its group scales.
struct Int4Row {
  const uint8_t* bytes;
  const float* scales;
};

inline Int4Row int4_row(const QuantWeight& w, int64_t n) {
  const int64_t kp = round_up(w.K, w.group_size);
  return {static_cast<const uint8_t*>(w.data) + n * (kp / 2), w.scales + n * (kp / w.group_size)};
}

// ---- dequantize w[n, k0 .. k0 + len) into dst: int8 writes len values, int4 whole runs (k0 % 32 == 0) ----

void dequant_portable(float* dst, const QuantWeight& w, int64_t n, int64_t k0, int64_t len) {
  if (w.format == QuantFormat::int8) {
    const int8_t* q = static_cast<const int8_t*>(w.data) + n * w.K + k0;
    const float s = w.scales[n];
    for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<float>(q[j]) * s;
    return;
  }
  const Int4Row row = int4_row(w, n);
  for (int64_t j = 0; j < len; j += kRun) {
    const uint8_t* b = row.bytes + (k0 + j) / 2;
    const float s = row.scales[(k0 + j) / w.group_size];
    for (int i = 0; i < 16; ++i) {
      dst[j + i] = static_cast<float>((b[i] & 15) - 8) * s;
      dst[j + 16 + i] = static_cast<float>((b[i] >> 4) - 8) * s;
    }
  }
}

#ifdef PHI_FAST_CPU_AVX2
// (q - 8) * s computed as fma(q, s, -8 s): the same single rounding of the same real number, so bit-identical.
PHI_FAST_TARGET_AVX2 void dequant_avx2(float* dst, const QuantWeight& w, int64_t n, int64_t k0, int64_t len) {
  if (w.format == QuantFormat::int8) {
    const int8_t* q = static_cast<const int8_t*>(w.data) + n * w.K + k0;
    const float s = w.scales[n];
    const __m256 vs = _mm256_set1_ps(s);
    int64_t j = 0;
    for (; j + 8 <= len; j += 8) {
      const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j)));
      _mm256_storeu_ps(dst + j, _mm256_mul_ps(_mm256_cvtepi32_ps(v), vs));
    }
    for (; j < len; ++j) dst[j] = static_cast<float>(q[j]) * s;
    return;
  }
  const Int4Row row = int4_row(w, n);
  const __m128i low_nibbles = _mm_set1_epi8(0x0F);
  for (int64_t j = 0; j < len; j += kRun) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row.bytes + (k0 + j) / 2));
    const float s = row.scales[(k0 + j) / w.group_size];
    const __m256 vs = _mm256_set1_ps(s), offset = _mm256_set1_ps(-8.0f * s);
    const __m128i lo = _mm_and_si128(b, low_nibbles), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low_nibbles);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int p = 0; p < 4; ++p) {
      const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[p]));
      _mm256_storeu_ps(dst + j + 8 * p, _mm256_fmadd_ps(q, vs, offset));
    }
  }
}

// acc[m * R + r] (8 lanes each) += wb row r . x row m over len inputs (len % 8 == 0); wb rows kChunk apart.
template <int MT, int R>
PHI_FAST_TARGET_AVX2 inline void dot_tile_avx2(float* acc, const float* wb, const float* x, int64_t x_stride,
                                               int64_t len) {
  __m256 a[MT][R];
  for (int m = 0; m < MT; ++m) {
    for (int r = 0; r < R; ++r) a[m][r] = _mm256_loadu_ps(acc + 8 * (m * R + r));
  }
  for (int64_t k = 0; k < len; k += 8) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm256_loadu_ps(wb + r * kChunk + k);
    for (int m = 0; m < MT; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * x_stride + k);
      for (int r = 0; r < R; ++r) a[m][r] = _mm256_fmadd_ps(wv[r], xv, a[m][r]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(acc + 8 * (m * R + r), a[m][r]);
  }
}

template <int R>
PHI_FAST_TARGET_AVX2 void dot_rows_avx2(float* acc, const float* wb, const float* x, int64_t x_stride, int64_t M,
                                        int64_t len) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) dot_tile_avx2<2, R>(acc + m * R * 8, wb, x + m * x_stride, x_stride, len);
  if (m < M) dot_tile_avx2<1, R>(acc + m * R * 8, wb, x + m * x_stride, x_stride, len);
}

PHI_FAST_TARGET_AVX2 float acc_sum_avx2(const float* acc) { return avx2::hsum(_mm256_loadu_ps(acc)); }
#endif

#ifdef PHI_FAST_CPU_AVX512
PHI_FAST_TARGET_AVX512 void dequant_avx512(float* dst, const QuantWeight& w, int64_t n, int64_t k0, int64_t len) {
  if (w.format == QuantFormat::int8) {
    const int8_t* q = static_cast<const int8_t*>(w.data) + n * w.K + k0;
    const float s = w.scales[n];
    const __m512 vs = _mm512_set1_ps(s);
    int64_t j = 0;
    for (; j + 16 <= len; j += 16) {
      const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j)));
      _mm512_storeu_ps(dst + j, _mm512_mul_ps(_mm512_cvtepi32_ps(v), vs));
    }
    for (; j < len; ++j) dst[j] = static_cast<float>(q[j]) * s;
    return;
  }
  const Int4Row row = int4_row(w, n);
  const __m128i low_nibbles = _mm_set1_epi8(0x0F);
  for (int64_t j = 0; j < len; j += kRun) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row.bytes + (k0 + j) / 2));
    const float s = row.scales[(k0 + j) / w.group_size];
    const __m512 vs = _mm512_set1_ps(s), offset = _mm512_set1_ps(-8.0f * s);
    const __m128i lo = _mm_and_si128(b, low_nibbles), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low_nibbles);
    _mm512_storeu_ps(dst + j, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), vs, offset));
    _mm512_storeu_ps(dst + j + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), vs, offset));
  }
}

// As dot_tile_avx2 with 16 lanes (len % 16 == 0) and tiles of up to 4 rows of x (32 zmm registers).
template <int MT, int R>
PHI_FAST_TARGET_AVX512 inline void dot_tile_avx512(float* acc, const float* wb, const float* x, int64_t x_stride,
                                                   int64_t len) {
  __m512 a[MT][R];
  for (int m = 0; m < MT; ++m) {
    for (int r = 0; r < R; ++r) a[m][r] = _mm512_loadu_ps(acc + 16 * (m * R + r));
  }
  for (int64_t k = 0; k < len; k += 16) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_ps(wb + r * kChunk + k);
    for (int m = 0; m < MT; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * x_stride + k);
      for (int r = 0; r < R; ++r) a[m][r] = _mm512_fmadd_ps(wv[r], xv, a[m][r]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(acc + 16 * (m * R + r), a[m][r]);
  }
}

template <int R>
PHI_FAST_TARGET_AVX512 void dot_rows_avx512(float* acc, const float* wb, const float* x, int64_t x_stride,
                                            int64_t M, int64_t len) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) dot_tile_avx512<4, R>(acc + m * R * 16, wb, x + m * x_stride, x_stride, len);
  for (; m < M; ++m) dot_tile_avx512<1, R>(acc + m * R * 16, wb, x + m * x_stride, x_stride, len);
}

PHI_FAST_TARGET_AVX512 float acc_sum_avx512(const float* acc) { return avx512::hsum(_mm512_loadu_ps(acc)); }
#endif

Isa pick_isa() {
#ifdef PHI_FAST_CPU_AVX512
  if (avx512::enabled()) return Isa::avx512;
#endif
#ifdef PHI_FAST_CPU_AVX2
  if (avx2::enabled()) return Isa::avx2;
#endif
  return Isa::portable;
}

int lanes(Isa isa) { return isa == Isa::avx512 ? 16 : (isa == Isa::avx2 ? 8 : 1); }

void dequant(Isa isa, float* dst, const QuantWeight& w, int64_t n, int64_t k0, int64_t len) {
#ifdef PHI_FAST_CPU_AVX512
  if (isa == Isa::avx512) return dequant_avx512(dst, w, n, k0, len);
#endif
#ifdef PHI_FAST_CPU_AVX2
  if (isa == Isa::avx2) return dequant_avx2(dst, w, n, k0, len);
#endif
  dequant_portable(dst, w, n, k0, len);
}

// acc (M x rows partial sums of lanes(isa) floats) += wb (rows x len, rows kChunk apart) . x rows.
void dot_rows(Isa isa, float* acc, const float* wb, int64_t rows, const float* x, int64_t x_stride, int64_t M,
              int64_t len) {
#ifdef PHI_FAST_CPU_AVX512
  if (isa == Isa::avx512) {
    return rows == kRows ? dot_rows_avx512<kRows>(acc, wb, x, x_stride, M, len)
                         : dot_rows_avx512<1>(acc, wb, x, x_stride, M, len);
  }
#endif
#ifdef PHI_FAST_CPU_AVX2
  if (isa == Isa::avx2) {
    return rows == kRows ? dot_rows_avx2<kRows>(acc, wb, x, x_stride, M, len)
                         : dot_rows_avx2<1>(acc, wb, x, x_stride, M, len);
  }
#endif
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t r = 0; r < rows; ++r) {
      const float* wr = wb + r * kChunk;
      const float* xm = x + m * x_stride;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < len; ++k) sum += wr[k] * xm[k];
      acc[m * rows + r] += sum;
    }
  }
}

float acc_sum(Isa isa, const float* acc) {
#ifdef PHI_FAST_CPU_AVX512
  if (isa == Isa::avx512) return acc_sum_avx512(acc);
#endif
#ifdef PHI_FAST_CPU_AVX2
  if (isa == Isa::avx2) return acc_sum_avx2(acc);
#endif
  return acc[0];
}

// Output rows [n0, n0 + rows) (rows = kRows or 1) for all M rows of x. xf: [M, x_stride] zero-padded fp32;
// wb: kRows x kChunk scratch; acc: M x kRows x 16 scratch.
template <typename T>
void block(Isa isa, T* out, const float* xf, int64_t x_stride, const QuantWeight& w, const float* bias, int64_t M,
           int64_t n0, int64_t rows, float* wb, float* acc) {
  const int64_t width = lanes(isa);
  std::fill(acc, acc + M * rows * width, 0.0f);
  for (int64_t k0 = 0; k0 < w.K; k0 += kChunk) {
    const int64_t len = std::min(kChunk, w.K - k0);
    const int64_t padded = round_up(len, 16);
    for (int64_t r = 0; r < rows; ++r) {
      float* dst = wb + r * kChunk;
      dequant(isa, dst, w, n0 + r, k0, len);
      if (w.format == QuantFormat::int8) std::fill(dst + len, dst + padded, 0.0f);  // int4 wrote whole runs
    }
    dot_rows(isa, acc, wb, rows, xf + k0, x_stride, M, padded);
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t r = 0; r < rows; ++r) {
      const float sum = acc_sum(isa, acc + (m * rows + r) * width);
      out[m * w.N + n0 + r] = from_float<T>(bias != nullptr ? sum + bias[n0 + r] : sum);
    }
  }
}

template <typename T>
void quant_linear_kernel(T* out, const T* x, int64_t x_stride, const QuantWeight& w, const T* bias, int64_t M,
                         int num_threads) {
  // x as zero-padded fp32 rows (whole 32-runs: the dot loops have no tail); bias as fp32.
  const int64_t xf_stride = round_up(std::max<int64_t>(w.K, 1), kRun);
  std::vector<float> xf(M * xf_stride, 0.0f), bf;
  for (int64_t m = 0; m < M; ++m) load_row(xf.data() + m * xf_stride, x + m * x_stride, w.K);
  if (bias != nullptr) {
    bf.resize(w.N);
    load_row(bf.data(), bias, w.N);
  }
  const float* bias_f = bias != nullptr ? bf.data() : nullptr;
  const Isa isa = pick_isa();
  const double weight_bytes = w.format == QuantFormat::int8 ? 1.0 : 0.5 + 4.0 / w.group_size;
  const double work_ns = std::max(stream_ns(weight_bytes * w.N * w.K),
                                  kDequantNsPerWeight * w.N * w.K + 2.0 * M * w.N * w.K / kGemmFlopsPerNs);
  const int64_t blocks = (w.N + kRows - 1) / kRows;
  parallel_rows(blocks, work_ns, num_threads, [&](int64_t block_begin, int64_t block_end) {
    std::vector<float> wb(kRows * kChunk), acc(M * kRows * 16);
    const int64_t end = std::min(block_end * kRows, w.N);
    int64_t n = block_begin * kRows;
    for (; n + kRows <= end; n += kRows) block(isa, out, xf.data(), xf_stride, w, bias_f, M, n, kRows, wb.data(), acc.data());
    for (; n < end; ++n) block(isa, out, xf.data(), xf_stride, w, bias_f, M, n, 1, wb.data(), acc.data());
  });
}

}  // namespace

void dequantize_rows(float* dst, int64_t dst_stride, const QuantWeight& w, int64_t n0, int64_t rows) {
  const Isa isa = pick_isa();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t len = w.format == QuantFormat::int4 ? round_up(w.K, kRun) : w.K;
    dequant(isa, dst + r * dst_stride, w, n0 + r, 0, len);
  }
}

void quant_linear(void* out, const void* x, int64_t x_stride, const QuantWeight& w, const void* bias, int64_t M,
                  DType dtype, int num_threads) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    quant_linear_kernel(static_cast<T*>(out), static_cast<const T*>(x), x_stride, w, static_cast<const T*>(bias), M,
                        num_threads);
  });
}

}  // namespace phi_fast::cpu
