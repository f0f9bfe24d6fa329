// Tensor-facing linear: checks, output allocation, dispatch. CPU calls with few rows of x (max_kernel_rows) run
// phi_fast::cpu::linear (csrc/cpu/linear.h: the weights read once, near the memory bandwidth); larger M on the
// CPU, and every CUDA call, go to torch's GEMM (MKL / oneDNN / cuBLAS), which wins there, except fp16 and bf16
// on CPUs without native bf16 dot products, where torch's 16-bit GEMM is several times slower than fp32: those
// convert the weight to fp32 tile by tile into the fp32 GEMM (tiled_linear.h).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>

#include "cpu/linear.h"
#include "ops/checks.h"
#include "ops/ops.h"
#include "ops/tiled_linear.h"

namespace phi_fast::ops {
namespace {

// Rows of x up to which the CPU kernel beats torch's GEMM (cold weights, 2-core AMD EPYC with AVX-512,
// bench/NOTES.md): fp32 and fp16 through M = 16 (MKL's fp32 GEMV/GEMM reach ~20 GB/s and less, torch's fp16
// path less still); bf16 only at M = 1 where the CPU has native bf16 dot products, since from M = 2 oneDNN's
// AVX512-BF16 dot products out-compute our AVX2 FMAs on the widened weights (without them, through M = 16).
int64_t max_kernel_rows(at::ScalarType dtype) { return dtype == at::kBFloat16 && cpu::native_bf16() ? 1 : 16; }

// Whether torch's GEMM in this dtype is slow on this CPU (no native 16-bit dot products).
bool slow_torch_gemm(at::ScalarType dtype) {
  return dtype == at::kHalf || (dtype == at::kBFloat16 && !cpu::native_bf16());
}

}  // namespace

// x: [M, K]; weight: [N, K]; bias: [N] or None -> [M, N]
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const OpContext ctx = make_context("linear", "x", x);
  check_arg(ctx, "x", x, {-1, -1}, "[M, K]", Layout::unit_last_stride);
  const int64_t M = x.size(0), K = x.size(1);
  check_arg(ctx, "weight", weight, {-1, K}, "[N, K]", Layout::contiguous);
  const int64_t N = weight.size(0);
  if (bias) check_arg(ctx, "bias", *bias, {N}, "[N]", Layout::contiguous);
#ifdef PHI_FAST_SIM
  return at::linear(x, weight, bias);  // the sim backend mirrors CUDA, where GEMMs are torch's
#else
  if (ctx.device.is_cpu() && M > max_kernel_rows(ctx.scalar_type) && slow_torch_gemm(ctx.scalar_type)) {
    return tiled_linear(x, bias, N, [&](int64_t n0, int64_t rows) { return weight.narrow(0, n0, rows); });
  }
  if (ctx.device.is_cuda() || M > max_kernel_rows(ctx.scalar_type)) return at::linear(x, weight, bias);
  at::Tensor out = at::empty({M, N}, x.options());
  if (out.numel() == 0) return out;
  cpu::linear(out.data_ptr(), x.data_ptr(), x.stride(0), weight.data_ptr(), bias ? bias->data_ptr() : nullptr, M, N,
              K, ctx.dtype, at::get_num_threads());
  return out;
#endif
}

}  // namespace phi_fast::ops
