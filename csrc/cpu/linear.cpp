// CPU kernel of the small-M linear layer: out = x @ weight^T + bias, the decode-time GEMV (M = batch <= ~16).
//
// Math: out[m, n] = sum_k x[m, k] * weight[n, k] (+ bias[n]), fp32 accumulation, rounded once to the dtype.
// Layouts: x [M, K] with a row stride (unit last stride), weight [N, K] contiguous, bias [N], out [M, N]
// contiguous. x (and bias) are widened to fp32 once per call (a few KB: they stay in L1/L2); weights stay in
// their dtype and are converted in registers.
// At decode the call is a read of the weights (MBs, from DRAM), so the loop order makes that read happen once:
// the rows of weight are taken R at a time (R streams in flight: 8 for M = 1, 4 otherwise) and each block of R
// rows is dotted with all M rows of x before the next block is read. With M <= 2 the whole block runs in one
// pass with its M x R accumulators in registers; with more rows of x, K is cut into chunks of kChunk elements
// (R x kChunk weights stay in L1) and each chunk is used by every tile of 2 rows of x, whose accumulators
// live in a small buffer between chunks.
// Vectorization: AVX2 + FMA (8 lanes; bf16/fp16 weights widened in registers) when avx2::enabled(), else
// portable loops (one weight row widened to fp32, then M dot products); the K % 8 tail is scalar.
// Threads: N split into one contiguous range of R-row blocks per thread (static: blocks cost the same), only
// when the weights are big enough to pay for a team (kernel_utils.h); MB-sized weights use every thread.
#include "cpu/linear.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/kernel_utils.h"
#include "cpu/vec_avx2.h"

namespace phi_fast::cpu {
namespace {

// K elements per chunk when several tiles of x rows share a block of weight rows (R x kChunk weights in L1).
constexpr int64_t kChunk = 512;

// How far ahead of the loads (in the block's traffic, RowAhead) each weight row is prefetched, a line at a time:
// into L1 8 KB (1 KB along each of M = 1's 8 rows): the hardware prefetcher alone leaves the DRAM reads and the
// FMAs serialized once M >= 2 (time = read + compute); and into L2 32 KB, as the quantized GEMVs, where an L1
// prefetch alone holds a line fill buffer through the whole DRAM latency (bench/NOTES.md).
constexpr int64_t kPrefetchNearBytes = 8 << 10, kPrefetchFarBytes = 32 << 10;

// The call's operands with x and bias as fp32 (x: [M, K] with row stride x_stride; bias: [N] or null).
template <typename T>
struct Operands {
  T* out;
  const float* x;
  int64_t x_stride;
  const T* weight;
  const float* bias;
  int64_t M, N, K;
};

// out[m, n] = sum + bias[n] for one finished dot product.
template <typename T>
inline void store_result(const Operands<T>& op, int64_t m, int64_t n, float sum) {
  op.out[m * op.N + n] = from_float<T>(op.bias != nullptr ? sum + op.bias[n] : sum);
}

// ---- portable ----

// Rows [begin, end) of the output for all M rows of x: each weight row widened once, then M dot products.
template <typename T>
void rows_portable(const Operands<T>& op, int64_t begin, int64_t end) {
  std::vector<float> buffer(std::is_same_v<T, float> ? 0 : op.K);
  for (int64_t n = begin; n < end; ++n) {
    const float* w = row_as_float(op.weight + n * op.K, op.K, buffer.data());
    for (int64_t m = 0; m < op.M; ++m) {
      const float* x = op.x + m * op.x_stride;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < op.K; ++k) sum += w[k] * x[k];
      store_result(op, m, n, sum);
    }
  }
}

#ifdef PHI_FAST_CPU_AVX2
// ---- AVX2 ----

// acc[m * R + r] += 8-lane partial dot products of x rows m < MT with weight rows r < R over len elements
// (a multiple of 8). w: weight row 0 of the block at element k0 of the row (rows K apart); x: x row 0 of the tile
// (rows x_stride apart); acc: MT * R vectors of 8 floats, kept in registers for the whole loop.
template <int MT, int R, typename T>
PHI_FAST_TARGET_AVX2 inline void tile_avx2(float* acc, const T* w, int64_t K, int64_t k0, const float* x,
                                           int64_t x_stride, int64_t len) {
  __m256 a[MT][R];
  for (int m = 0; m < MT; ++m) {
    for (int r = 0; r < R; ++r) a[m][r] = _mm256_loadu_ps(acc + 8 * (m * R + r));
  }
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
  const int64_t row_bytes = K * static_cast<int64_t>(sizeof(T));
  const RowAhead near(R, row_bytes, kPrefetchNearBytes), far(R, row_bytes, kPrefetchFarBytes);
  for (int64_t k = 0; k < len; k += 8) {
    __m256 wv[R];
    if ((k0 + k) % kLine == 0) {
      for (int r = 0; r < R; ++r) {
        const int64_t o = (k0 + k) * static_cast<int64_t>(sizeof(T));
        _mm_prefetch(near(w + r * K + k, o), _MM_HINT_T0);
        _mm_prefetch(far(w + r * K + k, o), _MM_HINT_T1);
      }
    }
    for (int r = 0; r < R; ++r) wv[r] = avx2::load8(w + r * K + k);
    for (int m = 0; m < MT; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * x_stride + k);
      for (int r = 0; r < R; ++r) a[m][r] = _mm256_fmadd_ps(wv[r], xv, a[m][r]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(acc + 8 * (m * R + r), a[m][r]);
  }
}

// Output rows n0 .. n0 + R - 1 for all M rows of x. acc: scratch of M * R * 8 floats.
template <int R, typename T>
PHI_FAST_TARGET_AVX2 void block_avx2(const Operands<T>& op, int64_t n0, float* acc) {
  const int64_t M = op.M, K = op.K, K8 = K & ~int64_t{7};
  const int64_t chunk = M <= 2 ? std::max<int64_t>(K8, 8) : kChunk;  // one tile: the whole row in one pass
  const T* w = op.weight + n0 * K;
  std::fill(acc, acc + M * R * 8, 0.0f);
  for (int64_t k0 = 0; k0 < K8; k0 += chunk) {
    const int64_t len = std::min(chunk, K8 - k0);
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) {
      tile_avx2<2, R>(acc + m * R * 8, w + k0, K, k0, op.x + m * op.x_stride + k0, op.x_stride, len);
    }
    if (m < M) tile_avx2<1, R>(acc + m * R * 8, w + k0, K, k0, op.x + m * op.x_stride + k0, op.x_stride, len);
  }
  for (int64_t m = 0; m < M; ++m) {
    const float* x = op.x + m * op.x_stride;
    for (int r = 0; r < R; ++r) {
      float sum = avx2::hsum(_mm256_loadu_ps(acc + 8 * (m * R + r)));
      for (int64_t k = K8; k < K; ++k) sum += to_float(w[r * K + k]) * x[k];
      store_result(op, m, n0 + r, sum);
    }
  }
}

// Output rows [begin, end) in blocks of R rows (the last rows one at a time).
template <int R, typename T>
PHI_FAST_TARGET_AVX2 void rows_avx2(const Operands<T>& op, int64_t begin, int64_t end) {
  std::vector<float> acc(op.M * R * 8);
  int64_t n = begin;
  for (; n + R <= end; n += R) block_avx2<R>(op, n, acc.data());
  for (; n < end; ++n) block_avx2<1>(op, n, acc.data());
}
#endif

template <typename T>
void linear_kernel(T* out, const T* x, int64_t x_stride, const T* weight, const T* bias, int64_t M, int64_t N,
                   int64_t K, int num_threads) {
  // x and bias as fp32: used in place for fp32, widened once per call otherwise.
  std::vector<float> x_buffer, bias_buffer;
  const float* xf;
  const float* bf = nullptr;
  int64_t xf_stride = x_stride;
  if constexpr (std::is_same_v<T, float>) {
    xf = x;
    bf = bias;
  } else {
    x_buffer.resize(M * K);
    for (int64_t m = 0; m < M; ++m) load_row(x_buffer.data() + m * K, x + m * x_stride, K);
    xf = x_buffer.data();
    xf_stride = K;
    if (bias != nullptr) {
      bias_buffer.resize(N);
      load_row(bias_buffer.data(), bias, N);
      bf = bias_buffer.data();
    }
  }
  const Operands<T> op{out, xf, xf_stride, weight, bf, M, N, K};

  // Blocks of R rows are the unit of the thread split; R = 8 for M = 1 (8 accumulators), else 4 (M x 4).
  const int64_t R = M == 1 ? 8 : 4;
  const int64_t blocks = (N + R - 1) / R;
  const double work_ns = std::max(stream_ns(static_cast<double>(N) * K * sizeof(T)),
                                  2.0 * static_cast<double>(M) * N * K / kGemmFlopsPerNs);
#ifdef PHI_FAST_CPU_AVX2
  const bool use_avx2 = avx2::enabled();
#endif
  parallel_rows(blocks, work_ns, num_threads, [&](int64_t block_begin, int64_t block_end) {
    const int64_t begin = block_begin * R, end = std::min(block_end * R, N);
#ifdef PHI_FAST_CPU_AVX2
    if (use_avx2) {
      if (R == 8) {
        rows_avx2<8>(op, begin, end);
      } else {
        rows_avx2<4>(op, begin, end);
      }
      return;
    }
#endif
    rows_portable(op, begin, end);
  });
}

}  // namespace

void linear(void* out, const void* x, int64_t x_stride, const void* weight, const void* bias, int64_t M, int64_t N,
            int64_t K, DType dtype, int num_threads) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    linear_kernel(static_cast<T*>(out), static_cast<const T*>(x), x_stride, static_cast<const T*>(weight),
                  static_cast<const T*>(bias), M, N, K, num_threads);
  });
}

}  // namespace phi_fast::cpu
