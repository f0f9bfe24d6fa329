// Tensor-facing bias_gelu and bias_quick_gelu: checks, output allocation, dispatch to phi_fast::cpu /
// phi_fast::cuda (csrc/cpu/activation.h, csrc/cuda/activation.h).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "cpu/activation.h"
#include "cuda/activation.h"
#include "ops/checks.h"
#include "ops/ops.h"

namespace phi_fast::ops {

// x: [T, N]; bias: [N] -> gelu(x + bias): [T, N]; approximate: "tanh" (gelu_new) or "none" (erf)
at::Tensor bias_gelu(const at::Tensor& x, const at::Tensor& bias, const std::string& approximate) {
  const OpContext ctx = make_context("bias_gelu", "x", x);
  TORCH_CHECK_VALUE(approximate == "tanh" || approximate == "none", "bias_gelu: unsupported approximate '",
                    approximate, "' (supported: 'tanh', 'none')");
  check_arg(ctx, "x", x, {-1, -1}, "[T, N]", Layout::unit_last_stride);
  const int64_t T = x.size(0), N = x.size(1);
  check_arg(ctx, "bias", bias, {N}, "[N]", Layout::contiguous);
  at::Tensor y = at::empty({T, N}, x.options());
  if (y.numel() == 0) return y;
  const bool tanh = approximate == "tanh";
  dispatch_device(
      ctx,
      [&] {
        cpu::bias_gelu(y.data_ptr(), x.data_ptr(), x.stride(0), bias.data_ptr(), T, N, tanh, ctx.dtype,
                       at::get_num_threads());
      },
      [&]([[maybe_unused]] void* stream) {
        PHI_FAST_CUDA_ONLY(
            cuda::bias_gelu(y.data_ptr(), x.data_ptr(), x.stride(0), bias.data_ptr(), T, N, tanh, ctx.dtype, stream);)
      });
  return y;
}

// x: [T, N]; bias: [N] -> h * sigmoid(1.702 h), h = x + bias: [T, N]
at::Tensor bias_quick_gelu(const at::Tensor& x, const at::Tensor& bias) {
  const OpContext ctx = make_context("bias_quick_gelu", "x", x);
  check_arg(ctx, "x", x, {-1, -1}, "[T, N]", Layout::unit_last_stride);
  const int64_t T = x.size(0), N = x.size(1);
  check_arg(ctx, "bias", bias, {N}, "[N]", Layout::contiguous);
  at::Tensor y = at::empty({T, N}, x.options());
  if (y.numel() == 0) return y;
  dispatch_device(
      ctx,
      [&] {
        cpu::bias_quick_gelu(y.data_ptr(), x.data_ptr(), x.stride(0), bias.data_ptr(), T, N, ctx.dtype,
                             at::get_num_threads());
      },
      [&]([[maybe_unused]] void* stream) {
        PHI_FAST_CUDA_ONLY(
            cuda::bias_quick_gelu(y.data_ptr(), x.data_ptr(), x.stride(0), bias.data_ptr(), T, N, ctx.dtype, stream);)
      });
  return y;
}

}  // namespace phi_fast::ops
