// Device helpers shared by the CUDA kernel files (csrc/cuda/*.cu): dtype dispatch, fp32 conversion of the
// storage types, packed vector loads/stores and warp/block reductions. Included only by .cu files.
//
// Vec<T, N> is N elements of T with alignment sizeof(T) * N: N = kVec<T> gives one 16-byte load/store
// (8 x fp16/bf16, 4 x fp32); N = 1 is the scalar path taken when a pointer or stride is not aligned.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>

#include "common/dtype.h"

namespace phi_fast::cuda {

// ---- host side --------------------------------------------------------------------------------------------

// Calls f(T{}) with T = float, __half or __nv_bfloat16 for the DType.
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: f(float{}); return;
    case DType::f16: f(__half{}); return;
    case DType::bf16: f(__nv_bfloat16{}); return;
  }
  throw std::invalid_argument(std::string("phi_fast CUDA: unsupported dtype ") + dtype_name(dtype));
}

inline bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

// The one way kernels are launched: kernel<<<grid, block, shared_bytes, stream>>>(args...) under nvcc; under the
// SIMT emulator (PHI_FAST_SIM, csrc/sim) the same kernel runs on the CPU. Errors surface as with <<<>>>:
// through cudaGetLastError, checked by the caller.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                   Args&&... args) {
#ifdef PHI_FAST_SIM
  (void)stream;
  ::phi_fast::sim::launch(kernel, grid, block, shared_bytes, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
#endif
}

// Number of SMs of the current device, cached per device (a host attribute query: no stream work, so it is
// safe during CUDA graph capture).
inline int sm_count() {
  static std::atomic<int> counts[64] = {};
  int device = 0;
  cudaGetDevice(&device);
  if (device < 0 || device >= 64) device = 0;
  int n = counts[device].load(std::memory_order_relaxed);
  if (n == 0) {
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    n = n > 0 ? n : 1;
    counts[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// ---- element types ----------------------------------------------------------------------------------------

template <typename T>
inline constexpr int kVec = 16 / static_cast<int>(sizeof(T));

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Loads N elements at p (aligned to sizeof(T) * N) and widens them to fp32.
template <int N, typename T>
__device__ __forceinline__ void load_f32(const T* p, float (&out)[N]) {
  const Vec<T, N> packed = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_f32(packed.v[i]);
}

// Rounds N fp32 values to T and stores them at p (aligned to sizeof(T) * N).
template <int N, typename T>
__device__ __forceinline__ void store_f32(T* p, const float (&in)[N]) {
  Vec<T, N> packed;
#pragma unroll
  for (int i = 0; i < N; ++i) packed.v[i] = from_f32<T>(in[i]);
  *reinterpret_cast<Vec<T, N>*>(p) = packed;
}

// Copies N elements of T (aligned to sizeof(T) * N) without conversion.
template <int N, typename T>
__device__ __forceinline__ void copy_vec(T* dst, const T* src) {
  *reinterpret_cast<Vec<T, N>*>(dst) = *reinterpret_cast<const Vec<T, N>*>(src);
}

// ---- reductions -------------------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Sum over the whole block (blockDim.x a multiple of 32), returned to every thread. `scratch` holds 32
// floats of shared memory; the leading barrier makes back-to-back calls on the same scratch safe.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int num_warps = blockDim.x / 32;
  x = warp_sum(x);
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < num_warps ? scratch[lane] : 0.0f;
  return warp_sum(x);
}

}  // namespace phi_fast::cuda
