// CPU kernels of the weight-only quantized linear layer: out = x @ dequantize(w)^T + bias.
//
// Decode-sized M (quant_linear): integer dot products, like llama.cpp's Q8_0 / Q4_0 x Q8_0. Each row of x is
// quantized on the fly to int8 in blocks of 32 inputs (scale = max|x| / 127, round to nearest even), then
//   out[m, n] = sum_blocks xs[m, b] * ws[n, g(b)] * sum_{k in b} qx[m, k] * q[n, k]   (+ bias[n])
// with the inner sums exact in int32 and the rest in fp32, rounded once to the dtype. The activation rounding is
// the kernel's only departure from the reference (dequantize, then matmul); python_tests/test_quant_* measure it.
// int4 weights enter the products as their stored nibbles q + 8 (unsigned, as the u8 x s8 instructions want);
// the 8 * sum(qx) surplus is taken off with a per-lane correction precomputed with x.
// Loop order: output rows kRows at a time, each packed weight read from memory once per call. Paths (chosen at run
// time): VNNI (AVX512-VNNI dpbusd on 64 int8 / 128 int4 weights per step) when avx512::enabled() and the CPU has it:
// weights unpacked in registers, every row of x multiplied with them; else AVX2 (maddubs + madd on 32 weights): in
// registers for one row of x (int4: two runs per 32-byte load, x reordered to match, PairX), and for more rows through
// a chunk buffer (per chunk of kChunk inputs the kRows rows laid out in lane order, int4 nibbles unpacked, then every
// row of x multiplied with it); else portable loops (the chunk buffer) with the same arithmetic. Decode GEMVs are
// read-bound, so each step prefetches its rows' lines ahead, into L2 and into L1. dequantize_rows (the prompt path:
// fp32 tiles for torch's GEMM) unpacks to fp32 exactly: AVX-512, AVX2 or scalar, its rows split over the threads.
// Threads: N split into one contiguous range of kRows-row blocks per thread, only when the call is big enough to pay
// for a team (kernel_utils.h).
#include "cpu/quant_linear.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/kernel_utils.h"
#include "cpu/quant_block.h"
#include "cpu/vec_avx2.h"
#include "cpu/vec_avx512.h"

namespace phi_fast::cpu {
namespace {

constexpr int64_t kChunk = 2048;  // inputs per chunk (a multiple of the 64-weight unit): 8 KB of buffer
constexpr int64_t kRows = 4;     // output rows per block
constexpr int64_t kRun = 32;     // int4 weights per 16-byte run; also the activation block
// How far ahead the L2 prefetch of a block's rows reaches: L1 prefetches alone hold a line fill buffer each
// through the DRAM latency, which capped int4 at ~20 GB/s; reaching ~32 KB ahead into L2 as well adds ~5-10%
// (16-128 KB measured alike, bench/NOTES.md).
constexpr int64_t kPrefetchFarBytes = 32 << 10;

// The L2 prefetch distance for blocks of block_bytes: whole blocks, at least one, about kPrefetchFarBytes.
inline int64_t far_ahead(int64_t block_bytes) {
  return std::max<int64_t>(1, (kPrefetchFarBytes + block_bytes - 1) / block_bytes) * block_bytes;
}

// The L1 prefetches reach kPrefetchNearBytes of the weight's traffic ahead along each row (RowAhead): the next
// block of rows for K = 2560, but not a whole block where that is longer (K = 10240: 20 KB of int4, 40 KB of int8,
// which evicted L1's lines before their use and ran fc2 ~25% below fc1).
constexpr int64_t kPrefetchNearBytes = 8 << 10;

// out[m, n] from a row's integer-kernel total: the int8 channel scale, the bias, the dtype.
template <typename T>
inline void write_out(T* out, const QuantWeight& w, const T* bias, int64_t m, int64_t n, float sum) {
  if (w.format == QuantFormat::int8) sum *= w.channel_scales()[n];
  out[m * w.N + n] = from_float<T>(bias != nullptr ? sum + to_float(bias[n]) : sum);
}

// Single-core cost of one weight x one row of x in the integer kernels (~1 instruction per 16 products), plus the
// per-weight unpacking, for the thread estimate.
constexpr double kNsPerProduct = 0.02;
constexpr double kNsPerWeight = 0.03;

enum class Isa { portable, avx2, vnni };

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Row n of an int4 weight: its 16-byte runs and its group scales.
struct Int4Row {
  const uint8_t* bytes;
  const uint16_t* scales;  // fp16 bits
};

inline Int4Row int4_row(const QuantWeight& w, int64_t n) {
  const int64_t kp = round_up(w.K, w.group_size);
  return {static_cast<const uint8_t*>(w.data) + n * (kp / 2), w.group_scales() + n * (kp / w.group_size)};
}

// ---- dequantize w[n, k0 .. k0 + len) into dst: int8 writes len values, int4 whole runs (k0 % 32 == 0) ----

void dequant_portable(float* dst, const QuantWeight& w, int64_t n, int64_t k0, int64_t len) {
  if (w.format == QuantFormat::int8) {
    const int8_t* q = static_cast<const int8_t*>(w.data) + n * w.K + k0;
    const float s = w.channel_scales()[n];
    for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<float>(q[j]) * s;
    return;
  }
  const Int4Row row = int4_row(w, n);
  for (int64_t j = 0; j < len; j += kRun) {
    const uint8_t* b = row.bytes + (k0 + j) / 2;
    const float s = half_to_float(row.scales[(k0 + j) / w.group_size]);
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
    const float s = w.channel_scales()[n];
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
    const float s = half_to_float(row.scales[(k0 + j) / w.group_size]);
    const __m256 vs = _mm256_set1_ps(s), offset = _mm256_set1_ps(-8.0f * s);
    const __m128i lo = _mm_and_si128(b, low_nibbles), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low_nibbles);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int p = 0; p < 4; ++p) {
      const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[p]));
      _mm256_storeu_ps(dst + j + 8 * p, _mm256_fmadd_ps(q, vs, offset));
    }
  }
}

#endif

#ifdef PHI_FAST_CPU_AVX512
PHI_FAST_TARGET_AVX512 void dequant_avx512(float* dst, const QuantWeight& w, int64_t n, int64_t k0, int64_t len) {
  if (w.format == QuantFormat::int8) {
    const int8_t* q = static_cast<const int8_t*>(w.data) + n * w.K + k0;
    const float s = w.channel_scales()[n];
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
    const float s = half_to_float(row.scales[(k0 + j) / w.group_size]);
    const __m512 vs = _mm512_set1_ps(s), offset = _mm512_set1_ps(-8.0f * s);
    const __m128i lo = _mm_and_si128(b, low_nibbles), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low_nibbles);
    _mm512_storeu_ps(dst + j, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), vs, offset));
    _mm512_storeu_ps(dst + j + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), vs, offset));
  }
}

#endif


// ---- integer kernels, AVX2 and portable: weights through a chunk buffer ----
//
// A unit is the inputs one instruction step covers: 32 (one ymm of bytes for AVX2; the portable loops use the
// same), inputs in order. Per unit, lanes_of(isa) fp32 lane values carry what each 32-bit lane of the int32
// products needs: the activation scale of its block, and (int4) the correction 8 * scale * (sum of the lane's qx).

int lanes_of(Isa isa) { return isa == Isa::avx2 ? 8 : 1; }

// x quantized for one call: q [M, units * 32], scale and corr [M, units, lanes] (portable: one value per unit).
struct QuantX {
  int64_t units = 0;
  int unit = 32, lanes = 1;
  std::vector<int8_t> q;
  std::vector<float> scale, corr;
};

template <typename T>
QuantX quantize_x(Isa isa, bool int4, const T* x, int64_t x_stride, int64_t M, int64_t K) {
  QuantX qx;
  qx.lanes = lanes_of(isa);
  qx.units = (K + kRun - 1) / kRun;
  const int64_t row = qx.units * kRun;
  const int lanes = qx.lanes, lane_width = kRun / lanes;  // inputs per 32-bit lane (4), or the whole unit
  const int64_t units = qx.units;
  qx.q.assign(M * row, 0);
  qx.scale.assign(M * units * lanes, 0.0f);
  qx.corr.assign(M * units * lanes, 0.0f);
  std::vector<float> xf(row);
  for (int64_t m = 0; m < M; ++m) {
    std::fill(xf.begin(), xf.end(), 0.0f);
    load_row(xf.data(), x + m * x_stride, K);
    for (int64_t u = 0; u < units; ++u) {
      int8_t* qb = qx.q.data() + m * row + u * kRun;
      const float s = quantize_block(xf.data() + u * kRun, qb);
      float* scale = qx.scale.data() + (m * units + u) * lanes;
      float* corr = qx.corr.data() + (m * units + u) * lanes;
      for (int l = 0; l < lanes; ++l) {
        scale[l] = s;
        if (int4) {
          int32_t sum = 0;
          for (int i = 0; i < lane_width; ++i) sum += qb[l * lane_width + i];
          corr[l] = 8.0f * s * static_cast<float>(sum);
        }
      }
    }
  }
  return qx;
}

// Prefetches for the bytes [p, p + len) of a row of a block of rows (row_bytes each, p at byte o of the row), a
// line at a time, as the VNNI tiles': far (far_ahead) into L2 and kPrefetchNearBytes of the block's traffic ahead
// into L1 (RowAhead): each block's rows are short streams that the hardware prefetchers pick up late (bench/NOTES.md,
// quantized decode v3). Prefetches never fault, so the last block's reach past the weight is harmless.
inline void prefetch_row_ahead(const void* p, int64_t len, int64_t o, int64_t rows, int64_t row_bytes) {
  const char* c = static_cast<const char*>(p);
  const int64_t far = far_ahead(rows * row_bytes);
  const RowAhead near(rows, row_bytes, kPrefetchNearBytes);
  for (int64_t i = 0; i < len; i += 64) {
    __builtin_prefetch(c + i + far, 0, 2);
    __builtin_prefetch(near(c + i, o + i), 0, 3);
  }
}

// The bytes [p, p + len) of the block of rows after this one, `ahead` bytes on, into L1 (int4's group scales: a
// few lines per block).
inline void prefetch_next_block(const void* p, int64_t len, int64_t ahead) {
  const char* next = static_cast<const char*>(p) + ahead;
  for (int64_t i = 0; i < len; i += 64) __builtin_prefetch(next + i, 0, 3);
}

// Weight rows [n0, n0 + rows) x inputs [k0, k0 + kChunk) as bytes in lane order into buf (rows kChunk apart;
// int8: the signed weights, int4: the unsigned nibbles q + 8; zeros past K). k0 % kChunk == 0.
void pack_chunk_portable(uint8_t* buf, const QuantWeight& w, int64_t n0, int64_t rows, int64_t k0) {
  const int64_t len = std::min(kChunk, w.K - k0);
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* dst = buf + r * kChunk;
    if (len < kChunk) std::memset(dst, 0, kChunk);
    if (w.format == QuantFormat::int8) {
      const int8_t* src = static_cast<const int8_t*>(w.data) + (n0 + r) * w.K + k0;
      prefetch_row_ahead(src, len, k0, rows, w.K);
      std::memcpy(dst, src, len);
      continue;
    }
    const uint8_t* src = int4_row(w, n0 + r).bytes + k0 / 2;
    for (int64_t run = 0; run < (len + kRun - 1) / kRun; ++run) {
      for (int i = 0; i < 16; ++i) {
        dst[run * kRun + i] = src[run * 16 + i] & 15;
        dst[run * kRun + 16 + i] = src[run * 16 + i] >> 4;
      }
    }
  }
}

#ifdef PHI_FAST_CPU_AVX2
// int4 in input order (the AVX2 and portable lane order): per run [16 low nibbles, 16 high nibbles].
PHI_FAST_TARGET_AVX2 void pack_chunk_int4_linear(uint8_t* buf, const QuantWeight& w, int64_t n0, int64_t rows,
                                                 int64_t k0) {
  const int64_t len = std::min(kChunk, w.K - k0), runs = (len + kRun - 1) / kRun;
  const __m128i low = _mm_set1_epi8(0x0F);
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* dst = buf + r * kChunk;
    if (len < kChunk) std::memset(dst, 0, kChunk);
    const Int4Row row = int4_row(w, n0 + r);
    const uint8_t* src = row.bytes + k0 / 2;
    const int64_t row_bytes = round_up(w.K, w.group_size) / 2, groups = row_bytes * 2 / w.group_size;
    prefetch_row_ahead(src, runs * 16, k0 / 2, rows, row_bytes);
    prefetch_next_block(row.scales + k0 / w.group_size, runs * kRun / w.group_size * 2, rows * groups * 2);
    for (int64_t run = 0; run < runs; ++run) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + run * 16));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + run * 32), _mm_and_si128(v, low));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + run * 32 + 16), _mm_and_si128(_mm_srli_epi16(v, 4), low));
    }
  }
}
#endif

void pack_chunk(Isa isa, uint8_t* buf, const QuantWeight& w, int64_t n0, int64_t rows, int64_t k0) {
#ifdef PHI_FAST_CPU_AVX2
  if (w.format == QuantFormat::int4 && isa == Isa::avx2) return pack_chunk_int4_linear(buf, w, n0, rows, k0);
#endif
  pack_chunk_portable(buf, w, n0, rows, k0);
}

// Everything one block of rows needs: the chunk's bytes, the rows' int4 group scales, the quantized x.
struct BlockArgs {
  const uint8_t* buf;  // rows x kChunk
  int64_t rows;
  const QuantWeight* w;
  int64_t n0, k0;
  const QuantX* qx;
  int64_t M;
  float* acc;  // [M, rows, lanes]
  const uint16_t* scales;  // int4: the block's first row of group scales (fp16 bits, [rows, groups])
  int64_t groups;       // int4: scales per row
  int group_shift;      // int4: log2(group size)
};

// int4 scale (fp16 bits) of input k's group in row r of the block.
inline uint16_t group_scale(const BlockArgs& a, int64_t r, int64_t k) {
  return a.scales[r * a.groups + (k >> a.group_shift)];
}

void chunk_portable(const BlockArgs& a) {
  const QuantWeight& w = *a.w;
  const int64_t len = std::min(kChunk, w.K - a.k0), units = (len + kRun - 1) / kRun;
  const int64_t row = a.qx->units * a.qx->unit;
  for (int64_t m = 0; m < a.M; ++m) {
    for (int64_t r = 0; r < a.rows; ++r) {
      float sum = 0.0f;
      for (int64_t u = 0; u < units; ++u) {
        const int64_t k = a.k0 + u * kRun, unit_index = k / kRun;
        const int8_t* xq = a.qx->q.data() + m * row + k;
        const uint8_t* wb = a.buf + r * kChunk + u * kRun;
        int32_t dot = 0;
        for (int i = 0; i < kRun; ++i) {
          dot += (w.format == QuantFormat::int8 ? static_cast<int8_t>(wb[i]) : wb[i]) * xq[i];
        }
        const float s = a.qx->scale[m * a.qx->units + unit_index];
        if (w.format == QuantFormat::int8) {
          sum += static_cast<float>(dot) * s;
        } else {
          const float t = static_cast<float>(dot) * s - a.qx->corr[m * a.qx->units + unit_index];
          sum += t * half_to_float(group_scale(a, r, k));
        }
      }
      a.acc[m * a.rows + r] += sum;
    }
  }
}

#ifdef PHI_FAST_CPU_AVX2
// MT rows of x (from m0) x R weight rows, one chunk; acc lane vectors of 8.
template <int MT, int R>
PHI_FAST_TARGET_AVX2 void tile_avx2(const BlockArgs& a, int64_t m0) {
  const QuantWeight& w = *a.w;
  const bool int4 = w.format == QuantFormat::int4;
  const int64_t len = std::min(kChunk, w.K - a.k0), units = (len + kRun - 1) / kRun;
  const int64_t row = a.qx->units * a.qx->unit;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MT][R];
  for (int m = 0; m < MT; ++m) {
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_loadu_ps(a.acc + ((m0 + m) * a.rows + r) * 8);
  }
  for (int64_t u = 0; u < units; ++u) {
    const int64_t k = a.k0 + u * kRun, unit_index = k / kRun;
    __m256i wv[R];
    __m256 ws[R];
    for (int r = 0; r < R; ++r) {
      wv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.buf + r * kChunk + u * kRun));
      ws[r] = _mm256_set1_ps(int4 ? _cvtsh_ss(group_scale(a, r, k)) : 1.0f);
    }
    for (int m = 0; m < MT; ++m) {
      const int64_t mm = m0 + m;
      const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.qx->q.data() + mm * row + k));
      const __m256 xs = _mm256_loadu_ps(a.qx->scale.data() + (mm * a.qx->units + unit_index) * 8);
      if (int4) {
        const __m256 corr = _mm256_loadu_ps(a.qx->corr.data() + (mm * a.qx->units + unit_index) * 8);
        for (int r = 0; r < R; ++r) {
          const __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(wv[r], xq), ones);  // nibbles u8 x qx s8
          const __m256 t = _mm256_fmsub_ps(_mm256_cvtepi32_ps(d), xs, corr);
          acc[m][r] = _mm256_fmadd_ps(t, ws[r], acc[m][r]);
        }
      } else {
        const __m256i ax = _mm256_abs_epi8(xq);
        for (int r = 0; r < R; ++r) {  // |qx| u8 x sign(qx) * w s8: pairs stay within int16
          const __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv[r], xq)), ones);
          acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), xs, acc[m][r]);
        }
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(a.acc + ((m0 + m) * a.rows + r) * 8, acc[m][r]);
  }
}

template <int R>
PHI_FAST_TARGET_AVX2 void chunk_avx2(const BlockArgs& a) {
  int64_t m = 0;
  for (; m + 2 <= a.M; m += 2) tile_avx2<2, R>(a, m);
  if (m < a.M) tile_avx2<1, R>(a, m);
}

PHI_FAST_TARGET_AVX2 float lane_sum_avx2(const float* v) { return avx2::hsum(_mm256_loadu_ps(v)); }

// Batch-1 decode with the weights unpacked in registers (no chunk buffer: every packed byte goes from memory
// straight into the products; more rows of x take the chunk buffer, which unpacks each weight once for all of
// them). sums[r] gets row n0 + r's total before the int8 channel scale. Each step also prefetches, as tile_vnni.

// One unit u of int8 rows: w points at each row's unit u (rows row_stride apart).
template <int R>
PHI_FAST_TARGET_AVX2 inline void int8_unit(__m256* acc, const int8_t* w, int64_t row_stride, const QuantX& qx,
                                           int64_t u) {
  const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx.q.data() + u * kRun));
  const __m256 xs = _mm256_loadu_ps(qx.scale.data() + u * 8);
  const __m256i ax = _mm256_abs_epi8(xq);
  for (int r = 0; r < R; ++r) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * row_stride));
    // |qx| u8 x sign(qx) * w s8: pairs stay within int16
    const __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv, xq)), _mm256_set1_epi16(1));
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), xs, acc[r]);
  }
}

// int8: units of 32 inputs in input order, as quantize_x lays x out; arithmetic as tile_avx2. The rows' last,
// partial unit goes through a zero-padded copy after the loop (never reading past a row), so the loop body holds
// no call and keeps its accumulators in registers.
template <int R>
PHI_FAST_TARGET_AVX2 void row_int8_avx2(float* sums, const QuantWeight& w, int64_t n0, const QuantX& qx) {
  const int64_t K = w.K, full_units = K / kRun;
  const int64_t far = far_ahead(R * K);
  const RowAhead near(R, K, kPrefetchNearBytes);
  const int8_t* wrow = static_cast<const int8_t*>(w.data) + n0 * K;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t u = 0; u < full_units; ++u) {
    if (u % 2 == 0) {
      for (int r = 0; r < R; ++r) {
        __builtin_prefetch(wrow + r * K + u * kRun + far, 0, 2);
        __builtin_prefetch(near(wrow + r * K + u * kRun, u * kRun), 0, 3);
      }
    }
    int8_unit<R>(acc, wrow + u * kRun, K, qx, u);
  }
  if (full_units < qx.units) {
    alignas(32) int8_t tail[R][kRun] = {};
    for (int r = 0; r < R; ++r) std::memcpy(tail[r], wrow + r * K + full_units * kRun, K - full_units * kRun);
    int8_unit<R>(acc, tail[0], kRun, qx, full_units);
  }
  for (int r = 0; r < R; ++r) sums[r] = avx2::hsum(acc[r]);
}

// x for the int4 kernel: per pair of runs (64 inputs, run0 then run1) the lane order of one 32-byte load of the
// two runs' packed bytes after splitting the nibbles: q [pairs, 64] = [run0 in 0-15, run1 in 0-15] (the low
// nibbles) then [run0 in 16-31, run1 in 16-31] (the high nibbles); scale and corr [pairs, 8], lanes 0-3 run0's,
// 4-7 run1's, where lane j sums the products of inputs 4j..4j+3 and 16+4j..16+4j+3 of its run.
struct PairX {
  int64_t pairs = 0;
  std::vector<int8_t> q;
  std::vector<float> scale, corr;
};

// quantize_x's int4 AVX2 layout (input order, lane l = inputs 4l..4l+3 of the unit) reordered into pairs.
PairX pair_order(const QuantX& qx) {
  PairX px;
  px.pairs = (qx.units + 1) / 2;
  px.q.assign(px.pairs * 64, 0);
  px.scale.assign(px.pairs * 8, 0.0f);
  px.corr.assign(px.pairs * 8, 0.0f);
  for (int64_t u = 0; u < qx.units; ++u) {
    const int64_t p = u / 2, h = u % 2;
    const int8_t* src = qx.q.data() + u * kRun;
    std::memcpy(px.q.data() + p * 64 + h * 16, src, 16);
    std::memcpy(px.q.data() + p * 64 + 32 + h * 16, src + 16, 16);
    for (int j = 0; j < 4; ++j) {
      px.scale[p * 8 + h * 4 + j] = qx.scale[u * 8 + j];
      px.corr[p * 8 + h * 4 + j] = qx.corr[u * 8 + j] + qx.corr[u * 8 + j + 4];
    }
  }
  return px;
}

// int4, one pair of runs of R weight rows (b: row 0's 32 bytes, rows row_bytes apart; for the row's last, lone
// run the caller passes a zero-padded copy). ws[r]: the pair's weight scales, lanes 0-3 run0's, 4-7 run1's.
template <int R>
PHI_FAST_TARGET_AVX2 inline void int4_pair(__m256* acc, const uint8_t* b, int64_t row_bytes, const PairX& px,
                                           int64_t p, const __m256* ws) {
  const __m256i xlo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(px.q.data() + p * 64));
  const __m256i xhi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(px.q.data() + p * 64 + 32));
  const __m256 xs = _mm256_loadu_ps(px.scale.data() + p * 8);
  const __m256 corr = _mm256_loadu_ps(px.corr.data() + p * 8);
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int r = 0; r < R; ++r) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + r * row_bytes));
    const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    const __m256i d16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi));
    const __m256 d = _mm256_cvtepi32_ps(_mm256_madd_epi16(d16, _mm256_set1_epi16(1)));
    acc[r] = _mm256_fmadd_ps(_mm256_fmsub_ps(d, xs, corr), ws[r], acc[r]);
  }
}

// int4: per pair and weight row one 32-byte load (two runs), the nibbles split with and / shift, and the low and
// high halves' u8 x s8 products added in int16 (at most 2 * 2 * 15 * 127 = 7620) before one madd: about half of
// the instructions per weight of one 16-byte run at a time (bench/NOTES.md). The block's fp16 group scales are
// widened to fp32 into scales ([R, groups]) first, and the next block's are prefetched. The loop takes two pairs
// (one cache line of each row) per step, so its prefetches need no condition; the rows' last pair or lone run
// come after it.
template <int R, bool kGroup32>
PHI_FAST_TARGET_AVX2 void row_int4_avx2(float* sums, const QuantWeight& w, int64_t n0, const PairX& px,
                                        float* scales) {
  const int64_t kp = round_up(w.K, w.group_size), row_bytes = kp / 2, groups = kp / w.group_size;
  const int64_t runs = kp / kRun, pairs = px.pairs;
  const int shift = __builtin_ctzll(static_cast<uint64_t>(w.group_size));
  const int64_t far = far_ahead(R * row_bytes);
  const RowAhead near(R, row_bytes, kPrefetchNearBytes);
  const uint8_t* wrow = static_cast<const uint8_t*>(w.data) + n0 * row_bytes;
  const uint16_t* srow = w.group_scales() + n0 * groups;
  int64_t i = 0;
  for (; i + 8 <= R * groups; i += 8) {
    _mm256_storeu_ps(scales + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(srow + i))));
  }
  for (; i < R * groups; ++i) scales[i] = _cvtsh_ss(srow[i]);
  const char* next_scales = reinterpret_cast<const char*>(srow + R * groups);
  for (int64_t j = 0; j < R * groups * 2; j += 64) __builtin_prefetch(next_scales + j, 0, 3);
  const __m256i first = _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0), second = _mm256_set_epi32(3, 3, 3, 3, 2, 2, 2, 2);
  __m256 acc[R], ws[R], ws2[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  int64_t p = 0;
  for (; p + 2 <= pairs && 2 * p + 4 <= runs; p += 2) {
    const uint8_t* b = wrow + p * 32;
    for (int r = 0; r < R; ++r) {
      __builtin_prefetch(b + r * row_bytes + far, 0, 2);
      __builtin_prefetch(near(b + r * row_bytes, p * 32), 0, 3);
      const float* s = scales + r * groups;
      if constexpr (kGroup32) {  // the two pairs' four scales
        const __m256 four = _mm256_castps128_ps256(_mm_loadu_ps(s + 2 * p));
        ws[r] = _mm256_permutevar8x32_ps(four, first);
        ws2[r] = _mm256_permutevar8x32_ps(four, second);
      } else {
        ws[r] = _mm256_set1_ps(s[(p * 64) >> shift]);
        ws2[r] = _mm256_set1_ps(s[((p + 1) * 64) >> shift]);
      }
    }
    int4_pair<R>(acc, b, row_bytes, px, p, ws);
    int4_pair<R>(acc, b + 32, row_bytes, px, p + 1, ws2);
  }
  for (; p < pairs; ++p) {  // at most two pairs left, the last maybe a lone run: through zero-padded copies
    const bool lone = 2 * p + 1 == runs;
    alignas(32) uint8_t tail[R][32] = {};
    for (int r = 0; r < R; ++r) {
      std::memcpy(tail[r], wrow + r * row_bytes + p * 32, lone ? 16 : 32);
      const float* s = scales + r * groups;
      const float s0 = s[(p * 64) >> shift], s1 = lone ? 0.0f : s[(p * 64 + 32) >> shift];
      ws[r] = _mm256_set_m128(_mm_set1_ps(s1), _mm_set1_ps(s0));
    }
    int4_pair<R>(acc, tail[0], 32, px, p, ws);
  }
  for (int r = 0; r < R; ++r) sums[r] = avx2::hsum(acc[r]);
}

// One row of x times every weight row: blocks of kRows rows on each thread, then the rows left one at a time.
template <typename T>
void decode_avx2(T* out, const QuantWeight& w, const T* bias, const QuantX& qx, double work_ns, int num_threads) {
  const bool int4 = w.format == QuantFormat::int4;
  const PairX px = int4 ? pair_order(qx) : PairX{};
  const int64_t groups = int4 ? round_up(w.K, w.group_size) / w.group_size : 0;
  parallel_rows((w.N + kRows - 1) / kRows, work_ns, num_threads, [&](int64_t block_begin, int64_t block_end) {
    float sums[kRows];
    std::vector<float> scales(kRows * groups);
    const int64_t end = std::min(block_end * kRows, w.N);
    for (int64_t n0 = block_begin * kRows; n0 < end;) {
      const int64_t rows = n0 + kRows <= end ? kRows : 1;
      if (!int4) {
        rows == kRows ? row_int8_avx2<kRows>(sums, w, n0, qx) : row_int8_avx2<1>(sums, w, n0, qx);
      } else if (w.group_size == 32) {
        rows == kRows ? row_int4_avx2<kRows, true>(sums, w, n0, px, scales.data())
                      : row_int4_avx2<1, true>(sums, w, n0, px, scales.data());
      } else {
        rows == kRows ? row_int4_avx2<kRows, false>(sums, w, n0, px, scales.data())
                      : row_int4_avx2<1, false>(sums, w, n0, px, scales.data());
      }
      for (int64_t r = 0; r < rows; ++r) write_out(out, w, bias, 0, n0 + r, sums[r]);
      n0 += rows;
    }
  });
}
#endif

#ifdef PHI_FAST_CPU_AVX512
// ---- integer kernels, AVX512-VNNI: weights unpacked in registers ----
//
// dpbusd multiplies u8 x s8 and sums 4 products per int32 lane. Weights are the u8 operand: int8 as w ^ 0x80 =
// w + 128, int4 as the stored nibbles q + 8; the offset is cancelled in int32 by starting each lane's sum at
// -offset * (sum of the lane's qx), so the integer sums are exact and x alone pays for the offset. A unit is what
// one step of the inner loop takes of each weight row: int8 64 inputs (one zmm of weight bytes, one dpbusd); int4
// 128 inputs, one 64-byte load of four runs r0..r3 split into its low and its high nibbles, two zmm whose 128-bit
// lane j holds run rj's inputs 0..15, resp. 16..31; both go through dpbusd into the same int32 lanes, so a lane
// sums 8 products of one run and the float step covers 128 inputs (half the unpacking, conversions and FMAs of
// 64-input units; bench/NOTES.md, quantized decode v5). x (VnniX) holds its int8 per unit in the same lane order.
// Per unit and row of x, one float step per weight row: acc += float(dot) * (x block scale * weight group scale)
// lane by lane (int8: the per-channel scale once at the end). Rows of x come kMt at a time with their kRows x kMt
// accumulators in registers over the whole of K; more rows of x re-read the block's packed rows (from L1 / L2)
// and unpack them again. Each unit also prefetches a line of each row ahead (far_ahead, RowAhead), and int4's fp16
// group scales are widened once per block (at decode already multiplied by x's block scales, so the inner loop's
// float step is one FMA, as int8's).

#define PHI_FAST_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

bool vnni_enabled() {
  static const bool use = avx512::enabled() && __builtin_cpu_supports("avx512vnni");
  return use;
}

constexpr int64_t kUnit8 = 64, kUnit4 = 128;  // inputs per unit
constexpr int kMt = 2;                         // rows of x per register tile

// x quantized for the VNNI kernels: per row m and unit u (index m * units + u) the unit's int8 in lane order
// (zeros past K), 16 lane scales (the lane's block scale max|x| / 127) and 16 int32 dpbusd starts
// (-offset * lane sum).
struct VnniX {
  int64_t unit = 0, units = 0;     // inputs per unit, units per row
  std::vector<int8_t> q;           // [M, units, unit]
  std::vector<float> scale;        // [M, units, 16]
  std::vector<int32_t> start;      // [M, units, 16]
  std::vector<float> block_scale;  // [M, runs()]: each block of 32's scale, for folding into int4's scales
  int64_t runs() const { return units * unit / kRun; }
};

// 16 inputs x[k .. k + 16) as fp32, zeros at k + i >= K.
template <typename T>
PHI_FAST_TARGET_VNNI inline __m512 load16(const T* x, int64_t k, int64_t K) {
  const int64_t left = K - k;
  const __mmask16 mask = left >= 16 ? 0xFFFF : (left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1));
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(mask, left > 0 ? x + k : x);
  } else if constexpr (std::is_same_v<T, Half>) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, left > 0 ? x + k : x));
  } else {
    const __m512i bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, left > 0 ? x + k : x));
    return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
  }
}

// The 16 int8 of round_even(v * inv), clamped to [-127, 127] (the rounding is MXCSR's default, to nearest even).
PHI_FAST_TARGET_VNNI inline __m128i quantize16(__m512 v, __m512 inv) {
  const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));
  return _mm512_cvtsepi32_epi8(_mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127)));
}

template <typename T>
PHI_FAST_TARGET_VNNI VnniX quantize_x_vnni(bool int4, const T* x, int64_t x_stride, int64_t M, int64_t K) {
  VnniX qx;
  qx.unit = int4 ? kUnit4 : kUnit8;
  qx.units = (K + qx.unit - 1) / qx.unit;
  const int64_t unit = qx.unit, units = qx.units;
  const int blocks = static_cast<int>(unit / kRun);  // blocks of 32 per unit: 2 (int8) or 4 (int4)
  const int block_lanes = 16 / blocks;               // int32 lanes of one block: 8, or one 128-bit lane
  qx.q.resize(M * units * unit);
  qx.scale.resize(M * units * 16);
  qx.start.resize(M * units * 16);
  qx.block_scale.resize(M * units * blocks);
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  const __m512i ones = _mm512_set1_epi8(1);
  const __m512i neg_offset = _mm512_set1_epi32(int4 ? -8 : -128);
  for (int64_t m = 0; m < M; ++m) {
    const T* row = x + m * x_stride;
    for (int64_t u = 0; u < units; ++u) {
      const int64_t index = m * units + u;
      int8_t* q = qx.q.data() + index * unit;
      alignas(64) float lane_scale[16];
      for (int b = 0; b < blocks; ++b) {
        const int64_t k = u * unit + b * kRun;
        const __m512 v0 = load16(row, k, K), v1 = load16(row, k + 16, K);
        const __m512 a = _mm512_max_ps(_mm512_and_ps(v0, abs_mask), _mm512_and_ps(v1, abs_mask));
        const float amax = _mm512_reduce_max_ps(a);
        const float s = amax / 127.0f;
        qx.block_scale[index * blocks + b] = s;
        const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        // int8: the block's 32 bytes in order; int4: its halves into lane b of the low, resp. high nibbles' zmm.
        int8_t* first = q + (int4 ? 16 * b : 32 * b);
        int8_t* second = int4 ? first + 64 : first + 16;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(first), quantize16(v0, inv));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(second), quantize16(v1, inv));
        for (int l = 0; l < block_lanes; ++l) lane_scale[b * block_lanes + l] = s;
      }
      _mm512_storeu_ps(qx.scale.data() + index * 16, _mm512_load_ps(lane_scale));
      __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(q));
      if (int4) sums = _mm512_dpbusd_epi32(sums, ones, _mm512_loadu_si512(q + 64));
      _mm512_storeu_si512(qx.start.data() + index * 16, _mm512_mullo_epi32(sums, neg_offset));
    }
  }
  return qx;
}

// A tile's accumulators: A per (row of x, weight row), taken by units in turn: with few rows in a tile one FMA
// chain would bound the loop by the FMA latency (a unit's only loop-carried dependency).
template <int MT, int R>
struct TileAcc {
  static constexpr int A = MT * R >= 4 ? 1 : 4 / (MT * R);
  __m512 v[MT][R][A];
  PHI_FAST_TARGET_VNNI TileAcc() {
    for (auto& per_m : v) {
      for (auto& per_r : per_m) {
        for (auto& a : per_r) a = _mm512_setzero_ps();
      }
    }
  }
  // sums[m * R + r]: the lanes and chains of (m, r) added up.
  PHI_FAST_TARGET_VNNI void reduce(float* sums) const {
    for (int m = 0; m < MT; ++m) {
      for (int r = 0; r < R; ++r) {
        __m512 total = v[m][r][0];
        for (int a = 1; a < A; ++a) total = _mm512_add_ps(total, v[m][r][a]);
        sums[m * R + r] = _mm512_reduce_add_ps(total);
      }
    }
  }
};

// MT rows of x (from m0) times the int8 weight rows n0 .. n0 + R - 1 over all of K: out[m * N + n0 + r] before
// the channel scale and the bias into sums[m * R + r].
template <int MT, int R>
PHI_FAST_TARGET_VNNI void tile_vnni_int8(float* sums, const QuantWeight& w, int64_t n0, const VnniX& qx, int64_t m0) {
  const int64_t K = w.K, units = qx.units;
  const uint8_t* wrow = static_cast<const uint8_t*>(w.data) + n0 * K;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t far = far_ahead(R * K);
  const RowAhead near(R, K, kPrefetchNearBytes);
  TileAcc<MT, R> acc;
  constexpr int A = TileAcc<MT, R>::A;
  for (int64_t u0 = 0; u0 < units; u0 += A) {
#pragma GCC unroll 4
    for (int a = 0; a < A && u0 + a < units; ++a) {
      const int64_t u = u0 + a;
      const __mmask64 mask = (u + 1) * kUnit8 <= K ? ~__mmask64{0} : (__mmask64{1} << (K - u * kUnit8)) - 1;
      __m512i wv[R];
      for (int r = 0; r < R; ++r) {
        const uint8_t* p = wrow + r * K + u * kUnit8;
        // A line at a time: ~32 KB ahead into L2, ~8 KB ahead into L1 (RowAhead).
        __builtin_prefetch(p + far, 0, 2);
        __builtin_prefetch(near(p, u * kUnit8), 0, 3);
        wv[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, p), flip);
      }
      for (int m = 0; m < MT; ++m) {
        const int64_t index = (m0 + m) * units + u;
        const __m512i xq = _mm512_loadu_si512(qx.q.data() + index * kUnit8);
        const __m512 xs = _mm512_loadu_ps(qx.scale.data() + index * 16);
        const __m512i start = _mm512_loadu_si512(qx.start.data() + index * 16);
        for (int r = 0; r < R; ++r) {
          const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, wv[r], xq));
          acc.v[m][r][a] = _mm512_fmadd_ps(dot, xs, acc.v[m][r][a]);
        }
      }
    }
  }
  acc.reduce(sums);
}

// The same for int4 weight rows; scales: the block's fp32 run scales [R, runs] (kFolded: times x's block scales).
template <int MT, int R, bool kFolded>
PHI_FAST_TARGET_VNNI void tile_vnni_int4(float* sums, const QuantWeight& w, int64_t n0, const VnniX& qx, int64_t m0,
                                         const float* scales) {
  const int64_t units = qx.units, runs = qx.runs();
  const int64_t kp = round_up(w.K, w.group_size), row_bytes = kp / 2, groups = kp / w.group_size;
  const int shift = __builtin_ctzll(static_cast<uint64_t>(w.group_size));
  const uint8_t* wrow = static_cast<const uint8_t*>(w.data) + n0 * row_bytes;
  const uint16_t* next_scales = w.group_scales() + (n0 + R) * groups;  // for the prefetch
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);  // run j to lane j
  const int64_t far = far_ahead(R * row_bytes);
  const RowAhead near(R, row_bytes, kPrefetchNearBytes);
  constexpr int64_t kUnitBytes = kUnit4 / 2;  // one cache line of each row
  TileAcc<MT, R> acc;
  constexpr int A = TileAcc<MT, R>::A;
  for (int64_t u0 = 0; u0 < units; u0 += A) {
#pragma GCC unroll 4
    for (int a = 0; a < A && u0 + a < units; ++a) {
      const int64_t u = u0 + a;
      const int64_t left = row_bytes - u * kUnitBytes;  // the row's bytes from this unit on: 16..48 in a last one
      const __mmask64 mask = left >= kUnitBytes ? ~__mmask64{0} : (__mmask64{1} << left) - 1;
      __m512i lo[R], hi[R];
      __m512 ws[R];
      for (int r = 0; r < R; ++r) {
        const uint8_t* p = wrow + r * row_bytes + u * kUnitBytes;
        __builtin_prefetch(p + far, 0, 2);
        __builtin_prefetch(near(p, u * kUnitBytes), 0, 3);
        if (u % 8 == 0) __builtin_prefetch(next_scales + r * groups + (u * kUnit4 >> shift), 0, 3);
        const __m512i v = _mm512_maskz_loadu_epi8(mask, p);
        lo[r] = _mm512_and_si512(v, low);
        hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        ws[r] = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(scales + r * runs + 4 * u)));
      }
      for (int m = 0; m < MT; ++m) {
        const int64_t index = (m0 + m) * units + u;
        const int8_t* xq = qx.q.data() + index * kUnit4;
        const __m512i xlo = _mm512_loadu_si512(xq), xhi = _mm512_loadu_si512(xq + 64);
        const __m512i start = _mm512_loadu_si512(qx.start.data() + index * 16);
        // x's block scales (folded: already in ws).
        const __m512 xs = kFolded ? _mm512_setzero_ps() : _mm512_loadu_ps(qx.scale.data() + index * 16);
        for (int r = 0; r < R; ++r) {
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start, lo[r], xlo), hi[r], xhi);
          const __m512 scale = kFolded ? ws[r] : _mm512_mul_ps(xs, ws[r]);
          acc.v[m][r][a] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc.v[m][r][a]);
        }
      }
    }
  }
  acc.reduce(sums);
}

// Weight rows n0 .. n0 + R - 1 times every row of x. int4: the rows' fp16 group scales are widened to fp32 once
// per block into scratch, one per run of 32 inputs ([R, runs]), so the inner loop takes a unit's four with one
// load and a permute; with one row of x (decode) each is multiplied by x's scale of the same block there too,
// which takes a multiply per unit and row out of the inner loop.
template <int R>
PHI_FAST_TARGET_VNNI void rows_vnni(float* sums, const QuantWeight& w, int64_t n0, const VnniX& qx, int64_t M,
                                    float* scratch) {
  int64_t m = 0;
  if (w.format == QuantFormat::int8) {
    for (; m + kMt <= M; m += kMt) tile_vnni_int8<kMt, R>(sums + m * R, w, n0, qx, m);
    if (m < M) tile_vnni_int8<1, R>(sums + m * R, w, n0, qx, m);
    return;
  }
  const bool folded = M == 1;
  const int64_t groups = round_up(w.K, w.group_size) / w.group_size, runs = qx.runs();
  const int64_t runs_per_group = w.group_size / kRun;
  for (int r = 0; r < R; ++r) {
    const uint16_t* src = w.group_scales() + (n0 + r) * groups;
    float* dst = scratch + r * runs;
    if (runs_per_group == 1) {
      for (int64_t i = 0; i < runs; i += 16) {  // runs past K (x's zero padding) take scale 0
        const int64_t left = std::min<int64_t>(groups - i, 16);
        const __mmask16 mask = left >= 16 ? 0xFFFF : (left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1));
        const __mmask16 row_mask = runs - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (runs - i)) - 1);
        __m512 v = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, src + (left > 0 ? i : 0)));
        if (folded) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(row_mask, qx.block_scale.data() + i));
        _mm512_mask_storeu_ps(dst + i, row_mask, v);
      }
    } else {
      for (int64_t i = 0; i < runs; ++i) {
        const int64_t g = i / runs_per_group;
        const float v = g < groups ? _cvtsh_ss(src[g]) : 0.0f;
        dst[i] = folded ? v * qx.block_scale[i] : v;
      }
    }
  }
  if (folded) return tile_vnni_int4<1, R, true>(sums, w, n0, qx, 0, scratch);
  for (; m + kMt <= M; m += kMt) tile_vnni_int4<kMt, R, false>(sums + m * R, w, n0, qx, m, scratch);
  if (m < M) tile_vnni_int4<1, R, false>(sums + m * R, w, n0, qx, m, scratch);
}

template <typename T>
void quant_linear_vnni(T* out, const T* x, int64_t x_stride, const QuantWeight& w, const T* bias, int64_t M,
                       double work_ns, int num_threads) {
  const bool int4 = w.format == QuantFormat::int4;
  const VnniX qx = quantize_x_vnni(int4, x, x_stride, M, w.K);
  const int64_t blocks = (w.N + kRows - 1) / kRows;
  parallel_rows(blocks, work_ns, num_threads, [&](int64_t block_begin, int64_t block_end) {
    std::vector<float> sums(M * kRows);
    std::vector<float> scales(int4 ? kRows * qx.runs() : 0);  // rows_vnni's fp32 run scales of one block
    const int64_t end = std::min(block_end * kRows, w.N);
    for (int64_t n0 = block_begin * kRows; n0 < end;) {
      const int64_t rows = n0 + kRows <= end ? kRows : 1;
      if (rows == kRows) {
        rows_vnni<kRows>(sums.data(), w, n0, qx, M, scales.data());
      } else {
        rows_vnni<1>(sums.data(), w, n0, qx, M, scales.data());
      }
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t r = 0; r < rows; ++r) write_out(out, w, bias, m, n0 + r, sums[m * rows + r]);
      }
      n0 += rows;
    }
  });
}

#endif

Isa pick_isa() {
#ifdef PHI_FAST_CPU_AVX512
  if (vnni_enabled()) return Isa::vnni;
#endif
#ifdef PHI_FAST_CPU_AVX2
  if (avx2::enabled()) return Isa::avx2;
#endif
  return Isa::portable;
}

void run_chunk(Isa isa, const BlockArgs& a) {
#ifdef PHI_FAST_CPU_AVX2
  if (isa == Isa::avx2) return a.rows == kRows ? chunk_avx2<kRows>(a) : chunk_avx2<1>(a);
#endif
  chunk_portable(a);
}

float lane_sum(Isa isa, const float* v) {
#ifdef PHI_FAST_CPU_AVX2
  if (isa == Isa::avx2) return lane_sum_avx2(v);
#endif
  return v[0];
}

template <typename T>
void quant_linear_kernel(T* out, const T* x, int64_t x_stride, const QuantWeight& w, const T* bias, int64_t M,
                         int num_threads) {
  const Isa isa = pick_isa();
  const double weight_bytes = w.format == QuantFormat::int8 ? 1.0 : 0.5 + 2.0 / w.group_size;
  const double weights = static_cast<double>(w.N) * w.K;
  const double work_ns = std::max(stream_ns(weight_bytes * weights), weights * (kNsPerWeight + M * kNsPerProduct));
#ifdef PHI_FAST_CPU_AVX512
  if (isa == Isa::vnni) {
    return quant_linear_vnni(out, x, x_stride, w, bias, M, work_ns, num_threads);
  }
#endif
  const QuantX qx = quantize_x(isa, w.format == QuantFormat::int4, x, x_stride, M, w.K);
#ifdef PHI_FAST_CPU_AVX2
  if (isa == Isa::avx2 && M == 1) return decode_avx2(out, w, bias, qx, work_ns, num_threads);
#endif
  const int lanes = qx.lanes;
  const int64_t blocks = (w.N + kRows - 1) / kRows;
  const bool int4 = w.format == QuantFormat::int4;
  const int64_t groups = int4 ? round_up(w.K, w.group_size) / w.group_size : 1;
  const int group_shift = int4 ? __builtin_ctzll(static_cast<uint64_t>(w.group_size)) : 0;
  const uint16_t* scales = int4 ? w.group_scales() : nullptr;
  parallel_rows(blocks, work_ns, num_threads, [&](int64_t block_begin, int64_t block_end) {
    std::vector<uint8_t> buf(kRows * kChunk);
    std::vector<float> acc(M * kRows * lanes);
    const int64_t end = std::min(block_end * kRows, w.N);
    for (int64_t n0 = block_begin * kRows; n0 < end;) {
      const int64_t rows = n0 + kRows <= end ? kRows : 1;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t k0 = 0; k0 < w.K; k0 += kChunk) {
        pack_chunk(isa, buf.data(), w, n0, rows, k0);
        run_chunk(isa, BlockArgs{buf.data(), rows, &w, n0, k0, &qx, M, acc.data(), scales + n0 * groups, groups,
                                 group_shift});
      }
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t r = 0; r < rows; ++r) {
          write_out(out, w, bias, m, n0 + r, lane_sum(isa, acc.data() + (m * rows + r) * lanes));
        }
      }
      n0 += rows;
    }
  });
}

// The dequantization path of dequantize_rows: AVX-512, AVX2 or portable.
void dequant(float* dst, const QuantWeight& w, int64_t n, int64_t k0, int64_t len) {
#ifdef PHI_FAST_CPU_AVX512
  if (avx512::enabled()) return dequant_avx512(dst, w, n, k0, len);
#endif
#ifdef PHI_FAST_CPU_AVX2
  if (avx2::enabled()) return dequant_avx2(dst, w, n, k0, len);
#endif
  dequant_portable(dst, w, n, k0, len);
}

}  // namespace

void dequantize_rows(float* dst, int64_t dst_stride, const QuantWeight& w, int64_t n0, int64_t rows,
                     int num_threads) {
  const int64_t len = w.format == QuantFormat::int4 ? round_up(w.K, kRun) : w.K;
  // The prompt path's tiles (MBs of fp32) are written once: a stream of their bytes.
  parallel_rows(rows, stream_ns(4.0 * static_cast<double>(rows) * len), num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) dequant(dst + r * dst_stride, w, n0 + r, 0, len);
  });
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
