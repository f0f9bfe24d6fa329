// CPU kernels of the weight-only quantized linear layer: out = x @ dequantize(w)^T + bias.
//
// Decode-sized M (quant_linear): integer dot products, like llama.cpp's Q8_0 / Q4_0 x Q8_0. Each row of x is
// quantized on the fly to int8 in blocks of 32 inputs (scale = max|x| / 127, round to nearest even), then
//   out[m, n] = sum_blocks xs[m, b] * ws[n, g(b)] * sum_{k in b} qx[m, k] * q[n, k]   (+ bias[n])
// with the inner sums exact in int32 and the rest in fp32, rounded once to the dtype. The activation rounding is
// the kernel's only departure from the reference (dequantize, then matmul); python_tests/test_quant_* measure it.
// int4 weights enter the products as their stored nibbles q + 8 (unsigned, as the u8 x s8 instructions want);
// the 8 * sum(qx) surplus is taken off with a per-lane correction precomputed with x.
// Loop order: output rows kRows at a time; for each chunk of kChunk inputs the kRows rows are laid out in a small
// byte buffer in the instruction's lane order (int4 nibbles unpacked), then every row of x is multiplied with it
// (accumulators in a buffer between chunks), so each packed weight is read from memory once per call.
// Paths (chosen at run time): VNNI (AVX512-VNNI dpbusd on 64 weights) when avx512::enabled() and the CPU has
// it, else AVX2 (maddubs + madd on 32 weights), else portable loops with the same arithmetic.
// dequantize_rows (the prompt path: fp32 tiles for torch's GEMM) unpacks to fp32 exactly: AVX-512, AVX2 or scalar.
// Threads: N split into one contiguous range of kRows-row blocks per thread, only when the call is big enough to
// pay for a team (kernel_utils.h).
#include "cpu/quant_linear.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/kernel_utils.h"
#include "cpu/vec_avx2.h"
#include "cpu/vec_avx512.h"

namespace phi_fast::cpu {
namespace {

constexpr int64_t kChunk = 2048;  // inputs per chunk (a multiple of the 64-weight unit): 8 KB of buffer
constexpr int64_t kRows = 4;     // output rows per block
constexpr int64_t kRun = 32;     // int4 weights per 16-byte run; also the activation block

// Single-core cost of one weight x one row of x in the integer kernels (~1 instruction per 16 products), plus the
// per-weight unpacking, for the thread estimate.
constexpr double kNsPerProduct = 0.02;
constexpr double kNsPerWeight = 0.03;

enum class Isa { portable, avx2, vnni };

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

#endif


// ---- integer kernels ----
//
// A unit is the inputs one instruction step covers: 64 for VNNI (one zmm of bytes), 32 for AVX2 (one ymm) and
// for the portable loops. Activations and weight buffers hold each unit's bytes in the same lane order:
// - VNNI int4: a unit is two runs r0, r1 and is laid out [r0 low nibbles, r1 low, r0 high, r1 high], i.e. inputs
//   [0..15, 32..47, 16..31, 48..63] of the unit (what one 32-byte load of the two runs unpacks into);
// - everything else: inputs in order.
// Per unit, lanes_of(isa) fp32 lane vectors carry what each 32-bit lane of the int32 products needs: the activation
// scale of its block, and (int4) the correction 8 * scale * (sum of the lane's four qx).

int unit_of(Isa isa) { return isa == Isa::vnni ? 64 : 32; }
int lanes_of(Isa isa) { return isa == Isa::vnni ? 16 : (isa == Isa::avx2 ? 8 : 1); }

// The input of the unit (0 .. unit - 1) held at position p of the lane order.
inline int unit_input(Isa isa, bool int4, int p) {
  if (isa != Isa::vnni || !int4) return p;
  return ((p % 32) / 16) * 32 + (p / 32) * 16 + p % 16;
}

// x quantized for one call: q [M, units * unit] in lane order (VNNI int8: stored + 128, as unsigned bytes),
// scale and corr [M, units, lanes] (portable: one value per unit).
struct QuantX {
  int64_t units = 0;
  int unit = 32, lanes = 1;
  std::vector<int8_t> q;
  std::vector<float> scale, corr;
};

// Round to nearest, ties to even (torch.round), for |v| < 2^22: adding 1.5 * 2^23 leaves no fraction bits.
inline float round_even(float v) { return (v + 12582912.0f) - 12582912.0f; }

template <typename T>
QuantX quantize_x(Isa isa, bool int4, const T* x, int64_t x_stride, int64_t M, int64_t K) {
  QuantX qx;
  qx.unit = unit_of(isa);
  qx.lanes = lanes_of(isa);
  qx.units = (K + qx.unit - 1) / qx.unit;
  const int64_t row = qx.units * qx.unit, blocks = row / kRun;
  const int lane_width = qx.unit / qx.lanes;  // inputs per 32-bit lane (4), or the whole unit (portable)
  qx.q.assign(M * row, 0);
  qx.scale.assign(M * qx.units * qx.lanes, 0.0f);
  qx.corr.assign(M * qx.units * qx.lanes, 0.0f);
  std::vector<float> xf(row);
  std::vector<int8_t> q(row);
  std::vector<float> block_scale(blocks);
  const bool offset = isa == Isa::vnni && !int4;  // the u8 operand: stored as q + 128
  const bool permute = isa == Isa::vnni && int4;
  const int unit = qx.unit, lanes = qx.lanes;
  const int64_t units = qx.units;
  for (int64_t m = 0; m < M; ++m) {
    std::fill(xf.begin(), xf.end(), 0.0f);
    load_row(xf.data(), x + m * x_stride, K);
    for (int64_t b = 0; b < blocks; ++b) {
      const float* v = xf.data() + b * kRun;
      float amax = 0.0f;
#pragma omp simd reduction(max : amax)
      for (int i = 0; i < kRun; ++i) amax = std::fabs(v[i]) > amax ? std::fabs(v[i]) : amax;
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      block_scale[b] = amax / 127.0f;
      int8_t* qb = q.data() + b * kRun;
#pragma omp simd
      for (int i = 0; i < kRun; ++i) {
        const float r = round_even(v[i] * inv);
        qb[i] = static_cast<int8_t>(r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r));
      }
    }
    int8_t* dst = qx.q.data() + m * row;
    float* scale_base = qx.scale.data();
    float* corr_base = qx.corr.data();
    for (int64_t u = 0; u < units; ++u) {
      const int8_t* src = q.data() + u * unit;
      if (permute) {  // [run0 0..15, run1 0..15, run0 16..31, run1 16..31]
        for (int piece = 0; piece < 4; ++piece) std::memcpy(dst + u * 64 + 16 * piece, src + unit_input(isa, true, 16 * piece), 16);
      } else {
        const int8_t flip = offset ? static_cast<int8_t>(0x80) : 0;
        int8_t* d = dst + u * unit;  // locals: int8 stores may alias anything, so members would be reloaded
#pragma omp simd
        for (int j = 0; j < unit; ++j) d[j] = static_cast<int8_t>(src[j] ^ flip);
      }
      float* scale = scale_base + (m * units + u) * lanes;
      float* corr = corr_base + (m * units + u) * lanes;
      for (int l = 0; l < lanes; ++l) {
        const int j0 = unit_input(isa, int4, l * lane_width);  // a lane's inputs are consecutive
        const float s = block_scale[(u * unit + j0) / kRun];
        scale[l] = s;
        if (int4) {
          int32_t sum = 0;
          for (int i = 0; i < lane_width; ++i) sum += src[j0 + i];
          corr[l] = 8.0f * s * static_cast<float>(sum);
        }
      }
    }
  }
  return qx;
}

// Weight rows [n0, n0 + rows) x inputs [k0, k0 + kChunk) as bytes in lane order into buf (rows kChunk apart;
// int8: the signed weights, int4: the unsigned nibbles q + 8; zeros past K). k0 % kChunk == 0.
void pack_chunk_portable(uint8_t* buf, const QuantWeight& w, int64_t n0, int64_t rows, int64_t k0) {
  const int64_t len = std::min(kChunk, w.K - k0);
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* dst = buf + r * kChunk;
    if (len < kChunk) std::memset(dst, 0, kChunk);
    if (w.format == QuantFormat::int8) {
      std::memcpy(dst, static_cast<const int8_t*>(w.data) + (n0 + r) * w.K + k0, len);
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
// int4 for the VNNI lane order: one 32-byte load of two runs -> [low nibbles of both, high nibbles of both];
// a last lone run (odd number of runs) is loaded as 16 bytes: its missing partner unpacks to zeros.
PHI_FAST_TARGET_AVX2 void pack_chunk_int4_vnni(uint8_t* buf, const QuantWeight& w, int64_t n0, int64_t rows,
                                               int64_t k0) {
  const int64_t len = std::min(kChunk, w.K - k0), runs = (len + kRun - 1) / kRun;
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* dst = buf + r * kChunk;
    if (len < kChunk) std::memset(dst, 0, kChunk);
    const uint8_t* src = int4_row(w, n0 + r).bytes + k0 / 2;
    for (int64_t run = 0; run < runs; run += 2) {
      const __m256i v = run + 1 < runs
          ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + run * 16))
          : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + run * 16)));
      const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + run * 32), lo);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + run * 32 + 32), hi);
    }
  }
}

// int4 in input order (the AVX2 and portable lane order): per run [16 low nibbles, 16 high nibbles].
PHI_FAST_TARGET_AVX2 void pack_chunk_int4_linear(uint8_t* buf, const QuantWeight& w, int64_t n0, int64_t rows,
                                                 int64_t k0) {
  const int64_t len = std::min(kChunk, w.K - k0), runs = (len + kRun - 1) / kRun;
  const __m128i low = _mm_set1_epi8(0x0F);
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* dst = buf + r * kChunk;
    if (len < kChunk) std::memset(dst, 0, kChunk);
    const uint8_t* src = int4_row(w, n0 + r).bytes + k0 / 2;
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
  if (w.format == QuantFormat::int4 && isa == Isa::vnni) return pack_chunk_int4_vnni(buf, w, n0, rows, k0);
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
  const float* scales;  // int4: the block's first row of group scales ([rows, groups])
  int64_t groups;       // int4: scales per row
  int group_shift;      // int4: log2(group size)
};

// int4 scale of input k's group in row r of the block.
inline float group_scale(const BlockArgs& a, int64_t r, int64_t k) {
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
          sum += t * group_scale(a, r, k);
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
      ws[r] = _mm256_set1_ps(int4 ? group_scale(a, r, k) : 1.0f);
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
#endif

#ifdef PHI_FAST_CPU_AVX512
#define PHI_FAST_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

bool vnni_enabled() {
  static const bool use = avx512::enabled() && __builtin_cpu_supports("avx512vnni");
  return use;
}

// As tile_avx2 with 64-input units and 16 lanes (dpbusd: u8 x s8 summed 4 at a time into int32 lanes).
template <int MT, int R>
PHI_FAST_TARGET_VNNI void tile_vnni(const BlockArgs& a, int64_t m0) {
  const QuantWeight& w = *a.w;
  const bool int4 = w.format == QuantFormat::int4;
  const int64_t len = std::min(kChunk, w.K - a.k0), units = (len + 63) / 64;
  const int64_t row = a.qx->units * a.qx->unit;
  const __m512i zero = _mm512_setzero_si512(), offset = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[MT][R];
  for (int m = 0; m < MT; ++m) {
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_loadu_ps(a.acc + ((m0 + m) * a.rows + r) * 16);
  }
  for (int64_t u = 0; u < units; ++u) {
    const int64_t k = a.k0 + u * 64, unit_index = k / 64;
    __m512i wv[R];
    __m512 ws[R];
    for (int r = 0; r < R; ++r) {
      wv[r] = _mm512_loadu_si512(a.buf + r * kChunk + u * 64);
      if (int4) {  // lanes 0-3, 8-11: the unit's first run; 4-7, 12-15: its second
        const __m512 s0 = _mm512_set1_ps(group_scale(a, r, k));
        const __m512 s1 = _mm512_set1_ps(((k + 32) >> a.group_shift) < a.groups ? group_scale(a, r, k + 32) : 0.0f);
        ws[r] = _mm512_mask_blend_ps(0xF0F0, s0, s1);
      } else {
        ws[r] = _mm512_castsi512_ps(_mm512_dpbusd_epi32(zero, offset, wv[r]));  // 128 * sum(w) per lane (int32)
      }
    }
    for (int m = 0; m < MT; ++m) {
      const int64_t mm = m0 + m;
      const __m512i xq = _mm512_loadu_si512(a.qx->q.data() + mm * row + u * 64 + a.k0);
      const __m512 xs = _mm512_loadu_ps(a.qx->scale.data() + (mm * a.qx->units + unit_index) * 16);
      if (int4) {
        const __m512 corr = _mm512_loadu_ps(a.qx->corr.data() + (mm * a.qx->units + unit_index) * 16);
        for (int r = 0; r < R; ++r) {
          const __m512i d = _mm512_dpbusd_epi32(zero, wv[r], xq);  // nibbles u8 x qx s8
          const __m512 t = _mm512_fmsub_ps(_mm512_cvtepi32_ps(d), xs, corr);
          acc[m][r] = _mm512_fmadd_ps(t, ws[r], acc[m][r]);
        }
      } else {
        for (int r = 0; r < R; ++r) {  // (qx + 128) u8 x w s8, minus 128 * sum(w)
          const __m512i d = _mm512_sub_epi32(_mm512_dpbusd_epi32(zero, xq, wv[r]), _mm512_castps_si512(ws[r]));
          acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), xs, acc[m][r]);
        }
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(a.acc + ((m0 + m) * a.rows + r) * 16, acc[m][r]);
  }
}

template <int R>
PHI_FAST_TARGET_VNNI void chunk_vnni(const BlockArgs& a) {
  int64_t m = 0;
  for (; m + 2 <= a.M; m += 2) tile_vnni<2, R>(a, m);
  if (m < a.M) tile_vnni<1, R>(a, m);
}

PHI_FAST_TARGET_AVX512 float lane_sum_avx512(const float* v) { return avx512::hsum(_mm512_loadu_ps(v)); }
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
#ifdef PHI_FAST_CPU_AVX512
  if (isa == Isa::vnni) return a.rows == kRows ? chunk_vnni<kRows>(a) : chunk_vnni<1>(a);
#endif
#ifdef PHI_FAST_CPU_AVX2
  if (isa == Isa::avx2) return a.rows == kRows ? chunk_avx2<kRows>(a) : chunk_avx2<1>(a);
#endif
  chunk_portable(a);
}

float lane_sum(Isa isa, const float* v) {
#ifdef PHI_FAST_CPU_AVX512
  if (isa == Isa::vnni) return lane_sum_avx512(v);
#endif
#ifdef PHI_FAST_CPU_AVX2
  if (isa == Isa::avx2) return lane_sum_avx2(v);
#endif
  return v[0];
}

template <typename T>
void quant_linear_kernel(T* out, const T* x, int64_t x_stride, const QuantWeight& w, const T* bias, int64_t M,
                         int num_threads) {
  const Isa isa = pick_isa();
  const QuantX qx = quantize_x(isa, w.format == QuantFormat::int4, x, x_stride, M, w.K);
  const int lanes = qx.lanes;
  const double weight_bytes = w.format == QuantFormat::int8 ? 1.0 : 0.5 + 4.0 / w.group_size;
  const double weights = static_cast<double>(w.N) * w.K;
  const double work_ns = std::max(stream_ns(weight_bytes * weights), weights * (kNsPerWeight + M * kNsPerProduct));
  const int64_t blocks = (w.N + kRows - 1) / kRows;
  const bool int4 = w.format == QuantFormat::int4;
  const int64_t groups = int4 ? round_up(w.K, w.group_size) / w.group_size : 1;
  const int group_shift = int4 ? __builtin_ctzll(static_cast<uint64_t>(w.group_size)) : 0;
  const float* scales = int4 ? w.scales : nullptr;
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
          float sum = lane_sum(isa, acc.data() + (m * rows + r) * lanes);
          if (w.format == QuantFormat::int8) sum *= w.scales[n0 + r];
          out[m * w.N + n0 + r] = from_float<T>(bias != nullptr ? sum + to_float(bias[n0 + r]) : sum);
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

void dequantize_rows(float* dst, int64_t dst_stride, const QuantWeight& w, int64_t n0, int64_t rows) {
  const int64_t len = w.format == QuantFormat::int4 ? round_up(w.K, kRun) : w.K;
  for (int64_t r = 0; r < rows; ++r) dequant(dst + r * dst_stride, w, n0 + r, 0, len);
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
