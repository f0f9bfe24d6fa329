// CPU kernels of the patch-embedding input: images -> rows of the patch GEMM.
//
// Math: out[b, py * (W/p) + px, c * p * p + ky * p + kx] = f(pixels[b, c, py * p + ky, px * p + kx]) with
// f the identity for float images and f(x) = (x / 255 - mean[c]) / std[c] (fp32, this order) for uint8,
// taken from a 256-entry table per channel built once per call (same fp32 operations, so bit-identical).
// Layouts: pixels [B, C, H, W] with any element strides (a permuted HWC image works without a copy);
// out [B, (H/p) * (W/p), C * p * p] contiguous.
// Threads: (image, patch row) pairs split into one contiguous range per thread, each pair writing W/p contiguous
// output rows, only when the call moves enough bytes to pay for a team (kernel_utils.h).
#include "cpu/patch_embed.h"

#include <vector>

#include "cpu/kernel_utils.h"

namespace phi_fast::cpu {
namespace {

// Applies `value(c, pixel)` while scattering pixels into patch rows.
template <typename In, typename Out, typename Value>
void patchify_kernel(Out* out, const In* pixels, int64_t stride_b, int64_t stride_c, int64_t stride_h,
                     int64_t stride_w, int64_t batch, int64_t channels, int64_t height, int64_t width,
                     int64_t patch, Value value, int num_threads) {
  const int64_t grid_h = height / patch, grid_w = width / patch;
  const int64_t row_len = channels * patch * patch;
  const double bytes = static_cast<double>(batch) * channels * height * width * (sizeof(In) + sizeof(Out));
  parallel_rows(batch * grid_h, stream_ns(bytes), num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / grid_h, py = task % grid_h;
      for (int64_t px = 0; px < grid_w; ++px) {
        Out* dst = out + ((b * grid_h + py) * grid_w + px) * row_len;
        for (int64_t c = 0; c < channels; ++c) {
          for (int64_t ky = 0; ky < patch; ++ky) {
            const In* src =
                pixels + b * stride_b + c * stride_c + (py * patch + ky) * stride_h + px * patch * stride_w;
            Out* d = dst + (c * patch + ky) * patch;
            for (int64_t kx = 0; kx < patch; ++kx) d[kx] = value(c, src[kx * stride_w]);
          }
        }
      }
    }
  });
}

}  // namespace

void patchify(void* out, const void* pixels, int64_t stride_b, int64_t stride_c, int64_t stride_h,
              int64_t stride_w, int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t patch,
              DType dtype, int num_threads) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    patchify_kernel(static_cast<T*>(out), static_cast<const T*>(pixels), stride_b, stride_c, stride_h, stride_w,
                    batch, channels, height, width, patch, [](int64_t, T x) { return x; }, num_threads);
  });
}

void patchify_uint8(float* out, const uint8_t* pixels, int64_t stride_b, int64_t stride_c, int64_t stride_h,
                    int64_t stride_w, const float* mean, const float* std, int64_t batch, int64_t channels,
                    int64_t height, int64_t width, int64_t patch, int num_threads) {
  std::vector<float> table(channels * 256);  // [C, 256]: normalized value of each byte per channel
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t x = 0; x < 256; ++x) table[c * 256 + x] = (static_cast<float>(x) / 255.0f - mean[c]) / std[c];
  }
  const float* t = table.data();
  patchify_kernel(out, pixels, stride_b, stride_c, stride_h, stride_w, batch, channels, height, width, patch,
                  [t](int64_t c, uint8_t x) { return t[c * 256 + x]; }, num_threads);
}

}  // namespace phi_fast::cpu
