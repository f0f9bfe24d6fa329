// SIMT emulator (csrc/sim): the emulator's own test kernels (csrc/sim/selftest.cu), built only into the sim
// backend and run by python_tests/test_sim.py through sim_selftest(name, args). Torch-free: `args` carries sizes,
// flags and the data pointers (tensor.data_ptr()) of the test's CPU tensors.
//
//   "mma"         [d, a, b, bf16]      d: f32 [16, 8] = a [16, 16] @ b [16, 8] (+ d), 16-bit a, b; one warp builds
//                                      its fragments from the PTX ISA's maps and runs mma_16816
//   "ldmatrix"    [out, m, trans]      out: u32 [32, 4] = each lane's ldmatrix_x4(.trans) registers of four 8 x 8
//                                      b16 matrices m: [4, 8, 8] staged in shared memory
//   "neighbor"    [out, in, n, sync]   out[i] = in[i - 1] (out[0] = 0) through shared memory, one block of n
//                                      threads; sync = 0 plants a missing __syncthreads
//   "cp_async"    [out, in, wait]      out = in (128 floats) through cp.async into shared memory; wait = 0 plants a
//                                      missing cp.async.wait_group
//   "oob_shared"  [out]                64 threads each write s[threadIdx.x + 1] of a 64-float __shared__ s
//   "divergent"   [kind]               kind 0: __syncthreads under `if (threadIdx.x < 32)`; 1: a full-mask shuffle
//                                      after lanes 16-31 returned; 2: lane 0 at __syncthreads while the others shuffle
//   "dynamic"     [out, n, bytes, optin]  out[i] = i through `extern __shared__` of `bytes` (cudaFuncSetAttribute
//                                      first when optin), one block of n threads; returns cudaGetLastError()
// Returns 0 or the launch's cudaError_t; emulator faults are thrown (sim::Fault).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace phi_fast::sim {

int64_t selftest(const std::string& name, const std::vector<int64_t>& args);

}  // namespace phi_fast::sim
