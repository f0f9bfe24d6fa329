// CPU kernel of rotary_cache: partial NeoX rotary on q and k in place, then k and v into the paged KV cache.
//
// Math, token t, part j in {q, k}, head h, i < R/2 (R = rotary_dim), c = cos[pos_t, i], s = sin[pos_t, i]:
//   r1 = x[i], r2 = x[i + R/2];   x[i] = r1 c - r2 s;   x[i + R/2] = r2 c + r1 s   (fp32, rounded once)
// dims R..D-1 are untouched. Then with slot = slot_mapping[t] >= 0 (slot -1 = padding, skipped):
//   key_cache[slot / page_size, slot % page_size, h, :] = k[t, h, :] (after rotation), value_cache[...] = v[t, h, :]
// Layouts: qkv [T, 3, H, D] with element strides (token, part, head, 1); cos, sin fp32 [max_positions, R/2];
// caches [num_pages, page_size, H, D] contiguous, qkv's dtype.
// Threads: tokens split into one contiguous range per thread, only when the call moves enough bytes to pay for
// a team (kernel_utils.h); decode (a few tokens) runs on the calling thread.
#include "cpu/rotary_cache.h"

#include <cstring>

#include "cpu/kernel_utils.h"

namespace phi_fast::cpu {
namespace {

// Token t: its q and k heads rotated in place (token points at its q part), then, when slot >= 0, its k and v
// rows copied into the caches' row `slot` (the caches are contiguous: slot = page * page_size + offset = row).
template <typename T>
void rotate_and_cache_token(T* token, int64_t part_stride, int64_t head_stride, const float* c, const float* s,
                            int64_t half, T* key_cache, T* value_cache, int64_t slot, int64_t num_heads,
                            int64_t head_dim) {
  for (int64_t part = 0; part < 2; ++part) {
    for (int64_t h = 0; h < num_heads; ++h) {
      T* x = token + part * part_stride + h * head_stride;
      for (int64_t i = 0; i < half; ++i) {
        const float r1 = to_float(x[i]), r2 = to_float(x[i + half]);
        x[i] = from_float<T>(r1 * c[i] - r2 * s[i]);
        x[i + half] = from_float<T>(r2 * c[i] + r1 * s[i]);
      }
    }
  }
  if (slot < 0) return;
  const int64_t row = slot * num_heads * head_dim;
  for (int64_t h = 0; h < num_heads; ++h) {
    std::memcpy(key_cache + row + h * head_dim, token + part_stride + h * head_stride, head_dim * sizeof(T));
    std::memcpy(value_cache + row + h * head_dim, token + 2 * part_stride + h * head_stride, head_dim * sizeof(T));
  }
}

template <typename T>
void rotary_cache_kernel(T* qkv, int64_t token_stride, int64_t part_stride, int64_t head_stride,
                         const int64_t* positions, const float* cos, const float* sin, int64_t rotary_dim,
                         T* key_cache, T* value_cache, const int64_t* slot_mapping, int64_t num_tokens,
                         int64_t num_heads, int64_t head_dim, int num_threads) {
  const int64_t half = rotary_dim / 2;
  const double bytes_per_token = num_heads * (4.0 * rotary_dim + (key_cache ? 4.0 * head_dim : 0.0)) * sizeof(T);
  parallel_rows(num_tokens, stream_ns(bytes_per_token * num_tokens), num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      rotate_and_cache_token(qkv + t * token_stride, part_stride, head_stride, cos + positions[t] * half,
                             sin + positions[t] * half, half, key_cache, value_cache,
                             key_cache != nullptr ? slot_mapping[t] : -1, num_heads, head_dim);
    }
  });
}

}  // namespace

void rotary_cache(void* qkv, int64_t qkv_token_stride, int64_t qkv_part_stride, int64_t qkv_head_stride,
                  const int64_t* positions, const float* cos, const float* sin, int64_t rotary_dim,
                  void* key_cache, void* value_cache, const int64_t* slot_mapping, int64_t num_tokens,
                  int64_t num_heads, int64_t head_dim, int64_t /*page_size: slot indexes rows directly*/,
                  DType dtype, int num_threads) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    rotary_cache_kernel(static_cast<T*>(qkv), qkv_token_stride, qkv_part_stride, qkv_head_stride, positions, cos,
                        sin, rotary_dim, static_cast<T*>(key_cache), static_cast<T*>(value_cache), slot_mapping,
                        num_tokens, num_heads, head_dim, num_threads);
  });
}

}  // namespace phi_fast::cpu
