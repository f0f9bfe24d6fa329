// CPU kernels of the norm family: layernorm, add_layernorm (parallel residual + LayerNorm), embed_layernorm
// (CLIP class token + position embedding + pre-LayerNorm).
//
// Math, per row of C values s (fp32):  mean = sum(s) / C;  var = sum((s - mean)^2) / C (two passes over the
// L1-resident row, no cancellation);  y = (s - mean) / sqrt(var + eps) * weight + bias.
//   add_layernorm:   s = (a + b) + x  (or a + x), y from the fp32 s, s stored rounded to the dtype.
//   embed_layernorm: row n of image b is s = (n == 0 ? class_embedding : patches[b, n - 1]) + position[n].
// Layouts: rows of C elements with a unit last stride; inputs take a row stride (elements), outputs are
// contiguous [rows, C]; weight, bias, embeddings in the activations' dtype, widened to fp32 once per call.
// Threads: OpenMP over rows (static schedule), one fp32 row buffer per thread; rows below
// kParallelMinElements of work run on the calling thread. Inner loops are unit-stride and vectorize.
#include "cpu/norm.h"

#include <cmath>
#include <vector>

#include "cpu/kernel_utils.h"

namespace phi_fast::cpu {
namespace {

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
                      int64_t n, float eps) {
  const FloatParam<T> w(weight, n), b(bias, n);
#pragma omp parallel if (rows * n >= kParallelMinElements)
  {
    std::vector<float> buffer(std::is_same_v<T, float> ? 0 : n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* s = row_as_float(x + r * x_stride, n, buffer.data());
      normalize_row(y + r * n, s, w.data, b.data, n, eps);
    }
  }
}

template <typename T>
void add_layernorm_kernel(T* s_out, T* y, const T* x, int64_t x_stride, const T* a, int64_t a_stride, const T* b,
                          int64_t b_stride, const void* weight, const void* bias, int64_t rows, int64_t n,
                          float eps) {
  const FloatParam<T> w(weight, n), bb(bias, n);
#pragma omp parallel if (rows * n >= kParallelMinElements)
  {
    std::vector<float> s(n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * x_stride;
      const T* ar = a + r * a_stride;
      if (b != nullptr) {
        const T* br = b + r * b_stride;
        for (int64_t i = 0; i < n; ++i) s[i] = (to_float(ar[i]) + to_float(br[i])) + to_float(xr[i]);
      } else {
        for (int64_t i = 0; i < n; ++i) s[i] = to_float(ar[i]) + to_float(xr[i]);
      }
      normalize_row(y + r * n, s.data(), w.data, bb.data, n, eps);
      store_row(s_out + r * n, s.data(), n);
    }
  }
}

template <typename T>
void embed_layernorm_kernel(T* y, const T* patches, int64_t batch_stride, int64_t row_stride,
                            const T* class_embedding, const T* position_embedding, const void* weight,
                            const void* bias, int64_t batch, int64_t num_patches, int64_t n, float eps) {
  const FloatParam<T> w(weight, n), b(bias, n);
  const int64_t rows_per_image = num_patches + 1;
  const int64_t rows = batch * rows_per_image;
#pragma omp parallel if (rows * n >= kParallelMinElements)
  {
    std::vector<float> s(n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t image = r / rows_per_image, row = r % rows_per_image;
      const T* src = row == 0 ? class_embedding : patches + image * batch_stride + (row - 1) * row_stride;
      const T* pos = position_embedding + row * n;
      for (int64_t i = 0; i < n; ++i) s[i] = to_float(src[i]) + to_float(pos[i]);
      normalize_row(y + r * n, s.data(), w.data, b.data, n, eps);
    }
  }
}

}  // namespace

void layernorm(void* y, const void* x, int64_t x_stride, const void* weight, const void* bias,
               int64_t num_tokens, int64_t hidden, float eps, DType dtype) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    layernorm_kernel(static_cast<T*>(y), static_cast<const T*>(x), x_stride, weight, bias, num_tokens, hidden,
                     eps);
  });
}

void add_layernorm(void* s, void* y, const void* x, int64_t x_stride, const void* a, int64_t a_stride,
                   const void* b, int64_t b_stride, const void* weight, const void* bias,
                   int64_t num_tokens, int64_t hidden, float eps, DType dtype) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    add_layernorm_kernel(static_cast<T*>(s), static_cast<T*>(y), static_cast<const T*>(x), x_stride,
                         static_cast<const T*>(a), a_stride, static_cast<const T*>(b), b_stride, weight, bias,
                         num_tokens, hidden, eps);
  });
}

void embed_layernorm(void* y, const void* patches, int64_t patches_batch_stride, int64_t patches_row_stride,
                     const void* class_embedding, const void* position_embedding, const void* weight,
                     const void* bias, int64_t batch, int64_t num_patches, int64_t hidden, float eps,
                     DType dtype) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    embed_layernorm_kernel(static_cast<T*>(y), static_cast<const T*>(patches), patches_batch_stride,
                           patches_row_stride, static_cast<const T*>(class_embedding),
                           static_cast<const T*>(position_embedding), weight, bias, batch, num_patches, hidden,
                           eps);
  });
}

}  // namespace phi_fast::cpu
