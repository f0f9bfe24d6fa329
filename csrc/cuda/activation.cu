// Bias + activation family: bias_gelu (tanh "gelu_new" or exact erf) and bias_quick_gelu. Launchers declared in
// csrc/cuda/activation.h.
//
// Math (fp32, output rounded to the tensor dtype), h = x + bias:
//   gelu tanh:  0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3)))
//   gelu erf:   0.5 h (1 + erf(h / sqrt(2)))
//   quick_gelu: h * sigmoid(1.702 h) = h / (1 + exp(-1.702 h))
// Layouts: x [T, N] with row stride x_stride (unit last dim); bias [N]; y [T, N] contiguous (may alias x when
//   x is contiguous: every element is read and written by the same thread).
// Thread mapping: a 2-D grid. Thread (blockIdx.x * blockDim.x + threadIdx.x) owns one VEC-wide column chunk and
//   keeps its bias chunk in registers; blockIdx.y walks the rows with stride gridDim.y. VEC = 16 bytes of T
//   when pointers, stride and N allow it, else 1.
#include "cuda/activation.h"
#include "cuda/kernel_utils.cuh"

namespace phi_fast::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxGridY = 65535;

struct GeluTanh {
  __device__ float operator()(float h) const {
    constexpr float kC = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * h * (1.0f + tanhf(kC * (h + 0.044715f * h * h * h)));
  }
};

struct GeluErf {
  __device__ float operator()(float h) const {
    constexpr float kInvSqrt2 = 0.7071067811865476f;
    return 0.5f * h * (1.0f + erff(h * kInvSqrt2));
  }
};

struct QuickGelu {
  __device__ float operator()(float h) const { return h / (1.0f + expf(-1.702f * h)); }
};

template <typename T, int VEC, typename Act>
__global__ void bias_act_kernel(T* y, const T* x, int64_t x_stride, const T* __restrict__ bias, int64_t num_tokens,
                                int width, Act act) {
  const int col = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  if (col >= width) return;
  float b[VEC];
  load_f32<VEC>(bias + col, b);
  for (int64_t row = blockIdx.y; row < num_tokens; row += gridDim.y) {
    float v[VEC];
    load_f32<VEC>(x + row * x_stride + col, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = act(v[i] + b[i]);
    store_f32<VEC>(y + row * static_cast<int64_t>(width) + col, v);
  }
}

template <typename T, int VEC, typename Act>
void launch_with_vec(T* y, const T* x, int64_t x_stride, const T* bias, int64_t num_tokens, int64_t width, Act act,
                     cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(width / VEC, kThreads)),
                  static_cast<unsigned>(num_tokens < kMaxGridY ? num_tokens : kMaxGridY));
  launch_kernel(bias_act_kernel<T, VEC, Act>, grid, kThreads, 0, stream, y, x, x_stride, bias, num_tokens,
                static_cast<int>(width), act);
}

template <typename Act>
void bias_act(void* y, const void* x, int64_t x_stride, const void* bias, int64_t num_tokens, int64_t width,
              Act act, DType dtype, void* stream) {
  if (num_tokens == 0 || width == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kV = kVec<T>;
    const bool aligned = width % kV == 0 && x_stride % kV == 0 && is_aligned(y, 16) && is_aligned(x, 16) &&
                         is_aligned(bias, 16);
    if (aligned) {
      launch_with_vec<T, kV>(static_cast<T*>(y), static_cast<const T*>(x), x_stride, static_cast<const T*>(bias),
                             num_tokens, width, act, as_stream(stream));
    } else {
      launch_with_vec<T, 1>(static_cast<T*>(y), static_cast<const T*>(x), x_stride, static_cast<const T*>(bias),
                            num_tokens, width, act, as_stream(stream));
    }
  });
}

}  // namespace

void bias_gelu(void* y, const void* x, int64_t x_stride, const void* bias, int64_t num_tokens, int64_t width,
               bool tanh_approximation, DType dtype, void* stream) {
  if (tanh_approximation) {
    bias_act(y, x, x_stride, bias, num_tokens, width, GeluTanh{}, dtype, stream);
  } else {
    bias_act(y, x, x_stride, bias, num_tokens, width, GeluErf{}, dtype, stream);
  }
}

void bias_quick_gelu(void* y, const void* x, int64_t x_stride, const void* bias, int64_t num_tokens,
                     int64_t width, DType dtype, void* stream) {
  bias_act(y, x, x_stride, bias, num_tokens, width, QuickGelu{}, dtype, stream);
}

}  // namespace phi_fast::cuda
