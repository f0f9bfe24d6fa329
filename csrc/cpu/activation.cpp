// CPU kernels of the activation family: bias_gelu (tanh "gelu_new" or exact erf) and bias_quick_gelu.
//
// Math, per element with h = x + bias in fp32:
//   gelu tanh:  0.5 h (1 + tanh(u)), u = sqrt(2/pi) (h + 0.044715 h^3), evaluated as h / (1 + exp(-2u))
//               (the same function: 0.5 (1 + tanh(u)) = sigmoid(2u)) with the vectorizable exp_f32;
//   gelu erf:   0.5 h (1 + erf(h / sqrt(2)))  (erf_f32: vectorizable, absolute error < 6e-7);
//   quick_gelu: h * sigmoid(1.702 h) = h / (1 + exp(-1.702 h)).
// Layouts: x: [T, N] with a row stride and unit last stride; bias: [N]; y: [T, N] contiguous.
// Vectorization: AVX2 + FMA rows (vec_avx2.h's exp8 / erf8: the same formulas on 8 lanes) when
// avx2::enabled(), else portable loops.
// Threads: rows split into one contiguous range per thread (static: rows cost the same), only when the call's
// estimated time pays for a team (kernel_utils.h); decode-sized rows run on the calling thread.
#include "cpu/activation.h"

#include <vector>

#include "cpu/kernel_utils.h"
#include "cpu/vec_avx2.h"

namespace phi_fast::cpu {
namespace {

enum class Activation { gelu_tanh, gelu_erf, quick_gelu };

template <Activation kind>
inline float activate(float h) {
  if constexpr (kind == Activation::gelu_tanh) {
    const float u = 0.7978845608028654f * (h + 0.044715f * h * h * h);
    return h / (1.0f + exp_f32(-2.0f * u));
  } else if constexpr (kind == Activation::gelu_erf) {
    return 0.5f * h * (1.0f + erf_f32(h * 0.7071067811865476f));
  } else {
    return h / (1.0f + exp_f32(-1.702f * h));
  }
}

// Single-core nanoseconds per element of each activation's math (AVX2 rows, measured), for threads_for.
constexpr double math_ns_per_element(Activation kind) {
  switch (kind) {
    case Activation::gelu_tanh: return 0.4;
    case Activation::gelu_erf: return 0.5;
    case Activation::quick_gelu: return 0.3;
  }
  return 0.5;
}

template <Activation kind, typename T>
void activate_row(T* y, const T* x, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = from_float<T>(activate<kind>(to_float(x[i]) + b[i]));
}

#ifdef PHI_FAST_CPU_AVX2
template <Activation kind, typename T>
PHI_FAST_TARGET_AVX2 void activate_row_avx2(T* y, const T* x, const float* b, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 h = _mm256_add_ps(avx2::load8(x + i), _mm256_loadu_ps(b + i));
    if constexpr (kind == Activation::gelu_tanh) {
      avx2::store8(y + i, avx2::gelu_tanh8(h));
    } else if constexpr (kind == Activation::gelu_erf) {
      avx2::store8(y + i, avx2::gelu_erf8(h));
    } else {
      avx2::store8(y + i, avx2::quick_gelu8(h));
    }
  }
  activate_row<kind>(y + i, x + i, b + i, n - i);
}
#endif

template <Activation kind, typename T>
void bias_activation_kernel(T* y, const T* x, int64_t x_stride, const T* bias, int64_t rows, int64_t n,
                            int num_threads) {
  std::vector<float> bias_storage(std::is_same_v<T, float> ? 0 : n);
  const float* b = row_as_float(bias, n, bias_storage.data());
#ifdef PHI_FAST_CPU_AVX2
  const bool use_avx2 = avx2::enabled();
#endif
  const double elements = static_cast<double>(rows) * n;
  const double work_ns = stream_ns(2.0 * elements * sizeof(T)) + elements * math_ns_per_element(kind);
  parallel_rows(rows, work_ns, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
#ifdef PHI_FAST_CPU_AVX2
      if (use_avx2) {
        activate_row_avx2<kind>(y + r * n, x + r * x_stride, b, n);
        continue;
      }
#endif
      activate_row<kind>(y + r * n, x + r * x_stride, b, n);
    }
  });
}

template <Activation kind>
void launch(void* y, const void* x, int64_t x_stride, const void* bias, int64_t rows, int64_t n, DType dtype,
            int num_threads) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    bias_activation_kernel<kind>(static_cast<T*>(y), static_cast<const T*>(x), x_stride,
                                 static_cast<const T*>(bias), rows, n, num_threads);
  });
}

}  // namespace

void bias_gelu(void* y, const void* x, int64_t x_stride, const void* bias, int64_t num_tokens, int64_t width,
               bool tanh_approximation, DType dtype, int num_threads) {
  if (tanh_approximation) {
    launch<Activation::gelu_tanh>(y, x, x_stride, bias, num_tokens, width, dtype, num_threads);
  } else {
    launch<Activation::gelu_erf>(y, x, x_stride, bias, num_tokens, width, dtype, num_threads);
  }
}

void bias_quick_gelu(void* y, const void* x, int64_t x_stride, const void* bias, int64_t num_tokens,
                     int64_t width, DType dtype, int num_threads) {
  launch<Activation::quick_gelu>(y, x, x_stride, bias, num_tokens, width, dtype, num_threads);
}

}  // namespace phi_fast::cpu
