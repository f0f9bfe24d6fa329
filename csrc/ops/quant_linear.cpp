// Tensor-facing quantized linear and dequantize: checks, output allocation, dispatch. CPU calls with up to
// kMaxKernelRows rows of x run phi_fast::cpu::quant_linear (the packed weights read once, dequantized in L1);
// more rows (prompts) dequantize the weight tile by tile into torch's GEMM (tiled_linear.h). CUDA has no
// quantized kernels yet: a clear NotImplementedError.
#ifndef PHI_FAST_SIM  // the sim backend runs CUDA kernels, and there are no quantized ones yet
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "cpu/quant_linear.h"
#include "ops/checks.h"
#include "ops/ops.h"
#include "ops/tiled_linear.h"

namespace phi_fast::ops {
namespace {

constexpr int64_t kMaxKernelRows = 16;

// Checks qweight / scales (format from qweight's dtype: int8 per-channel, uint8 packed int4 groups) against
// in_features K and returns the kernels' view of them.
cpu::QuantWeight check_quant_weight(const OpContext& ctx, const at::Tensor& qweight, const at::Tensor& scales,
                                    int64_t K) {
  TORCH_CHECK(qweight.defined() && scales.defined(), ctx.op, ": qweight and scales must be tensors");
  TORCH_CHECK_NOT_IMPLEMENTED(!qweight.device().is_cuda(), ctx.op,
                              ": int8/int4 weights have no CUDA kernels yet (issue 14, CUDA part); load the model "
                              "without quantize= on CUDA, or quantize on the CPU");
  const at::ScalarType t = qweight.scalar_type();
  TORCH_CHECK(t == at::kChar || t == at::kByte, ctx.op, ": qweight has dtype ", dtype_str(t),
              ", expected int8 (int8 format) or uint8 (packed int4)");
  if (t == at::kChar) {
    check_arg(ctx, "qweight", qweight, {-1, K}, "[N, K]", Layout::contiguous, at::kChar);
    const int64_t N = qweight.size(0);
    check_arg(ctx, "scales", scales, {N}, "[N]", Layout::contiguous, at::kFloat);
    return {qweight.data_ptr(), scales.data_ptr<float>(), cpu::QuantFormat::int8, N, K, K};
  }
  check_arg(ctx, "qweight", qweight, {-1, -1}, "[N, Kp / 2]", Layout::contiguous, at::kByte);
  const int64_t N = qweight.size(0), kp = 2 * qweight.size(1);
  check_arg(ctx, "scales", scales, {N, -1}, "[N, Kp / G]", Layout::contiguous, at::kFloat);
  const int64_t groups = scales.size(1);
  const int64_t G = groups > 0 && kp % groups == 0 ? kp / groups : 0;
  TORCH_CHECK_VALUE(G >= 32 && (G & (G - 1)) == 0, ctx.op, ": int4 qweight [N, Kp / 2] = ", qweight.sizes(),
                    " and scales [N, Kp / G] = ", scales.sizes(), " do not give a group size G that is a power of two >= 32");
  TORCH_CHECK_VALUE(K <= kp && K > kp - G, ctx.op, ": int4 qweight ", qweight.sizes(), " with group size ", G,
                    " holds ", kp - G + 1, "..", kp, " inputs, but in_features is ", K);
  return {qweight.data_ptr(), scales.data_ptr<float>(), cpu::QuantFormat::int4, N, K, G};
}

}  // namespace

// x: [M, K]; qweight: int8 [N, K] or uint8 [N, Kp / 2]; scales: fp32 [N] or [N, Kp / G]; bias: [N] or None
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const std::optional<at::Tensor>& bias) {
  const OpContext ctx = make_context("quant_linear", "x", x);
  check_arg(ctx, "x", x, {-1, -1}, "[M, K]", Layout::unit_last_stride);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK_NOT_IMPLEMENTED(!ctx.device.is_cuda(), ctx.op,
                              ": int8/int4 weights have no CUDA kernels yet (issue 14, CUDA part); load the model "
                              "without quantize= on CUDA");
  TORCH_CHECK(qweight.defined() && qweight.device() == ctx.device, ctx.op, ": qweight must be on ", ctx.device);
  TORCH_CHECK(scales.defined() && scales.device() == ctx.device, ctx.op, ": scales must be on ", ctx.device);
  const cpu::QuantWeight w = check_quant_weight(ctx, qweight, scales, K);
  if (bias) check_arg(ctx, "bias", *bias, {w.N}, "[N]", Layout::contiguous);
  if (M > kMaxKernelRows) {
    const int64_t stride = (K + 31) / 32 * 32;
    at::Tensor buffer = at::empty({std::min(tile_rows(K), w.N), stride}, x.options().dtype(at::kFloat));
    return tiled_linear(x, bias, w.N, [&](int64_t n0, int64_t rows) {
      cpu::dequantize_rows(buffer.data_ptr<float>(), stride, w, n0, rows);
      return buffer.narrow(0, 0, rows).narrow(1, 0, K);
    });
  }
  at::Tensor out = at::empty({M, w.N}, x.options());
  if (out.numel() == 0) return out;
  cpu::quant_linear(out.data_ptr(), x.data_ptr(), x.stride(0), w, bias ? bias->data_ptr() : nullptr, M, ctx.dtype,
                    at::get_num_threads());
  return out;
}

// qweight, scales as for quant_linear -> fp32 [N, in_features]
at::Tensor dequantize(const at::Tensor& qweight, const at::Tensor& scales, int64_t in_features) {
  const OpContext ctx = make_context("dequantize", "scales", scales);
  TORCH_CHECK_VALUE(in_features >= 0, ctx.op, ": in_features must be >= 0, got ", in_features);
  const cpu::QuantWeight w = check_quant_weight(ctx, qweight, scales, in_features);
  const int64_t stride = (in_features + 31) / 32 * 32;
  at::Tensor out = at::empty({w.N, stride}, scales.options());
  if (out.numel() > 0) cpu::dequantize_rows(out.data_ptr<float>(), stride, w, 0, w.N);
  return out.narrow(1, 0, in_features).contiguous();
}

}  // namespace phi_fast::ops

#endif  // PHI_FAST_SIM
