// SIMT emulator (csrc/sim): what <cuda_runtime.h> gives CUDA C++, for the host compiler. With csrc/sim first on
// the include path (and PHI_FAST_SIM defined), csrc/cuda/*.cu build as plain C++ and their kernels run under the
// emulator (csrc/sim/runtime.h); launches go through phi_fast::cuda::launch_kernel (csrc/cuda/kernel_utils.cuh).
//
// - qualifiers (__global__, __device__, __host__, __forceinline__, __launch_bounds__) expand to plain C++;
//   `__shared__` declarations are rewritten by the sim build (phi_fast/_sim.py) into sim::shared_array calls;
// - threadIdx / blockIdx / blockDim / gridDim / warpSize read the running fiber's block and thread;
// - __syncthreads, __syncwarp, shuffles, votes are the emulator's barriers and warp collectives; atomics are
//   plain read-modify-writes (fibers never interleave inside one);
// - the runtime API answers as one H200 (sm_90, 132 SMs, 228 KB shared memory per SM, 227 KB per block opt-in);
//   streams and events are no-ops (every launch runs to completion before it returns); launch-configuration
//   errors are reported through cudaGetLastError as by the real runtime.
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "sim/ptx.h"
#include "sim/runtime.h"
#include "sim/state.h"
#include "sim/vector_types.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
#define __managed__

#define threadIdx (::phi_fast::sim::this_thread().thread_idx)
#define blockIdx (::phi_fast::sim::this_block().block_idx)
#define blockDim (::phi_fast::sim::this_block().block_dim)
#define gridDim (::phi_fast::sim::this_block().grid_dim)
inline constexpr int warpSize = 32;

// ---- runtime API ------------------------------------------------------------------------------------------------

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;

struct CUstream_st;
struct CUevent_st;
using cudaStream_t = CUstream_st*;
using cudaEvent_t = CUevent_st*;

enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxBlockDimX = 2,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxThreadsPerMultiProcessor = 39,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

enum cudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

inline cudaError_t cudaGetLastError() { return static_cast<cudaError_t>(::phi_fast::sim::take_last_error()); }
inline cudaError_t cudaPeekAtLastError() { return static_cast<cudaError_t>(::phi_fast::sim::last_error()); }
inline const char* cudaGetErrorString(cudaError_t e) { return ::phi_fast::sim::error_string(e); }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidValue; }
inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

// One H200 (sm_90).
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxBlockDimX: *value = 1024; break;
    case cudaDevAttrMaxGridDimY: *value = 65535; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMultiProcessorCount: *value = 132; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = 2048; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = 228 * 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > ::phi_fast::sim::kSharedOptinLimit) {
    ::phi_fast::sim::last_error() = cudaErrorInvalidValue;
    return cudaErrorInvalidValue;
  }
  const void* key = reinterpret_cast<const void*>(kernel);
  for (auto& entry : ::phi_fast::sim::max_dynamic_shared()) {
    if (entry.first == key) {
      entry.second = static_cast<size_t>(value);
      return cudaSuccess;
    }
  }
  ::phi_fast::sim::max_dynamic_shared().emplace_back(key, static_cast<size_t>(value));
  return cudaSuccess;
}

inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaStreamCreate(cudaStream_t* s) {
  *s = nullptr;
  return cudaSuccess;
}
inline cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = nullptr;
  return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t = nullptr) { return cudaSuccess; }
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventDestroy(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned int = 0) { return cudaSuccess; }
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t = nullptr) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(dst, value, bytes);
  return cudaSuccess;
}

// ---- synchronization and warp collectives ---------------------------------------------------------------------

inline void __syncthreads(::phi_fast::sim::Location loc = ::phi_fast::sim::Location::current()) {
  ::phi_fast::sim::barrier(loc);
}

namespace phi_fast::sim {

inline void combine_copy(Thread* lanes, uint32_t mask, Payload* out) {
  for (int j = 0; j < 32; ++j) {
    if ((mask >> j) & 1u) out[j] = lanes[j].in;
  }
}

inline void combine_ballot(Thread* lanes, uint32_t mask, Payload* out) {
  uint32_t bits = 0;
  for (int j = 0; j < 32; ++j) {
    if (((mask >> j) & 1u) && lanes[j].in.w[0]) bits |= 1u << j;
  }
  for (int j = 0; j < 32; ++j) out[j].w[0] = bits;
}

// Every lane of the mask sends its value; the caller then reads lane `src` (which must be in the mask).
template <typename T>
T shuffle(uint32_t mask, T var, int src, const char* what, const Location& loc) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move at most 8 bytes");
  Payload in{};
  std::memcpy(in.w, &var, sizeof(T));
  collective(mask, what, in, &combine_copy, loc);
  if (!((mask >> src) & 1u)) {
    fault(std::string(what) + " at " + where(loc) + ": reads lane " + std::to_string(src) +
          ", which is not in the mask " + hex(mask));
  }
  T out;
  std::memcpy(&out, this_block().warps[this_thread().warp].out[src].w, sizeof(T));
  return out;
}

inline int lane_id() { return this_thread().lane; }

}  // namespace phi_fast::sim

inline void __syncwarp(unsigned mask = 0xffffffffu,
                       ::phi_fast::sim::Location loc = ::phi_fast::sim::Location::current()) {
  ::phi_fast::sim::collective(mask, "__syncwarp", {}, &::phi_fast::sim::combine_copy, loc);
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32,
              ::phi_fast::sim::Location loc = ::phi_fast::sim::Location::current()) {
  const int lane = ::phi_fast::sim::lane_id();
  const int src = (lane / width) * width + ((src_lane % width) + width) % width;
  return ::phi_fast::sim::shuffle(mask, var, src, "__shfl_sync", loc);
}

template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                 ::phi_fast::sim::Location loc = ::phi_fast::sim::Location::current()) {
  const int lane = ::phi_fast::sim::lane_id();
  const int src = lane % width >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
  return ::phi_fast::sim::shuffle(mask, var, src, "__shfl_up_sync", loc);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                   ::phi_fast::sim::Location loc = ::phi_fast::sim::Location::current()) {
  const int lane = ::phi_fast::sim::lane_id();
  const int src = lane % width + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane;
  return ::phi_fast::sim::shuffle(mask, var, src, "__shfl_down_sync", loc);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                  ::phi_fast::sim::Location loc = ::phi_fast::sim::Location::current()) {
  const int lane = ::phi_fast::sim::lane_id();
  const int x = lane ^ lane_mask;
  const int src = x / width > lane / width || x > 31 ? lane : x;  // later groups of `width` lanes: own value
  return ::phi_fast::sim::shuffle(mask, var, src, "__shfl_xor_sync", loc);
}

inline unsigned __ballot_sync(unsigned mask, int predicate,
                              ::phi_fast::sim::Location loc = ::phi_fast::sim::Location::current()) {
  ::phi_fast::sim::Payload in{};
  in.w[0] = predicate != 0;
  return ::phi_fast::sim::collective(mask, "__ballot_sync", in, &::phi_fast::sim::combine_ballot, loc).w[0] & mask;
}

inline int __any_sync(unsigned mask, int predicate,
                      ::phi_fast::sim::Location loc = ::phi_fast::sim::Location::current()) {
  return __ballot_sync(mask, predicate, loc) != 0;
}

inline int __all_sync(unsigned mask, int predicate,
                      ::phi_fast::sim::Location loc = ::phi_fast::sim::Location::current()) {
  return __ballot_sync(mask, predicate, loc) == mask;
}

inline unsigned __activemask() {
  const auto& w = ::phi_fast::sim::this_block().warps[::phi_fast::sim::this_thread().warp];
  return w.present & ~w.exited;
}

inline void __threadfence() {}
inline void __threadfence_block() {}

// ---- atomics (fibers switch only at synchronization points, so a plain read-modify-write is atomic) --------

template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
template <typename T>
T atomicSub(T* address, T value) {
  const T old = *address;
  *address = old - value;
  return old;
}
template <typename T>
T atomicMax(T* address, T value) {
  const T old = *address;
  *address = old < value ? value : old;
  return old;
}
template <typename T>
T atomicMin(T* address, T value) {
  const T old = *address;
  *address = value < old ? value : old;
  return old;
}
template <typename T>
T atomicExch(T* address, T value) {
  const T old = *address;
  *address = value;
  return old;
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  const T old = *address;
  if (old == compare) *address = value;
  return old;
}

// ---- intrinsics and device math ----------------------------------------------------------------------------

template <typename T>
T __ldg(const T* p) {
  return *p;
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<size_t>(p); }

// CUDA's integer/float min and max overloads (host C++ has only std::min/max).
template <typename A, typename B>
constexpr std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
constexpr std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}
