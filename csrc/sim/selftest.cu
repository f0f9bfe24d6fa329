// SIMT emulator self-test kernels (declared and described in csrc/sim/selftest.h). Built only into the sim backend;
// each one either checks an emulated instruction against an independent statement of its contract (the PTX ISA's
// fragment maps) or plants a bug the emulator must catch.
#include <cuda_runtime.h>

#include <stdexcept>

#include "cuda/kernel_utils.cuh"
#include "cuda/ptx.cuh"
#include "sim/selftest.h"

namespace phi_fast::sim {
namespace {

using cuda::launch_kernel;

// One warp: fragments of a (row-major 16 x 16) and b (16 x 8, b[k][n] at k * 8 + n) gathered lane by lane as the
// PTX ISA's m16n8k16 tables place them; d (16 x 8) scattered back by the accumulator table.
template <typename T>
__global__ void mma_kernel(float* d, const uint16_t* a, const uint16_t* b) {
  const int lane = threadIdx.x;
  const int g = lane / 4;
  const int t = lane % 4;
  const auto pack = [](uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); };
  uint32_t fa[4];
  for (int i = 0; i < 4; ++i) {  // a_i: row g (+8 for i = 1, 3), columns 2t, 2t+1 (+8 for i = 2, 3)
    const int row = g + 8 * (i % 2);
    const int col = 2 * t + 8 * (i / 2);
    fa[i] = pack(a[row * 16 + col], a[row * 16 + col + 1]);
  }
  const uint32_t b0 = pack(b[(2 * t) * 8 + g], b[(2 * t + 1) * 8 + g]);
  const uint32_t b1 = pack(b[(2 * t + 8) * 8 + g], b[(2 * t + 9) * 8 + g]);
  float acc[4];
  for (int e = 0; e < 4; ++e) acc[e] = d[(g + 8 * (e / 2)) * 8 + 2 * t + e % 2];
  cuda::mma_16816<T>(acc, fa, b0, b1);
  for (int e = 0; e < 4; ++e) d[(g + 8 * (e / 2)) * 8 + 2 * t + e % 2] = acc[e];
}

// Four 8 x 8 matrices staged in shared memory (rows padded to 16 elements); lane l gives row l % 8 of matrix l / 8.
__global__ void ldmatrix_kernel(uint32_t* out, const uint16_t* m, bool trans) {
  __shared__ alignas(16) uint16_t s[4 * 8 * 16];
  const int lane = threadIdx.x;
  for (int i = lane; i < 4 * 8 * 8; i += 32) s[(i / 8) * 16 + i % 8] = m[i];
  __syncwarp();
  uint32_t r[4];
  const uint16_t* row = s + (lane / 8 * 8 + lane % 8) * 16;
  if (trans) {
    cuda::ldmatrix_x4_trans(r, row);
  } else {
    cuda::ldmatrix_x4(r, row);
  }
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
}

__global__ void neighbor_kernel(float* out, const float* in, bool sync) {
  __shared__ float s[1024];
  const int i = threadIdx.x;
  s[i] = in[i];
  if (sync) __syncthreads();
  out[i] = i > 0 ? s[i - 1] : 0.0f;
}

__global__ void cp_async_kernel(float* out, const float* in, bool wait) {
  __shared__ alignas(16) float s[128];
  const int i = threadIdx.x;  // 32 threads x 4 floats
  cuda::cp_async_16(s + 4 * i, in + 4 * i, true);
  cuda::cp_async_commit();
  if (wait) cuda::cp_async_wait<0>();
  __syncthreads();
  for (int j = 0; j < 4; ++j) out[4 * ((i + 1) % 32) + j] = s[4 * ((i + 1) % 32) + j];
}

__global__ void oob_shared_kernel(float* out) {
  __shared__ float s[64];
  s[threadIdx.x + 1] = 1.0f;  // planted: thread 63 writes s[64]
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

__global__ void divergent_kernel(int kind) {
  const int lane = threadIdx.x % 32;
  if (kind == 0) {
    if (threadIdx.x < 32) __syncthreads();
    __syncthreads();
  } else if (kind == 1) {
    if (lane >= 16) return;
    __shfl_xor_sync(0xffffffffu, lane, 1);
  } else {
    if (lane == 0) {
      __syncthreads();
    } else {
      __shfl_xor_sync(0xffffffffu, lane, 1);
    }
  }
}

__global__ void dynamic_kernel(float* out) {
  extern __shared__ float dyn[];
  dyn[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = dyn[(threadIdx.x + 1) % blockDim.x] - 1.0f;
}

template <typename T>
T* ptr(int64_t v) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(v));
}

}  // namespace

int64_t selftest(const std::string& name, const std::vector<int64_t>& args) {
  const auto need = [&](size_t n) {
    if (args.size() != n) {
      throw std::invalid_argument("sim_selftest " + name + ": expected " + std::to_string(n) + " args, got " +
                                  std::to_string(args.size()));
    }
  };
  if (name == "mma") {
    need(4);
    if (args[3]) {
      launch_kernel(mma_kernel<__nv_bfloat16>, 1, 32, 0, nullptr, ptr<float>(args[0]), ptr<const uint16_t>(args[1]),
                    ptr<const uint16_t>(args[2]));
    } else {
      launch_kernel(mma_kernel<__half>, 1, 32, 0, nullptr, ptr<float>(args[0]), ptr<const uint16_t>(args[1]),
                    ptr<const uint16_t>(args[2]));
    }
  } else if (name == "ldmatrix") {
    need(3);
    launch_kernel(ldmatrix_kernel, 1, 32, 0, nullptr, ptr<uint32_t>(args[0]), ptr<const uint16_t>(args[1]),
                  args[2] != 0);
  } else if (name == "neighbor") {
    need(4);
    launch_kernel(neighbor_kernel, 1, static_cast<unsigned>(args[2]), 0, nullptr, ptr<float>(args[0]),
                  ptr<const float>(args[1]), args[3] != 0);
  } else if (name == "cp_async") {
    need(3);
    launch_kernel(cp_async_kernel, 1, 32, 0, nullptr, ptr<float>(args[0]), ptr<const float>(args[1]), args[2] != 0);
  } else if (name == "oob_shared") {
    need(1);
    launch_kernel(oob_shared_kernel, 1, 64, 0, nullptr, ptr<float>(args[0]));
  } else if (name == "divergent") {
    need(1);
    launch_kernel(divergent_kernel, 1, 64, 0, nullptr, static_cast<int>(args[0]));
  } else if (name == "dynamic") {
    need(4);
    const int limit = args[3] ? static_cast<int>(args[2]) : 48 * 1024;  // 48 KB: the default without opt-in
    cudaFuncSetAttribute(dynamic_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit);
    launch_kernel(dynamic_kernel, 1, static_cast<unsigned>(args[1]), static_cast<size_t>(args[2]), nullptr,
                  ptr<float>(args[0]));
  } else {
    throw std::invalid_argument("sim_selftest: unknown test '" + name + "'");
  }
  return cudaGetLastError();
}

}  // namespace phi_fast::sim
