// CPU kernel of rotary_cache: partial NeoX rotary on q and k in place, then k and v into the paged KV cache.
//
// Math, token t, part j in {q, k}, head h, i < R/2 (R = rotary_dim), c = cos[pos_t, i], s = sin[pos_t, i]:
//   r1 = x[i], r2 = x[i + R/2];   x[i] = r1 c - r2 s;   x[i + R/2] = r2 c + r1 s   (fp32, rounded once)
// dims R..D-1 are untouched. Then with slot = slot_mapping[t] >= 0 (slot -1 = padding, skipped):
//   key_cache[slot / page_size, slot % page_size, h, :] = k[t, h, :] (after rotation), value_cache[...] = v[t, h, :]
// Layouts: qkv [T, 3, H, D] with element strides (token, part, head, 1); cos, sin fp32 [max_positions, R/2];
// caches [num_pages, page_size, H, D] contiguous, qkv's dtype.
// Threads: OpenMP over tokens (static); each token's 2 x H rotations and 2 x H row copies run in its thread.
#include "cpu/rotary_cache.h"

#include <cstring>

#include "cpu/kernel_utils.h"

namespace phi_fast::cpu {
namespace {

template <typename T>
void rotary_cache_kernel(T* qkv, int64_t token_stride, int64_t part_stride, int64_t head_stride,
                         const int64_t* positions, const float* cos, const float* sin, int64_t rotary_dim,
                         T* key_cache, T* value_cache, const int64_t* slot_mapping, int64_t num_tokens,
                         int64_t num_heads, int64_t head_dim) {
  const int64_t half = rotary_dim / 2;
#pragma omp parallel for schedule(static) if (num_tokens * num_heads * rotary_dim >= kParallelMinElements)
  for (int64_t t = 0; t < num_tokens; ++t) {
    const float* c = cos + positions[t] * half;
    const float* s = sin + positions[t] * half;
    T* token = qkv + t * token_stride;
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
    if (key_cache == nullptr || slot_mapping[t] < 0) continue;
    const int64_t row = slot_mapping[t] * num_heads * head_dim;  // the caches are contiguous: slot = row
    for (int64_t h = 0; h < num_heads; ++h) {
      std::memcpy(key_cache + row + h * head_dim, token + part_stride + h * head_stride, head_dim * sizeof(T));
      std::memcpy(value_cache + row + h * head_dim, token + 2 * part_stride + h * head_stride,
                  head_dim * sizeof(T));
    }
  }
}

}  // namespace

void rotary_cache(void* qkv, int64_t qkv_token_stride, int64_t qkv_part_stride, int64_t qkv_head_stride,
                  const int64_t* positions, const float* cos, const float* sin, int64_t rotary_dim,
                  void* key_cache, void* value_cache, const int64_t* slot_mapping, int64_t num_tokens,
                  int64_t num_heads, int64_t head_dim, int64_t /*page_size: slot indexes rows directly*/,
                  DType dtype) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    rotary_cache_kernel(static_cast<T*>(qkv), qkv_token_stride, qkv_part_stride, qkv_head_stride, positions, cos,
                        sin, rotary_dim, static_cast<T*>(key_cache), static_cast<T*>(value_cache), slot_mapping,
                        num_tokens, num_heads, head_dim);
  });
}

}  // namespace phi_fast::cpu
