// CPU kernels of the norm family: layernorm, add_layernorm (parallel residual + LayerNorm), embed_layernorm
// (CLIP class token + position embedding + pre-LayerNorm).
//
// Math, per row of C values s (fp32):  mean = sum(s) / C;  var = sum((s - mean)^2) / C (two passes over the
// L1-resident row, no cancellation);  y = (s - mean) / sqrt(var + eps) * weight + bias.
//   add_layernorm:   s = (a + b) + x  (or a + x), y from the fp32 s, s stored rounded to the dtype.
//   embed_layernorm: row n of image b is s = (n == 0 ? class_embedding : patches[b, n - 1]) + position[n].
// Layouts: rows of C elements with a unit last stride; inputs take a row stride (elements), outputs are
// contiguous [rows, C]; weight, bias, embeddings in the activations' dtype, widened to fp32 once per call.
// Vectorization: AVX2 + FMA rows (8 lanes, 16-bit types converted in registers) when avx2::enabled(), else
// portable loops; both compute the same sums in a different order (fp32 rounding differences only).
// Threads: rows split into one contiguous range per thread (static: rows cost the same), only when the call
// streams enough bytes to pay for a team (kernel_utils.h); decode-sized rows run on the calling thread.
#include "cpu/norm.h"

#include <cmath>
#include <vector>

#include "cpu/kernel_utils.h"
#include "cpu/vec_avx2.h"

namespace phi_fast::cpu {
namespace {

// ---- portable rows ----

// y = LayerNorm(s) * weight + bias for one fp32 row s of n values.
template <typename T>
void normalize_row(T* y, const float* s, const float* weight, const float* bias, int64_t n, float eps) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += s[i];
  const float mean = sum / static_cast<float>(n);
  float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < n; ++i) {
    const float d = s[i] - mean;
    squares += d * d;
  }
  const float rstd = 1.0f / std::sqrt(squares / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = from_float<T>((s[i] - mean) * rstd * weight[i] + bias[i]);
}

// s = (a + b) + c, or a + c when b is null, in fp32.
template <typename T>
void sum_row(float* s, const T* a, const T* b, const T* c, int64_t n) {
  if (b != nullptr) {
    for (int64_t i = 0; i < n; ++i) s[i] = (to_float(a[i]) + to_float(b[i])) + to_float(c[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) s[i] = to_float(a[i]) + to_float(c[i]);
  }
}

#ifdef PHI_FAST_CPU_AVX2
// ---- AVX2 rows: the same math, 8 lanes at a time, scalar tails ----

// The sum of n fp32 values (4 independent accumulators).
PHI_FAST_TARGET_AVX2 float row_sum_avx2(const float* s, int64_t n) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int u = 0; u < 4; ++u) acc[u] = _mm256_add_ps(acc[u], _mm256_loadu_ps(s + i + 8 * u));
  }
  for (; i + 8 <= n; i += 8) acc[0] = _mm256_add_ps(acc[0], _mm256_loadu_ps(s + i));
  float sum = avx2::hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; i < n; ++i) sum += s[i];
  return sum;
}

// The sum of (s[i] - mean)^2 over n fp32 values.
PHI_FAST_TARGET_AVX2 float row_squares_avx2(const float* s, float mean, int64_t n) {
  const __m256 m = _mm256_set1_ps(mean);
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int u = 0; u < 4; ++u) {
      const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(s + i + 8 * u), m);
      acc[u] = _mm256_fmadd_ps(d, d, acc[u]);
    }
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(s + i), m);
    acc[0] = _mm256_fmadd_ps(d, d, acc[0]);
  }
  float squares = avx2::hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; i < n; ++i) squares += (s[i] - mean) * (s[i] - mean);
  return squares;
}

template <typename T>
PHI_FAST_TARGET_AVX2 void normalize_row_avx2(T* y, const float* s, const float* weight, const float* bias, int64_t n,
                                             float eps) {
  const float mean = row_sum_avx2(s, n) / static_cast<float>(n);
  const float rstd = 1.0f / std::sqrt(row_squares_avx2(s, mean, n) / static_cast<float>(n) + eps);
  const __m256 vm = _mm256_set1_ps(mean), vr = _mm256_set1_ps(rstd);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 normed = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(s + i), vm), vr);
    avx2::store8(y + i, _mm256_fmadd_ps(normed, _mm256_loadu_ps(weight + i), _mm256_loadu_ps(bias + i)));
  }
  for (; i < n; ++i) y[i] = from_float<T>((s[i] - mean) * rstd * weight[i] + bias[i]);
}

template <typename T>
PHI_FAST_TARGET_AVX2 void sum_row_avx2(float* s, const T* a, const T* b, const T* c, int64_t n) {
  int64_t i = 0;
  if (b != nullptr) {
    for (; i + 8 <= n; i += 8) {
      const __m256 ab = _mm256_add_ps(avx2::load8(a + i), avx2::load8(b + i));
      _mm256_storeu_ps(s + i, _mm256_add_ps(ab, avx2::load8(c + i)));
    }
  } else {
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(s + i, _mm256_add_ps(avx2::load8(a + i), avx2::load8(c + i)));
  }
  sum_row(s + i, a + i, b ? b + i : nullptr, c + i, n - i);
}

template <typename T>
PHI_FAST_TARGET_AVX2 void widen_row_avx2(float* dst, const T* src, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, avx2::load8(src + i));
  load_row(dst + i, src + i, n - i);
}

template <typename T>
PHI_FAST_TARGET_AVX2 void narrow_row_avx2(T* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) avx2::store8(dst + i, _mm256_loadu_ps(src + i));
  store_row(dst + i, src + i, n - i);
}
#endif

// ---- row operations on the chosen instruction set ----

// The row kernels above, picked once per call (AVX2 when enabled, else portable).
template <typename T>
struct RowOps {
#ifdef PHI_FAST_CPU_AVX2
  const bool use_avx2 = avx2::enabled();
#endif

  void normalize(T* y, const float* s, const float* weight, const float* bias, int64_t n, float eps) const {
#ifdef PHI_FAST_CPU_AVX2
    if (use_avx2) return normalize_row_avx2(y, s, weight, bias, n, eps);
#endif
    normalize_row(y, s, weight, bias, n, eps);
  }
  // s = (a + b) + c (b may be null) in fp32.
  void sum(float* s, const T* a, const T* b, const T* c, int64_t n) const {
#ifdef PHI_FAST_CPU_AVX2
    if (use_avx2) return sum_row_avx2(s, a, b, c, n);
#endif
    sum_row(s, a, b, c, n);
  }
  // The n values of src as fp32: src itself for float, else widened into buffer.
  const float* as_float(const T* src, int64_t n, float* buffer) const {
    if constexpr (std::is_same_v<T, float>) {
      return src;
    } else {
#ifdef PHI_FAST_CPU_AVX2
      if (use_avx2) {
        widen_row_avx2(buffer, src, n);
        return buffer;
      }
#endif
      return row_as_float(src, n, buffer);
    }
  }
  // dst = T(src), rounded to nearest even.
  void narrow(T* dst, const float* src, int64_t n) const {
#ifdef PHI_FAST_CPU_AVX2
    if (use_avx2) return narrow_row_avx2(dst, src, n);
#endif
    store_row(dst, src, n);
  }
};

// Weights widened to fp32 once per call (no copy for fp32).
template <typename T>
struct FloatParam {
  std::vector<float> storage;
  const float* data;
  FloatParam(const void* p, int64_t n) : storage(std::is_same_v<T, float> ? 0 : n) {
    data = row_as_float(static_cast<const T*>(p), n, storage.data());
  }
};

template <typename T>
void layernorm_kernel(T* y, const T* x, int64_t x_stride, const void* weight, const void* bias, int64_t rows,
                      int64_t n, float eps, int num_threads) {
  const FloatParam<T> w(weight, n), b(bias, n);
  const RowOps<T> ops;
  parallel_rows(rows, stream_ns(2.0 * rows * n * sizeof(T)), num_threads, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(std::is_same_v<T, float> ? 0 : n);
    for (int64_t r = begin; r < end; ++r) {
      ops.normalize(y + r * n, ops.as_float(x + r * x_stride, n, buffer.data()), w.data, b.data, n, eps);
    }
  });
}

template <typename T>
void add_layernorm_kernel(T* s_out, T* y, const T* x, int64_t x_stride, const T* a, int64_t a_stride, const T* b,
                          int64_t b_stride, const void* weight, const void* bias, int64_t rows, int64_t n, float eps,
                          int num_threads) {
  const FloatParam<T> w(weight, n), bb(bias, n);
  const RowOps<T> ops;
  const double bytes = (b != nullptr ? 5.0 : 4.0) * rows * n * sizeof(T);
  parallel_rows(rows, stream_ns(bytes), num_threads, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(std::is_same_v<T, float> ? 0 : n);
    for (int64_t r = begin; r < end; ++r) {
      // fp32 sums go straight into s_out's row (then L1-resident); other dtypes through the buffer.
      float* s;
      if constexpr (std::is_same_v<T, float>) {
        s = s_out + r * n;
      } else {
        s = buffer.data();
      }
      ops.sum(s, a + r * a_stride, b != nullptr ? b + r * b_stride : nullptr, x + r * x_stride, n);
      ops.normalize(y + r * n, s, w.data, bb.data, n, eps);
      if constexpr (!std::is_same_v<T, float>) ops.narrow(s_out + r * n, s, n);
    }
  });
}

template <typename T>
void embed_layernorm_kernel(T* y, const T* patches, int64_t batch_stride, int64_t row_stride,
                            const T* class_embedding, const T* position_embedding, const void* weight,
                            const void* bias, int64_t batch, int64_t num_patches, int64_t n, float eps,
                            int num_threads) {
  const FloatParam<T> w(weight, n), b(bias, n);
  const RowOps<T> ops;
  const int64_t rows_per_image = num_patches + 1;
  const int64_t rows = batch * rows_per_image;
  parallel_rows(rows, stream_ns(3.0 * rows * n * sizeof(T)), num_threads, [&](int64_t begin, int64_t end) {
    std::vector<float> s(n);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t image = r / rows_per_image, row = r % rows_per_image;
      const T* src = row == 0 ? class_embedding : patches + image * batch_stride + (row - 1) * row_stride;
      ops.sum(s.data(), src, nullptr, position_embedding + row * n, n);
      ops.normalize(y + r * n, s.data(), w.data, b.data, n, eps);
    }
  });
}

}  // namespace

void layernorm(void* y, const void* x, int64_t x_stride, const void* weight, const void* bias,
               int64_t num_tokens, int64_t hidden, float eps, DType dtype, int num_threads) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    layernorm_kernel(static_cast<T*>(y), static_cast<const T*>(x), x_stride, weight, bias, num_tokens, hidden,
                     eps, num_threads);
  });
}

void add_layernorm(void* s, void* y, const void* x, int64_t x_stride, const void* a, int64_t a_stride,
                   const void* b, int64_t b_stride, const void* weight, const void* bias,
                   int64_t num_tokens, int64_t hidden, float eps, DType dtype, int num_threads) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    add_layernorm_kernel(static_cast<T*>(s), static_cast<T*>(y), static_cast<const T*>(x), x_stride,
                         static_cast<const T*>(a), a_stride, static_cast<const T*>(b), b_stride, weight, bias,
                         num_tokens, hidden, eps, num_threads);
  });
}

void embed_layernorm(void* y, const void* patches, int64_t patches_batch_stride, int64_t patches_row_stride,
                     const void* class_embedding, const void* position_embedding, const void* weight,
                     const void* bias, int64_t batch, int64_t num_patches, int64_t hidden, float eps,
                     DType dtype, int num_threads) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    embed_layernorm_kernel(static_cast<T*>(y), static_cast<const T*>(patches), patches_batch_stride,
                           patches_row_stride, static_cast<const T*>(class_embedding),
                           static_cast<const T*>(position_embedding), weight, bias, batch, num_patches, hidden,
                           eps, num_threads);
  });
}

}  // namespace phi_fast::cpu
