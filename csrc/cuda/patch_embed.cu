// Patch-embedding input: images -> rows of the patch GEMM (the conv weight as a [C*p*p, hidden] matrix).
// Launchers declared in csrc/cuda/patch_embed.h.
//
// Math: out[b, py * (W/p) + px, c * p * p + ky * p + kx] = f(pixels[b, c, py * p + ky, px * p + kx]) with
//   patchify:       f(x) = x (same dtype, exact copy);
//   patchify_uint8: f(x) = (x / 255 - mean[c]) / std[c] in fp32, in this order (IEEE divisions).
// Layouts: pixels [B, C, H, W] with any element strides (NCHW, or a permuted HWC image); mean, std fp32 [C];
//   out [B, N, C*p*p] contiguous, N = (H/p) * (W/p).
// Thread mapping: one block per output row (b, n); its threads walk the C*p*p columns with stride blockDim, so
//   stores are coalesced and a warp reads a few runs of p consecutive pixels. A patch row is not 16-byte
//   aligned in the image for p = 14 (the CLIP patch), so there is no vector path: the op moves ~1 MB per image.
#include "cuda/kernel_utils.cuh"
#include "cuda/patch_embed.h"

namespace phi_fast::cuda {
namespace {

struct ImageGeometry {
  int64_t stride_b, stride_c, stride_h, stride_w;
  int channels, patch, grid_w, num_patches;
};

template <typename TIn, typename TOut, bool kNormalize>
__global__ void patchify_kernel(TOut* __restrict__ out, const TIn* __restrict__ pixels, ImageGeometry g,
                                const float* __restrict__ mean, const float* __restrict__ std) {
  const int64_t row = blockIdx.x;
  const int64_t b = row / g.num_patches;
  const int n = static_cast<int>(row - b * g.num_patches);
  const int py = n / g.grid_w;
  const int px = n - py * g.grid_w;
  const int area = g.patch * g.patch;
  const int row_len = g.channels * area;
  const TIn* image = pixels + b * g.stride_b + static_cast<int64_t>(py) * g.patch * g.stride_h +
                     static_cast<int64_t>(px) * g.patch * g.stride_w;
  TOut* dst = out + row * row_len;
  for (int col = threadIdx.x; col < row_len; col += blockDim.x) {
    const int c = col / area;
    const int r = col - c * area;
    const int ky = r / g.patch;
    const int kx = r - ky * g.patch;
    const TIn x = image[c * g.stride_c + ky * g.stride_h + kx * g.stride_w];
    if constexpr (kNormalize) {
      dst[col] = (static_cast<float>(x) / 255.0f - mean[c]) / std[c];
    } else {
      dst[col] = x;
    }
  }
}

template <typename TIn, typename TOut, bool kNormalize>
void launch(TOut* out, const TIn* pixels, int64_t stride_b, int64_t stride_c, int64_t stride_h, int64_t stride_w,
            const float* mean, const float* std, int64_t batch, int64_t channels, int64_t height, int64_t width,
            int64_t patch, cudaStream_t stream) {
  const int64_t grid_w = width / patch;
  const int64_t num_patches = (height / patch) * grid_w;
  const int64_t rows = batch * num_patches;
  const int64_t row_len = channels * patch * patch;
  if (rows == 0 || row_len == 0) return;
  const ImageGeometry g{stride_b, stride_c, stride_h, stride_w, static_cast<int>(channels),
                        static_cast<int>(patch), static_cast<int>(grid_w), static_cast<int>(num_patches)};
  const int threads = static_cast<int>(row_len >= 256 ? 256 : ceil_div(row_len, 32) * 32);
  launch_kernel(patchify_kernel<TIn, TOut, kNormalize>, static_cast<unsigned>(rows), threads, 0, stream, out, pixels, g,
                mean, std);
}

}  // namespace

void patchify(void* out, const void* pixels, int64_t stride_b, int64_t stride_c, int64_t stride_h,
              int64_t stride_w, int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t patch,
              DType dtype, void* stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch<T, T, false>(static_cast<T*>(out), static_cast<const T*>(pixels), stride_b, stride_c, stride_h,
                        stride_w, nullptr, nullptr, batch, channels, height, width, patch, as_stream(stream));
  });
}

void patchify_uint8(float* out, const uint8_t* pixels, int64_t stride_b, int64_t stride_c, int64_t stride_h,
                    int64_t stride_w, const float* mean, const float* std, int64_t batch, int64_t channels,
                    int64_t height, int64_t width, int64_t patch, void* stream) {
  launch<uint8_t, float, true>(out, pixels, stride_b, stride_c, stride_h, stride_w, mean, std, batch, channels,
                               height, width, patch, as_stream(stream));
}

}  // namespace phi_fast::cuda
