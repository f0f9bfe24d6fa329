// Tensor-facing patchify: checks, output allocation, dispatch to phi_fast::cpu / phi_fast::cuda
// (csrc/cpu/patch_embed.h, csrc/cuda/patch_embed.h). The patch GEMM and embed_layernorm follow in
// phi_fast/ops.py's patch_embed.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "cpu/patch_embed.h"
#include "cuda/patch_embed.h"
#include "ops/checks.h"
#include "ops/ops.h"

namespace phi_fast::ops {

// pixels: [B, 3, H, W] uint8 (normalized with mean, std: fp32 [3]) or float -> [B, (H/p) * (W/p), 3 * p * p],
// float32 for uint8 pixels, else pixels' dtype
at::Tensor patchify(const at::Tensor& pixels, int64_t patch, const std::optional<at::Tensor>& mean,
                    const std::optional<at::Tensor>& std) {
  const char* op = "patchify";
  TORCH_CHECK(pixels.defined(), op, ": pixels is undefined");
  const bool is_uint8 = pixels.scalar_type() == at::kByte;
  TORCH_CHECK(is_uint8 || pixels.scalar_type() == at::kFloat || pixels.scalar_type() == at::kHalf ||
                  pixels.scalar_type() == at::kBFloat16,
              op, ": pixels has unsupported dtype ", dtype_str(pixels.scalar_type()),
              " (supported: uint8, float32, float16, bfloat16)");
  const OpContext ctx = make_context(op, "pixels", pixels, is_uint8 ? at::kFloat : pixels.scalar_type());
  check_arg(ctx, "pixels", pixels, {-1, 3, -1, -1}, "[B, 3, H, W]", Layout::any, pixels.scalar_type());
  const int64_t B = pixels.size(0), C = pixels.size(1), H = pixels.size(2), W = pixels.size(3);
  TORCH_CHECK_VALUE(patch >= 1 && H % patch == 0 && W % patch == 0, op, ": image size ", H, "x", W,
                    " is not a multiple of patch ", patch);
  if (is_uint8) {
    TORCH_CHECK(mean.has_value() && std.has_value(), op, ": uint8 pixels need mean and std (float32 [3])");
    check_arg(ctx, "mean", *mean, {C}, "[3]", Layout::contiguous, at::kFloat);
    check_arg(ctx, "std", *std, {C}, "[3]", Layout::contiguous, at::kFloat);
  }
  const int64_t num_patches = (H / patch) * (W / patch);
  at::Tensor out = at::empty({B, num_patches, C * patch * patch}, pixels.options().dtype(ctx.scalar_type));
  if (out.numel() == 0) return out;
  const int64_t sb = pixels.stride(0), sc = pixels.stride(1), sh = pixels.stride(2), sw = pixels.stride(3);
  dispatch_device(
      ctx,
      [&] {
        if (is_uint8) {
          cpu::patchify_uint8(out.data_ptr<float>(), pixels.data_ptr<uint8_t>(), sb, sc, sh, sw,
                              mean->data_ptr<float>(), std->data_ptr<float>(), B, C, H, W, patch,
                              at::get_num_threads());
        } else {
          cpu::patchify(out.data_ptr(), pixels.data_ptr(), sb, sc, sh, sw, B, C, H, W, patch, ctx.dtype,
                        at::get_num_threads());
        }
      },
      [&]([[maybe_unused]] void* stream) {
        PHI_FAST_CUDA_ONLY(
            if (is_uint8) {
              cuda::patchify_uint8(out.data_ptr<float>(), pixels.data_ptr<uint8_t>(), sb, sc, sh, sw,
                                   mean->data_ptr<float>(), std->data_ptr<float>(), B, C, H, W, patch, stream);
            } else {
              cuda::patchify(out.data_ptr(), pixels.data_ptr(), sb, sc, sh, sw, B, C, H, W, patch, ctx.dtype,
                             stream);
            })
      });
  return out;
}

}  // namespace phi_fast::ops
