// CPU kernels of the activation family: bias_gelu (tanh "gelu_new" or exact erf) and bias_quick_gelu.
//
// Math, per element with h = x + bias in fp32:
//   gelu tanh:  0.5 h (1 + tanh(u)), u = sqrt(2/pi) (h + 0.044715 h^3), evaluated as h / (1 + exp(-2u))
//               (the same function: 0.5 (1 + tanh(u)) = sigmoid(2u)) with the vectorizable exp_f32;
//   gelu erf:   0.5 h (1 + erf(h / sqrt(2)))  (erf_f32: vectorizable, absolute error < 6e-7);
//   quick_gelu: h * sigmoid(1.702 h) = h / (1 + exp(-1.702 h)).
// Layouts: x: [T, N] with a row stride and unit last stride; bias: [N]; y: [T, N] contiguous.
// Threads: OpenMP over rows (static); the inner loop over N is unit-stride and vectorizes for fp32.
#include "cpu/activation.h"

#include <vector>

#include "cpu/kernel_utils.h"

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

template <Activation kind, typename T>
void bias_activation_kernel(T* y, const T* x, int64_t x_stride, const T* bias, int64_t rows, int64_t n) {
  std::vector<float> bias_storage(std::is_same_v<T, float> ? 0 : n);
  const float* b = row_as_float(bias, n, bias_storage.data());
#pragma omp parallel for schedule(static) if (rows * n >= kParallelMinElements)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * x_stride;
    T* yr = y + r * n;
    for (int64_t i = 0; i < n; ++i) yr[i] = from_float<T>(activate<kind>(to_float(xr[i]) + b[i]));
  }
}

template <Activation kind>
void launch(void* y, const void* x, int64_t x_stride, const void* bias, int64_t rows, int64_t n, DType dtype) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    bias_activation_kernel<kind>(static_cast<T*>(y), static_cast<const T*>(x), x_stride,
                                 static_cast<const T*>(bias), rows, n);
  });
}

}  // namespace

void bias_gelu(void* y, const void* x, int64_t x_stride, const void* bias, int64_t num_tokens, int64_t width,
               bool tanh_approximation, DType dtype) {
  if (tanh_approximation) {
    launch<Activation::gelu_tanh>(y, x, x_stride, bias, num_tokens, width, dtype);
  } else {
    launch<Activation::gelu_erf>(y, x, x_stride, bias, num_tokens, width, dtype);
  }
}

void bias_quick_gelu(void* y, const void* x, int64_t x_stride, const void* bias, int64_t num_tokens,
                     int64_t width, DType dtype) {
  launch<Activation::quick_gelu>(y, x, x_stride, bias, num_tokens, width, dtype);
}

}  // namespace phi_fast::cpu
