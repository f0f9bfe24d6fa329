// Tensor-facing quantized linear and dequantize: checks, output allocation, dispatch. Calls with up to
// kMaxKernelRows rows of x (decode) run the GEMV kernels: phi_fast::cpu::quant_linear (activations quantized to
// int8 blocks on the fly, integer dot products) or phi_fast::cuda::quant_linear (W8A16 / W4A16, x as it is). More
// rows (prompts) dequantize the weight tile by tile into torch's GEMM: on the CPU into fp32 (tiled_linear.h), on
// CUDA into the activation dtype with tiles small enough to stay in L2 between the dequantize kernel and cuBLAS.
// The sim build (phi_fast/_sim.py) takes the CUDA paths on CPU tensors and never instantiates the CPU ones.
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>

#include "cpu/quant_linear.h"
#include "cuda/quant_linear.h"
#include "ops/checks.h"
#include "ops/ops.h"
#include "ops/tiled_linear.h"

namespace phi_fast::ops {
namespace {

constexpr int64_t kMaxKernelRows = cuda::kQuantLinearMaxRows;  // the same on the CPU

// Checks qweight / scales (format from qweight's dtype: int8 per-channel, uint8 packed int4 groups) against
// in_features K and returns the kernels' view of them.
QuantWeight check_quant_weight(const OpContext& ctx, const at::Tensor& qweight, const at::Tensor& scales,
                               int64_t K) {
  TORCH_CHECK(qweight.defined() && scales.defined(), ctx.op, ": qweight and scales must be tensors");
  const at::ScalarType t = qweight.scalar_type();
  TORCH_CHECK(t == at::kChar || t == at::kByte, ctx.op, ": qweight has dtype ", dtype_str(t),
              ", expected int8 (int8 format) or uint8 (packed int4)");
  if (t == at::kChar) {
    check_arg(ctx, "qweight", qweight, {-1, K}, "[N, K]", Layout::contiguous, at::kChar);
    const int64_t N = qweight.size(0);
    check_arg(ctx, "scales", scales, {N}, "[N]", Layout::contiguous, at::kFloat);
    return {qweight.data_ptr(), scales.data_ptr(), QuantFormat::int8, N, K, K};
  }
  check_arg(ctx, "qweight", qweight, {-1, -1}, "[N, Kp / 2]", Layout::contiguous, at::kByte);
  const int64_t N = qweight.size(0), kp = 2 * qweight.size(1);
  check_arg(ctx, "scales", scales, {N, -1}, "[N, Kp / G]", Layout::contiguous, at::kHalf);
  const int64_t groups = scales.size(1);
  const int64_t G = groups > 0 && kp % groups == 0 ? kp / groups : 0;
  TORCH_CHECK_VALUE(G >= 32 && (G & (G - 1)) == 0, ctx.op, ": int4 qweight [N, Kp / 2] = ", qweight.sizes(),
                    " and scales [N, Kp / G] = ", scales.sizes(), " do not give a group size G that is a power of two >= 32");
  TORCH_CHECK_VALUE(K <= kp && K > kp - G, ctx.op, ": int4 qweight ", qweight.sizes(), " with group size ", G,
                    " holds ", kp - G + 1, "..", kp, " inputs, but in_features is ", K);
  return {qweight.data_ptr(), scales.data_ptr(), QuantFormat::int4, N, K, G};
}

// Runs launch(stream) on CUDA (or the emulator) with the launch checked; the CPU never gets here.
template <typename Launch>
void on_cuda(const OpContext& ctx, Launch&& launch) {
  dispatch_device(
      ctx, [&] { TORCH_CHECK(false, ctx.op, ": internal error: CPU tensors on the CUDA path"); },
      [&]([[maybe_unused]] void* stream) { PHI_FAST_CUDA_ONLY(launch(stream);) });
}

// Prompt-sized x on CUDA: each tile of output rows is dequantized into a scratch tile in x's dtype, then torch's
// GEMM (cuBLAS) multiplies it. Tiles of ~16 MiB stay in L2 between the two (the packed weights are what HBM
// reads); the scratch comes from torch's allocator, so this is CUDA-graph safe. x: [M, K] -> [M, N].
at::Tensor cuda_prompt_linear(const OpContext& ctx, const at::Tensor& x, const QuantWeight& w,
                              const std::optional<at::Tensor>& bias) {
  const int64_t K = w.K;
  const int64_t rows = std::clamp<int64_t>((int64_t{16} << 20) / (std::max<int64_t>(K, 1) * x.element_size()), 64,
                                           std::max<int64_t>(w.N, 1));
  at::Tensor out = at::empty({x.size(0), w.N}, x.options());
  at::Tensor tile = at::empty({std::min(rows, w.N), K}, x.options());  // [rows, K]
  for (int64_t n0 = 0; n0 < w.N; n0 += rows) {
    const int64_t n = std::min(rows, w.N - n0);
    on_cuda(ctx, [&](void* stream) { cuda::dequantize_rows(tile.data_ptr(), K, w, n0, n, ctx.dtype, stream); });
    at::Tensor o = out.narrow(1, n0, n);
    const at::Tensor wt = tile.narrow(0, 0, n).t();
    if (bias) {
      at::addmm_out(o, bias->narrow(0, n0, n), x, wt);
    } else {
      at::mm_out(o, x, wt);
    }
  }
  return out;
}

}  // namespace

// x: [M, K]; qweight: int8 [N, K] or uint8 [N, Kp / 2]; scales: fp32 [N] or fp16 [N, Kp / G]; bias: [N] or None
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const std::optional<at::Tensor>& bias) {
  const OpContext ctx = make_context("quant_linear", "x", x);
  check_arg(ctx, "x", x, {-1, -1}, "[M, K]", Layout::unit_last_stride);
  const int64_t M = x.size(0), K = x.size(1);
  const QuantWeight w = check_quant_weight(ctx, qweight, scales, K);
  if (bias) check_arg(ctx, "bias", *bias, {w.N}, "[N]", Layout::contiguous);
  if (M > kMaxKernelRows) {
#ifndef PHI_FAST_SIM
    if (ctx.device.is_cpu() && cpu::quant_gemm_enabled()) {
      at::Tensor out = at::empty({M, w.N}, x.options());
      cpu::quant_gemm(out.data_ptr(), x.data_ptr(), x.stride(0), w, bias ? bias->data_ptr() : nullptr, M, ctx.dtype,
                      at::get_num_threads());
      return out;
    }
    if (ctx.device.is_cpu()) {
      const int64_t stride = (K + 31) / 32 * 32;
      at::Tensor buffer = at::empty({std::min(tile_rows(K), w.N), stride}, x.options().dtype(at::kFloat));
      return tiled_linear(x, bias, w.N, [&](int64_t n0, int64_t rows) {
        cpu::dequantize_rows(buffer.data_ptr<float>(), stride, w, n0, rows, at::get_num_threads());
        return buffer.narrow(0, 0, rows).narrow(1, 0, K);
      });
    }
#endif
    return cuda_prompt_linear(ctx, x, w, bias);
  }
  at::Tensor out = at::empty({M, w.N}, x.options());
  if (out.numel() == 0) return out;
  const void* b = bias ? bias->data_ptr() : nullptr;
  dispatch_device(
      ctx,
      [&] { cpu::quant_linear(out.data_ptr(), x.data_ptr(), x.stride(0), w, b, M, ctx.dtype, at::get_num_threads()); },
      [&]([[maybe_unused]] void* stream) {
        PHI_FAST_CUDA_ONLY(cuda::quant_linear(out.data_ptr(), x.data_ptr(), x.stride(0), w, b, M, ctx.dtype, stream);)
      });
  return out;
}

// qweight, scales as for quant_linear -> fp32 [N, in_features]
at::Tensor dequantize(const at::Tensor& qweight, const at::Tensor& scales, int64_t in_features) {
  const OpContext ctx = make_context("dequantize", "scales", scales);
  TORCH_CHECK_VALUE(in_features >= 0, ctx.op, ": in_features must be >= 0, got ", in_features);
  const QuantWeight w = check_quant_weight(ctx, qweight, scales, in_features);
#ifndef PHI_FAST_SIM
  if (ctx.device.is_cpu()) {
    const int64_t stride = (in_features + 31) / 32 * 32;
    at::Tensor out = at::empty({w.N, stride}, scales.options().dtype(at::kFloat));
    if (out.numel() > 0) cpu::dequantize_rows(out.data_ptr<float>(), stride, w, 0, w.N, at::get_num_threads());
    return out.narrow(1, 0, in_features).contiguous();
  }
#endif
  at::Tensor out = at::empty({w.N, in_features}, scales.options().dtype(at::kFloat));
  if (out.numel() > 0) {
    on_cuda(ctx, [&](void* stream) {
      cuda::dequantize_rows(out.data_ptr(), in_features, w, 0, w.N, DType::f32, stream);
    });
  }
  return out;
}

}  // namespace phi_fast::ops
