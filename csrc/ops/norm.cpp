// Tensor-facing layernorm, add_layernorm and embed_layernorm: checks, output allocation, dispatch to
// phi_fast::cpu / phi_fast::cuda (csrc/cpu/norm.h, csrc/cuda/norm.h).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "cpu/norm.h"
#include "cuda/norm.h"
#include "ops/checks.h"
#include "ops/ops.h"

namespace phi_fast::ops {

// x: [T, C]; weight, bias: [C] -> y: [T, C]
at::Tensor layernorm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  const OpContext ctx = make_context("layernorm", "x", x);
  check_arg(ctx, "x", x, {-1, -1}, "[T, C]", Layout::unit_last_stride);
  const int64_t T = x.size(0), C = x.size(1);
  check_arg(ctx, "weight", weight, {C}, "[C]", Layout::contiguous);
  check_arg(ctx, "bias", bias, {C}, "[C]", Layout::contiguous);
  at::Tensor y = at::empty({T, C}, x.options());
  if (y.numel() == 0) return y;
  const float e = static_cast<float>(eps);
  dispatch_device(
      ctx,
      [&] {
        cpu::layernorm(y.data_ptr(), x.data_ptr(), x.stride(0), weight.data_ptr(), bias.data_ptr(), T, C, e, ctx.dtype,
                       at::get_num_threads());
      },
      [&]([[maybe_unused]] void* stream) {
        PHI_FAST_CUDA_ONLY(cuda::layernorm(y.data_ptr(), x.data_ptr(), x.stride(0), weight.data_ptr(),
                                           bias.data_ptr(), T, C, e, ctx.dtype, stream);)
      });
  return y;
}

// x, a, b: [T, C]; weight, bias: [C] -> (s = (a + b) + x: [T, C], y = LayerNorm(s): [T, C])
std::tuple<at::Tensor, at::Tensor> add_layernorm(const at::Tensor& x, const at::Tensor& a,
                                                 const std::optional<at::Tensor>& b, const at::Tensor& weight,
                                                 const at::Tensor& bias, double eps) {
  const OpContext ctx = make_context("add_layernorm", "x", x);
  check_arg(ctx, "x", x, {-1, -1}, "[T, C]", Layout::unit_last_stride);
  const int64_t T = x.size(0), C = x.size(1);
  check_arg(ctx, "a", a, {T, C}, "[T, C]", Layout::unit_last_stride);
  if (b) check_arg(ctx, "b", *b, {T, C}, "[T, C]", Layout::unit_last_stride);
  check_arg(ctx, "weight", weight, {C}, "[C]", Layout::contiguous);
  check_arg(ctx, "bias", bias, {C}, "[C]", Layout::contiguous);
  at::Tensor s = at::empty({T, C}, x.options());
  at::Tensor y = at::empty({T, C}, x.options());
  if (y.numel() == 0) return {s, y};
  const void* b_ptr = b ? b->data_ptr() : nullptr;
  const int64_t b_stride = b ? b->stride(0) : 0;
  const float e = static_cast<float>(eps);
  dispatch_device(
      ctx,
      [&] {
        cpu::add_layernorm(s.data_ptr(), y.data_ptr(), x.data_ptr(), x.stride(0), a.data_ptr(), a.stride(0), b_ptr,
                           b_stride, weight.data_ptr(), bias.data_ptr(), T, C, e, ctx.dtype, at::get_num_threads());
      },
      [&]([[maybe_unused]] void* stream) {
        PHI_FAST_CUDA_ONLY(cuda::add_layernorm(s.data_ptr(), y.data_ptr(), x.data_ptr(), x.stride(0), a.data_ptr(),
                                               a.stride(0), b_ptr, b_stride, weight.data_ptr(), bias.data_ptr(), T,
                                               C, e, ctx.dtype, stream);)
      });
  return {s, y};
}

// patches: [B, N, C]; class_embedding: [C]; position_embedding: [N + 1, C]; weight, bias: [C] -> [B, N + 1, C]
at::Tensor embed_layernorm(const at::Tensor& patches, const at::Tensor& class_embedding,
                           const at::Tensor& position_embedding, const at::Tensor& weight, const at::Tensor& bias,
                           double eps) {
  const OpContext ctx = make_context("embed_layernorm", "patches", patches);
  check_arg(ctx, "patches", patches, {-1, -1, -1}, "[B, N, C]", Layout::unit_last_stride);
  const int64_t B = patches.size(0), N = patches.size(1), C = patches.size(2);
  check_arg(ctx, "class_embedding", class_embedding, {C}, "[C]", Layout::contiguous);
  check_arg(ctx, "position_embedding", position_embedding, {N + 1, C}, "[N + 1, C]", Layout::contiguous);
  check_arg(ctx, "weight", weight, {C}, "[C]", Layout::contiguous);
  check_arg(ctx, "bias", bias, {C}, "[C]", Layout::contiguous);
  at::Tensor y = at::empty({B, N + 1, C}, patches.options());
  if (y.numel() == 0) return y;
  const float e = static_cast<float>(eps);
  dispatch_device(
      ctx,
      [&] {
        cpu::embed_layernorm(y.data_ptr(), patches.data_ptr(), patches.stride(0), patches.stride(1),
                             class_embedding.data_ptr(), position_embedding.data_ptr(), weight.data_ptr(),
                             bias.data_ptr(), B, N, C, e, ctx.dtype, at::get_num_threads());
      },
      [&]([[maybe_unused]] void* stream) {
        PHI_FAST_CUDA_ONLY(cuda::embed_layernorm(y.data_ptr(), patches.data_ptr(), patches.stride(0),
                                                 patches.stride(1), class_embedding.data_ptr(),
                                                 position_embedding.data_ptr(), weight.data_ptr(), bias.data_ptr(),
                                                 B, N, C, e, ctx.dtype, stream);)
      });
  return y;
}

}  // namespace phi_fast::ops
