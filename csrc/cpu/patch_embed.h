// CPU launchers of the patch-embedding input (csrc/cpu/patch_embed.cpp). Same parameters as
// csrc/cuda/patch_embed.h with num_threads in place of the stream; conventions in csrc/cpu/norm.h.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace phi_fast::cpu {

// Float images (already normalized) to patch rows, same dtype:
// out[b, py * (W/p) + px, c * p * p + ky * p + kx] = pixels[b, c, py * p + ky, px * p + kx].
// out: [B, (H/p) * (W/p), C * p * p] contiguous; pixels: [B, C, H, W] with strides
// (stride_b, stride_c, stride_h, stride_w) in elements (any, e.g. a permuted HWC image); H, W multiples of p.
void patchify(void* out, const void* pixels, int64_t stride_b, int64_t stride_c, int64_t stride_h,
              int64_t stride_w, int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t patch,
              DType dtype, int num_threads);

// uint8 images to normalized fp32 patch rows: value = (x / 255 - mean[c]) / std[c] in fp32 (this order),
// placed as in patchify. out: fp32 [B, (H/p) * (W/p), C * p * p] contiguous; pixels: uint8 [B, C, H, W]
// with strides as above; mean, std: fp32 [C].
void patchify_uint8(float* out, const uint8_t* pixels, int64_t stride_b, int64_t stride_c, int64_t stride_h,
                    int64_t stride_w, const float* mean, const float* std, int64_t batch, int64_t channels,
                    int64_t height, int64_t width, int64_t patch, int num_threads);

}  // namespace phi_fast::cpu
