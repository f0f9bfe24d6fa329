// CPU launcher of rotary_cache (csrc/cpu/rotary_cache.cpp). Same parameters as csrc/cuda/rotary_cache.h
// with num_threads in place of the stream; conventions in csrc/cpu/norm.h.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace phi_fast::cpu {

// Partial NeoX rotary of q and k in place, then k (rotated) and v written into the paged cache.
// For j in {q, k}, every head, i < R/2 with R = rotary_dim, c = cos[positions[t], i], s = sin[positions[t], i]:
//   r1 = x[i], r2 = x[i + R/2];  x[i] = r1 c - r2 s;  x[i + R/2] = r2 c + r1 s   (fp32 math, dims >= R untouched)
// Then, when key_cache is not null and slot = slot_mapping[t] >= 0:
//   key_cache[slot / page_size, slot % page_size] = k[t]; value_cache[...] = v[t]   (all H x D)
// qkv: [T, 3, H, D] with strides (qkv_token_stride, qkv_part_stride, qkv_head_stride, 1), modified in place;
// positions: int64 [T]; cos, sin: fp32 [max_positions, R/2] contiguous; rotary_dim: even, <= head_dim;
// key_cache, value_cache: [num_pages, page_size, H, D] contiguous, same DType as qkv, or both null (then
// slot_mapping is ignored and may be null); slot_mapping: int64 [T], -1 = skip.
void rotary_cache(void* qkv, int64_t qkv_token_stride, int64_t qkv_part_stride, int64_t qkv_head_stride,
                  const int64_t* positions, const float* cos, const float* sin, int64_t rotary_dim,
                  void* key_cache, void* value_cache, const int64_t* slot_mapping, int64_t num_tokens,
                  int64_t num_heads, int64_t head_dim, int64_t page_size, DType dtype, int num_threads);

}  // namespace phi_fast::cpu
