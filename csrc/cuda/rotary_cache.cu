// rotary_cache: partial NeoX rotary of q and k in place, plus the paged KV-cache write of k (rotated) and v, in
// one launch. Launcher declared in csrc/cuda/rotary_cache.h.
//
// Math (fp32, rounded to the tensor dtype), R = rotary_dim, half = R / 2, for q and k of token t, every head,
// i < half, c = cos[positions[t], i], s = sin[positions[t], i]:
//   x[i] = x[i] c - x[i + half] s;   x[i + half] = x[i + half] c + x[i] s;   dims >= R untouched.
// Then, when the caches are given and slot = slot_mapping[t] >= 0: key_cache row `slot` = k[t] (rotated),
// value_cache row `slot` = v[t]; the caches are contiguous [num_pages, page_size, H, D], so row `slot` of
// [num_pages * page_size, H, D] is page slot / page_size, offset slot % page_size.
// Layouts: qkv [T, 3, H, D] with strides (token, part, head, 1); positions, slot_mapping int64 [T];
//   cos, sin fp32 [max_positions, half] contiguous.
// Thread mapping: grid (ceil(units / 128), min(T, 65535)); blockIdx.y walks tokens. A token has `units` work
//   items of VEC elements, each owned by one thread:
//     [0, 2 H half/VEC)                 rotate VEC pairs (i, i + half) of q or k of one head (k also to the cache)
//     [.., + H (D - R)/VEC)             copy the unrotated tail of k to the cache
//     [.., + H D/VEC)                   copy v to the cache
//   VEC = 16 bytes of T when pointers, strides, half and D allow it, else 1.
#include "cuda/kernel_utils.cuh"
#include "cuda/rotary_cache.h"

namespace phi_fast::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxGridY = 65535;

// N consecutive fp32 values: 16-byte loads when N is a multiple of 4 (p then 16-byte aligned), else scalar.
template <int N>
__device__ __forceinline__ void load_table(const float* p, float (&out)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int j = 0; j < N; j += 4) {
      const float4 v = *reinterpret_cast<const float4*>(p + j);
      out[j] = v.x;
      out[j + 1] = v.y;
      out[j + 2] = v.z;
      out[j + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = p[j];
  }
}

struct RotaryParams {
  int64_t token_stride, part_stride, head_stride;
  const int64_t* positions;
  const float* cos;
  const float* sin;
  const int64_t* slot_mapping;
  int64_t num_tokens;
  int num_heads, head_dim, half;
};

template <typename T, int VEC>
__global__ void rotary_cache_kernel(T* qkv, T* key_cache, T* value_cache, RotaryParams p) {
  const int u = blockIdx.x * blockDim.x + threadIdx.x;
  const int rot_per_head = p.half / VEC;
  const int tail_per_head = (p.head_dim - 2 * p.half) / VEC;
  const int row_per_head = p.head_dim / VEC;
  const int rot_units = 2 * p.num_heads * rot_per_head;
  const int tail_units = p.num_heads * tail_per_head;
  const int cache_units = key_cache != nullptr ? tail_units + p.num_heads * row_per_head : 0;
  if (u >= rot_units + cache_units) return;
  const int64_t cache_row = static_cast<int64_t>(p.num_heads) * p.head_dim;

  for (int64_t t = blockIdx.y; t < p.num_tokens; t += gridDim.y) {
    T* token = qkv + t * p.token_stride;
    const int64_t slot = key_cache != nullptr ? p.slot_mapping[t] : -1;
    if (u < rot_units) {
      const int part = u / (p.num_heads * rot_per_head);  // 0 = q, 1 = k
      const int rest = u - part * p.num_heads * rot_per_head;
      const int head = rest / rot_per_head;
      const int i = (rest - head * rot_per_head) * VEC;
      const int64_t pos = p.positions[t];
      float c[VEC], s[VEC], x1[VEC], x2[VEC], y1[VEC], y2[VEC];
      load_table<VEC>(p.cos + pos * p.half + i, c);
      load_table<VEC>(p.sin + pos * p.half + i, s);
      T* x = token + part * p.part_stride + head * p.head_stride;
      load_f32<VEC>(x + i, x1);
      load_f32<VEC>(x + i + p.half, x2);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        y1[j] = x1[j] * c[j] - x2[j] * s[j];
        y2[j] = x2[j] * c[j] + x1[j] * s[j];
      }
      store_f32<VEC>(x + i, y1);
      store_f32<VEC>(x + i + p.half, y2);
      if (part == 1 && slot >= 0) {
        T* dst = key_cache + slot * cache_row + head * p.head_dim;
        store_f32<VEC>(dst + i, y1);
        store_f32<VEC>(dst + i + p.half, y2);
      }
    } else if (slot >= 0) {
      const int w = u - rot_units;
      if (w < tail_units) {  // k dims >= R: not touched by the rotation threads
        const int head = w / tail_per_head;
        const int d = 2 * p.half + (w - head * tail_per_head) * VEC;
        copy_vec<VEC>(key_cache + slot * cache_row + head * p.head_dim + d,
                      token + p.part_stride + head * p.head_stride + d);
      } else {
        const int head = (w - tail_units) / row_per_head;
        const int d = (w - tail_units - head * row_per_head) * VEC;
        copy_vec<VEC>(value_cache + slot * cache_row + head * p.head_dim + d,
                      token + 2 * p.part_stride + head * p.head_stride + d);
      }
    }
  }
}

template <typename T, int VEC>
void launch(T* qkv, T* key_cache, T* value_cache, const RotaryParams& p, cudaStream_t stream) {
  const int64_t rot_units = 2 * static_cast<int64_t>(p.num_heads) * (p.half / VEC);
  const int64_t cache_units =
      key_cache != nullptr ? static_cast<int64_t>(p.num_heads) * ((p.head_dim - 2 * p.half) / VEC + p.head_dim / VEC)
                           : 0;
  const int64_t units = rot_units + cache_units;
  if (units == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(units, kThreads)),
                  static_cast<unsigned>(p.num_tokens < kMaxGridY ? p.num_tokens : kMaxGridY));
  launch_kernel(rotary_cache_kernel<T, VEC>, grid, kThreads, 0, stream, qkv, key_cache, value_cache, p);
}

}  // namespace

void rotary_cache(void* qkv, int64_t qkv_token_stride, int64_t qkv_part_stride, int64_t qkv_head_stride,
                  const int64_t* positions, const float* cos, const float* sin, int64_t rotary_dim,
                  void* key_cache, void* value_cache, const int64_t* slot_mapping, int64_t num_tokens,
                  int64_t num_heads, int64_t head_dim, int64_t /*page_size: rows are addressed by slot directly*/,
                  DType dtype, void* stream) {
  if (num_tokens == 0) return;
  const RotaryParams p{qkv_token_stride, qkv_part_stride, qkv_head_stride, positions,
                       cos, sin, slot_mapping, num_tokens, static_cast<int>(num_heads),
                       static_cast<int>(head_dim), static_cast<int>(rotary_dim / 2)};
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kV = kVec<T>;
    T* q = static_cast<T*>(qkv);
    T* kc = static_cast<T*>(key_cache);
    T* vc = static_cast<T*>(value_cache);
    const bool aligned = p.half % kV == 0 && head_dim % kV == 0 && qkv_token_stride % kV == 0 &&
                         qkv_part_stride % kV == 0 && qkv_head_stride % kV == 0 && is_aligned(qkv, 16) &&
                         is_aligned(cos, 16) && is_aligned(sin, 16) && is_aligned(key_cache, 16) &&
                         is_aligned(value_cache, 16);
    if (aligned) {
      launch<T, kV>(q, kc, vc, p, as_stream(stream));
    } else {
      launch<T, 1>(q, kc, vc, p, as_stream(stream));
    }
  });
}

}  // namespace phi_fast::cuda
