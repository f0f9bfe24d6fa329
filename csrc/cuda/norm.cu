// LayerNorm family: layernorm, add_layernorm (parallel residual + LN) and embed_layernorm (CLIP embeddings +
// pre-LN). Launchers declared in csrc/cuda/norm.h.
//
// Math (all in fp32, output rounded to the tensor dtype):
//   row r of the input, v[0..C):  layernorm: v = x[r]
//                                 add_layernorm: v = (a[r] + b[r]) + x[r]  (b optional), s[r] = round(v)
//                                 embed_layernorm: r = (image i, token n):
//                                   v = (n == 0 ? class : patches[i, n - 1]) + pos[n]
//   mean = sum(v) / C;  var = sum((v - mean)^2) / C  (two passes over registers, no cancellation);
//   y[r] = (v - mean) * rsqrt(var + eps) * weight + bias.
// Layouts: inputs [rows, C] with a row stride (last dim unit stride); s, y [rows, C] contiguous;
//   weight, bias, class [C]; pos [N + 1, C] contiguous.
// Thread mapping: one block per row. Thread t owns the VEC-wide column chunks t, t + blockDim, ... (K of them,
//   K a template constant so the row stays in registers); VEC = 16 bytes of T when every pointer and stride
//   allows 16-byte loads, else 1. blockDim = ceil(C / VEC / K) rounded up to a warp, K the smallest of
//   1, 2, 4, 8 that keeps blockDim <= 1024.
#include "cuda/kernel_utils.cuh"
#include "cuda/norm.h"

namespace phi_fast::cuda {
namespace {

constexpr int kMaxThreads = 1024;

// v = x[row]
template <typename T>
struct PlainRow {
  const T* x;
  int64_t x_stride;

  template <int VEC>
  __device__ void fetch(int64_t row, int col, float (&v)[VEC]) const {
    load_f32<VEC>(x + row * x_stride + col, v);
  }
};

// v = (a[row] + b[row]) + x[row]; also stores s[row] = v rounded.
template <typename T>
struct ResidualRow {
  T* s;
  const T* x;
  const T* a;
  const T* b;  // may be null
  int64_t x_stride, a_stride, b_stride, hidden;

  template <int VEC>
  __device__ void fetch(int64_t row, int col, float (&v)[VEC]) const {
    float xv[VEC];
    load_f32<VEC>(a + row * a_stride + col, v);
    if (b != nullptr) {
      float bv[VEC];
      load_f32<VEC>(b + row * b_stride + col, bv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[i] += bv[i];
    }
    load_f32<VEC>(x + row * x_stride + col, xv);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] += xv[i];
    store_f32<VEC>(s + row * hidden + col, v);
  }
};

// Row (image, n) of the CLIP embeddings: (n == 0 ? class : patches[image, n - 1]) + pos[n].
template <typename T>
struct EmbedRow {
  const T* patches;
  int64_t batch_stride, row_stride;
  const T* class_embedding;
  const T* position_embedding;
  int64_t tokens_per_image, hidden;  // N + 1, C

  template <int VEC>
  __device__ void fetch(int64_t row, int col, float (&v)[VEC]) const {
    const int64_t image = row / tokens_per_image;
    const int64_t n = row - image * tokens_per_image;
    const T* src = n == 0 ? class_embedding : patches + image * batch_stride + (n - 1) * row_stride;
    float pv[VEC];
    load_f32<VEC>(src + col, v);
    load_f32<VEC>(position_embedding + n * hidden + col, pv);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] += pv[i];
  }
};

template <typename T, int VEC, int K, typename Row>
__global__ void layernorm_kernel(T* y, Row row_in, const T* __restrict__ weight,
                                 const T* __restrict__ bias, int hidden, float eps) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  float v[K][VEC];
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int col = (threadIdx.x + k * blockDim.x) * VEC;
    if (col < hidden) {
      row_in.template fetch<VEC>(row, col, v[k]);
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum += v[k][i];
    }
  }
  const float mean = block_sum(sum, scratch) / static_cast<float>(hidden);
  float sq = 0.0f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int col = (threadIdx.x + k * blockDim.x) * VEC;
    if (col < hidden) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float d = v[k][i] - mean;
        sq += d * d;
      }
    }
  }
  const float rstd = rsqrtf(block_sum(sq, scratch) / static_cast<float>(hidden) + eps);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int col = (threadIdx.x + k * blockDim.x) * VEC;
    if (col < hidden) {
      float w[VEC], b[VEC], out[VEC];
      load_f32<VEC>(weight + col, w);
      load_f32<VEC>(bias + col, b);
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = (v[k][i] - mean) * rstd * w[i] + b[i];
      store_f32<VEC>(y + row * hidden + col, out);
    }
  }
}

template <typename T, int VEC, typename Row>
void launch_with_vec(T* y, const Row& row_in, const T* weight, const T* bias, int64_t rows, int64_t hidden,
                     float eps, cudaStream_t stream) {
  const int64_t chunks = hidden / VEC;
  const auto threads_for = [&](int k) { return static_cast<int>(ceil_div(ceil_div(chunks, k), 32) * 32); };
  const int c = static_cast<int>(hidden);
  const dim3 grid(static_cast<unsigned>(rows));
  if (threads_for(1) <= kMaxThreads) {
    launch_kernel(layernorm_kernel<T, VEC, 1, Row>, grid, threads_for(1), 0, stream, y, row_in, weight, bias, c, eps);
  } else if (threads_for(2) <= kMaxThreads) {
    launch_kernel(layernorm_kernel<T, VEC, 2, Row>, grid, threads_for(2), 0, stream, y, row_in, weight, bias, c, eps);
  } else if (threads_for(4) <= kMaxThreads) {
    launch_kernel(layernorm_kernel<T, VEC, 4, Row>, grid, threads_for(4), 0, stream, y, row_in, weight, bias, c, eps);
  } else if (threads_for(8) <= kMaxThreads) {
    launch_kernel(layernorm_kernel<T, VEC, 8, Row>, grid, threads_for(8), 0, stream, y, row_in, weight, bias, c, eps);
  } else {
    throw std::invalid_argument("phi_fast CUDA layernorm: hidden " + std::to_string(hidden) +
                                " too large (at most " + std::to_string(8 * kMaxThreads * VEC) +
                                " for this dtype and alignment)");
  }
}

// Picks the 16-byte path when `aligned` (every pointer 16-byte aligned, every stride and C multiples of VEC).
template <typename T, typename Row>
void launch(bool aligned, T* y, const Row& row_in, const T* weight, const T* bias, int64_t rows, int64_t hidden,
            float eps, cudaStream_t stream) {
  if (rows == 0 || hidden == 0) return;
  if (aligned) {
    launch_with_vec<T, kVec<T>>(y, row_in, weight, bias, rows, hidden, eps, stream);
  } else {
    launch_with_vec<T, 1>(y, row_in, weight, bias, rows, hidden, eps, stream);
  }
}

template <typename T>
bool vec_ok(int64_t hidden, std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> strides) {
  if (hidden % kVec<T> != 0) return false;
  for (const void* p : ptrs) {
    if (p != nullptr && !is_aligned(p, 16)) return false;
  }
  for (int64_t s : strides) {
    if (s % kVec<T> != 0) return false;
  }
  return true;
}

}  // namespace

void layernorm(void* y, const void* x, int64_t x_stride, const void* weight, const void* bias,
               int64_t num_tokens, int64_t hidden, float eps, DType dtype, void* stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const PlainRow<T> row_in{static_cast<const T*>(x), x_stride};
    const bool aligned = vec_ok<T>(hidden, {y, x, weight, bias}, {x_stride});
    launch(aligned, static_cast<T*>(y), row_in, static_cast<const T*>(weight), static_cast<const T*>(bias),
           num_tokens, hidden, eps, as_stream(stream));
  });
}

void add_layernorm(void* s, void* y, const void* x, int64_t x_stride, const void* a, int64_t a_stride,
                   const void* b, int64_t b_stride, const void* weight, const void* bias, int64_t num_tokens,
                   int64_t hidden, float eps, DType dtype, void* stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const ResidualRow<T> row_in{static_cast<T*>(s), static_cast<const T*>(x), static_cast<const T*>(a),
                                static_cast<const T*>(b), x_stride, a_stride, b != nullptr ? b_stride : 0,
                                hidden};
    const bool aligned = vec_ok<T>(hidden, {s, y, x, a, b, weight, bias},
                                   {x_stride, a_stride, b != nullptr ? b_stride : 0});
    launch(aligned, static_cast<T*>(y), row_in, static_cast<const T*>(weight), static_cast<const T*>(bias),
           num_tokens, hidden, eps, as_stream(stream));
  });
}

void embed_layernorm(void* y, const void* patches, int64_t patches_batch_stride, int64_t patches_row_stride,
                     const void* class_embedding, const void* position_embedding, const void* weight,
                     const void* bias, int64_t batch, int64_t num_patches, int64_t hidden, float eps, DType dtype,
                     void* stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const EmbedRow<T> row_in{static_cast<const T*>(patches), patches_batch_stride,  patches_row_stride,
                             static_cast<const T*>(class_embedding), static_cast<const T*>(position_embedding),
                             num_patches + 1,  hidden};
    const bool aligned = vec_ok<T>(hidden, {y, patches, class_embedding, position_embedding, weight, bias},
                                   {patches_batch_stride, patches_row_stride});
    launch(aligned, static_cast<T*>(y), row_in, static_cast<const T*>(weight), static_cast<const T*>(bias),
           batch * (num_patches + 1), hidden, eps, as_stream(stream));
  });
}

}  // namespace phi_fast::cuda
