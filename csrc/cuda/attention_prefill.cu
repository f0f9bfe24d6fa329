// Tensor-core flash attention with queries in tiles of BLOCK_M, for prefill_attention (contiguous varlen
// sequences, no cache; causal for Phi-2, bidirectional for CLIP) and for the query chunks (q_len >= 2) of
// paged_attention (causal over the paged KV cache: a cached prefix of any length, then the chunk's own keys,
// which rotary_cache already wrote). head_dim 64 or 80; bf16/fp16. Launchers declared in csrc/cuda/attention.h.
//
// Math (FlashAttention-2 forward): for a tile of BLOCK_M queries and each tile of BLOCK_N keys of its sequence,
//   S = (Q K^T) * scale * log2(e)  (bf16/fp16 tensor-core MMA with fp32 accumulation; the scale is applied to the
//   fp32 scores, so fp16 inputs never overflow), masked to -inf for keys past the context end and, when causal,
//   for keys after the query;  m' = max(m, rowmax S);  P = 2^(S - m');  l = l 2^(m - m') + rowsum P;
//   O = O 2^(m - m') + P V  (P rounded to the input type for the MMA, O in fp32);  finally out = O / l.
//   A sequence has q_len queries over ctx keys; its query i sits at key position offset + i, offset = ctx - q_len
//   (contiguous: ctx = q_len, offset 0; paged: ctx = seq_lens[s]), and when causal sees keys <= offset + i.
// Layouts: q [T, H, D] with strides (token, head, 1); out [T, H, D] contiguous. Contiguous K/V: k, v [T, H, D]
//   with strides (token, head, 1), sequence s owning rows cu_seqlens[s]..cu_seqlens[s+1]. Paged K/V: caches
//   [num_pages, page_size, H, D] contiguous, key position p of sequence s in row p % page_size of page
//   block_table[s, p / page_size]; every 16-byte chunk of a K/V tile looks its page up (an L1-resident int), so
//   a tile of 64 keys gathers 4 pages of 16 (or 2 of 32) and is otherwise the contiguous tile.
// Thread mapping: grid (H, ceil(T / BLOCK_M) + S), 4 warps, BLOCK_M = 64 (16 query rows per warp), BLOCK_N = 64.
//   Block (h, y) takes query tile number (gridDim.y - 1 - y) of the concatenated per-sequence tile lists (warp 0
//   finds its sequence with a prefix sum over cu_seqlens; surplus blocks exit; paged sequences with q_len 1 have
//   no tiles here: paged_attention gives them to attend_rows_kernel): heads vary fastest in launch order and
//   tiles go from last to first, so the heaviest causal tiles of every head start first.
//   Q, K, V tiles are staged in shared memory by cp.async (16 bytes, zero-filled past the sequence end) with rows
//   padded to D + 8 elements (conflict-free ldmatrix); V(j) loads while S = Q K(j)^T is computed and K(j+1)
//   loads while P V(j) is. Each warp keeps its Q fragments (D / 16 k-steps, ldmatrix.x4), S (BLOCK_N / 8
//   n-tiles of m16n8) and O (D / 8 n-tiles) in registers: mma.sync.m16n8k16, K fragments by ldmatrix.x4, V by
//   ldmatrix.x4.trans, and P reused in registers as the A operand of P V. The head dim is the MMA k-dim of Q K^T
//   (80 = 5 k-steps of 16: no padding) and the n-dim of P V (80 = 10 n-tiles of 8).
// fp32 inputs, and 16-bit inputs whose pointers or strides are not 16-byte aligned, take attend_rows_kernel
// (csrc/cuda/attention_rows.cuh, no tensor cores) with the ContiguousKeys policy (prefill_attention) or the whole
// call stays on it (paged_attention, csrc/cuda/attention_paged.cu).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "cuda/attention.h"
#include "cuda/attention_rows.cuh"
#include "cuda/ptx.cuh"

namespace phi_fast::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockM = 16 * kWarps;
constexpr int kBlockN = 64;

// Two fp32 values as one register of 2 x T (x in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y);

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float x, float y) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float x, float y) {
  const __half2 h = __floats2half2_rn(x, y);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// ---- kernel ------------------------------------------------------------------------------------------------

struct FlashParams {
  void* out;
  const void* q;
  const void* k;  // contiguous: [T, H, D]; paged: key_cache [num_pages, page_size, H, D]
  const void* v;
  int64_t q_ts, q_hs, k_ts, k_hs, v_ts, v_hs;
  const int32_t* cu_seqlens;  // [S + 1], query rows of each sequence
  int num_seqs;
  float scale_log2;
  bool causal;
  // paged only
  const int32_t* block_table;  // [S, max_pages] with row stride block_table_stride
  int64_t block_table_stride;
  const int32_t* seq_lens;  // [S], the context length ctx of each sequence
  int page_size;
};

// Query tiles of a sequence with q_len queries: paged sequences with one query belong to attend_rows_kernel.
template <bool Paged>
__device__ __forceinline__ int tiles_of(int q_len) {
  return Paged && q_len < 2 ? 0 : (q_len + kBlockM - 1) / kBlockM;
}

// Sequence and query-tile index of tile number `tile` in the concatenation of every sequence's tiles_of(len)
// tiles; computed by warp 0 (the calling lanes), seq = -1 when past the last tile.
template <bool Paged>
__device__ __forceinline__ void find_tile(const int32_t* cu, int num_seqs, int tile, int& seq, int& q_tile) {
  const int lane = threadIdx.x % 32;
  int before = 0;  // tiles of the sequences already scanned
  seq = -1;
  q_tile = 0;
  for (int s0 = 0; s0 < num_seqs; s0 += 32) {
    const int s = s0 + lane;
    const int n = s < num_seqs ? tiles_of<Paged>(cu[s + 1] - cu[s]) : 0;
    int incl = n;  // inclusive prefix sum over the warp
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int other = __shfl_up_sync(0xffffffffu, incl, off);
      if (lane >= off) incl += other;
    }
    const bool hit = tile >= before + incl - n && tile < before + incl;
    const unsigned mask = __ballot_sync(0xffffffffu, hit);
    if (mask != 0) {
      const int src = __ffs(mask) - 1;
      seq = s0 + src;
      q_tile = tile - before - __shfl_sync(0xffffffffu, incl - n, src);
      return;
    }
    before += __shfl_sync(0xffffffffu, incl, 31);
  }
}

template <typename T, int D, bool Paged>
__global__ void __launch_bounds__(kThreads) flash_attention_kernel(FlashParams p) {
  constexpr int kStride = D + 8;  // smem row stride (elements): 16-byte rows, ldmatrix without bank conflicts
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kKSteps = D / 16;
  constexpr int kNTiles = kBlockN / 8;
  constexpr int kDTiles = D / 8;
  __shared__ alignas(16) T q_s[kBlockM * kStride];
  __shared__ alignas(16) T k_s[kBlockN * kStride];
  __shared__ alignas(16) T v_s[kBlockN * kStride];
  __shared__ int tile_info[2];

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int head = blockIdx.x;
  const int num_heads = gridDim.x;

  if (warp == 0) {
    int seq, q_tile;
    find_tile<Paged>(p.cu_seqlens, p.num_seqs, static_cast<int>(gridDim.y - 1 - blockIdx.y), seq, q_tile);
    if (lane == 0) {
      tile_info[0] = seq;
      tile_info[1] = q_tile;
    }
  }
  __syncthreads();
  const int seq = tile_info[0];
  if (seq < 0) return;
  const int start = p.cu_seqlens[seq];
  const int q_len = p.cu_seqlens[seq + 1] - start;
  const int ctx = Paged ? p.seq_lens[seq] : q_len;  // keys of the sequence
  const int offset = p.causal ? ctx - q_len : 0;    // key position of query 0 (causal masking only)
  const int q0 = tile_info[1] * kBlockM;
  const int kv_end = p.causal ? min(ctx, offset + q0 + kBlockM) : ctx;
  const int num_kv_tiles = (kv_end + kBlockN - 1) / kBlockN;

  const T* q = static_cast<const T*>(p.q) + static_cast<int64_t>(start) * p.q_ts + head * p.q_hs;
  const int64_t kv_first = Paged ? 0 : start;  // contiguous K/V rows of this sequence start with its queries'
  const T* k = static_cast<const T*>(p.k) + kv_first * p.k_ts + head * p.k_hs;
  const T* v = static_cast<const T*>(p.v) + kv_first * p.v_ts + head * p.v_hs;
  const int32_t* pages = Paged ? p.block_table + seq * p.block_table_stride : nullptr;

  // rows [row0, row0 + rows) of a [len, D] operand (row r at src + row_of(r) * ts) -> smem tile, zero past len
  const auto load_tile = [&](T* dst, const T* src, int64_t ts, int row0, int rows, int len, auto row_of) {
    for (int i = tid; i < rows * kChunks; i += kThreads) {
      const int r = i / kChunks;
      const int ch = i - r * kChunks;
      const bool valid = row0 + r < len;
      cp_async_16(dst + r * kStride + ch * 8, valid ? src + row_of(row0 + r) * ts + ch * 8 : src, valid);
    }
  };
  const auto same_row = [](int r) { return static_cast<int64_t>(r); };
  // cache row of key position r (paged) or row r of the sequence (contiguous)
  const auto key_row = [&](int r) {
    if constexpr (Paged) {
      return static_cast<int64_t>(__ldg(pages + r / p.page_size)) * p.page_size + r % p.page_size;
    } else {
      return static_cast<int64_t>(r);
    }
  };
  const auto load_q = [&] { load_tile(q_s, q, p.q_ts, q0, kBlockM, q_len, same_row); };
  const auto load_k = [&](int k0) { load_tile(k_s, k, p.k_ts, k0, kBlockN, ctx, key_row); };
  const auto load_v = [&](int k0) { load_tile(v_s, v, p.v_ts, k0, kBlockN, ctx, key_row); };

  load_q();
  cp_async_commit();
  load_k(0);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  // ldmatrix.x4 lane roles: matrix mi = lane / 8 supplies row (lane % 8) of its 8x8 block
  const int mi = lane / 8;
  const int mr = lane % 8;
  uint32_t q_frag[kKSteps][4];
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk) {
    ldmatrix_x4(q_frag[kk], q_s + (warp * 16 + mr + (mi % 2) * 8) * kStride + kk * 16 + (mi / 2) * 8);
  }

  const int g = lane / 4;  // accumulator row (and row + 8)
  const int tq = lane % 4;  // accumulator column pair 2 tq, 2 tq + 1
  const int row_a = offset + q0 + warp * 16 + g;  // key position of the queries in accumulator rows g, g + 8
  const int row_b = row_a + 8;
  float o[kDTiles][4];
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
  float m_a = -INFINITY, m_b = -INFINITY;
  float l_a = 0.0f, l_b = 0.0f;

  for (int j = 0; j < num_kv_tiles; ++j) {
    const int k0 = j * kBlockN;
    load_v(k0);
    cp_async_commit();

    float s[kNTiles][4];
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, k_s + (np * 16 + mr + (mi / 2) * 8) * kStride + kk * 16 + (mi % 2) * 8);
        mma_16816<T>(s[2 * np], q_frag[kk], b[0], b[1]);
        mma_16816<T>(s[2 * np + 1], q_frag[kk], b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with k_s
    if (j + 1 < num_kv_tiles) load_k(k0 + kBlockN);
    cp_async_commit();

    // scale, mask, online softmax (rows a = g, b = g + 8 of this warp; a row's 64 scores sit in its quad)
    const bool need_mask = k0 + kBlockN > ctx || (p.causal && k0 + kBlockN - 1 > offset + q0);
    float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * p.scale_log2;
        if (need_mask) {
          const int key = k0 + nt * 8 + 2 * tq + (e % 2);
          const int row = e < 2 ? row_a : row_b;
          if (key >= ctx || (p.causal && key > row)) x = -INFINITY;
        }
        s[nt][e] = x;
      }
      mx_a = fmaxf(mx_a, fmaxf(s[nt][0], s[nt][1]));
      mx_b = fmaxf(mx_b, fmaxf(s[nt][2], s[nt][3]));
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, off));
      mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, off));
    }
    const float mn_a = fmaxf(m_a, mx_a);
    const float mn_b = fmaxf(m_b, mx_b);
    const float base_a = mn_a == -INFINITY ? 0.0f : mn_a;  // a row with no key yet keeps p = 0
    const float base_b = mn_b == -INFINITY ? 0.0f : mn_b;
    const float alpha_a = exp2f(m_a - base_a);
    const float alpha_b = exp2f(m_b - base_b);
    m_a = mn_a;
    m_b = mn_b;
    float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      s[nt][0] = exp2f(s[nt][0] - base_a);
      s[nt][1] = exp2f(s[nt][1] - base_a);
      s[nt][2] = exp2f(s[nt][2] - base_b);
      s[nt][3] = exp2f(s[nt][3] - base_b);
      sum_a += s[nt][0] + s[nt][1];
      sum_b += s[nt][2] + s[nt][3];
    }
    l_a = l_a * alpha_a + sum_a;
    l_b = l_b * alpha_b + sum_b;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      o[dt][0] *= alpha_a;
      o[dt][1] *= alpha_a;
      o[dt][2] *= alpha_b;
      o[dt][3] *= alpha_b;
    }
    uint32_t p_frag[kBlockN / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      p_frag[kk][0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      p_frag[kk][1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      p_frag[kk][2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      p_frag[kk][3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }

    cp_async_wait<1>();  // V(j) has landed (K(j+1) may still be in flight)
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
#pragma unroll
      for (int dp = 0; dp < kDTiles / 2; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, v_s + (kk * 16 + mr + (mi % 2) * 8) * kStride + dp * 16 + (mi / 2) * 8);
        mma_16816<T>(o[2 * dp], p_frag[kk], b[0], b[1]);
        mma_16816<T>(o[2 * dp + 1], p_frag[kk], b[2], b[3]);
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // K(j+1) visible; every warp is done with v_s
  }

  // normalize, stage this warp's 16 rows in q_s (its Q fragments are in registers), store 16-byte chunks
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    l_a += __shfl_xor_sync(0xffffffffu, l_a, off);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, off);
  }
  const float inv_a = l_a > 0.0f ? 1.0f / l_a : 0.0f;
  const float inv_b = l_b > 0.0f ? 1.0f / l_b : 0.0f;
  T* stage = q_s + warp * 16 * kStride;
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt) {
    *reinterpret_cast<uint32_t*>(stage + g * kStride + dt * 8 + 2 * tq) = pack2<T>(o[dt][0] * inv_a, o[dt][1] * inv_a);
    *reinterpret_cast<uint32_t*>(stage + (g + 8) * kStride + dt * 8 + 2 * tq) =
        pack2<T>(o[dt][2] * inv_b, o[dt][3] * inv_b);
  }
  __syncwarp();
  T* out = static_cast<T*>(p.out) + (static_cast<int64_t>(start) * num_heads + head) * D;
  for (int i = lane; i < 16 * kChunks; i += 32) {
    const int r = i / kChunks;
    const int ch = i - r * kChunks;
    const int row = q0 + warp * 16 + r;
    if (row < q_len) {
      copy_vec<8>(out + static_cast<int64_t>(row) * num_heads * D + ch * 8, stage + r * kStride + ch * 8);
    }
  }
}

template <typename T, bool Paged>
void launch_flash(const FlashParams& p, int64_t num_tokens, int64_t num_seqs, int64_t num_heads, int64_t head_dim,
                  cudaStream_t stream) {
  const char* op = Paged ? "paged_attention" : "prefill_attention";
  const int64_t tiles = ceil_div(num_tokens, kBlockM) + num_seqs;
  if (tiles > 65535) {  // gridDim.y limit
    throw std::invalid_argument(std::string("phi_fast CUDA ") + op + ": " + std::to_string(num_tokens) +
                                " tokens in " + std::to_string(num_seqs) + " sequences exceed one launch (at " +
                                "most 65535 query tiles of " + std::to_string(kBlockM) + "); split the batch");
  }
  const dim3 grid(static_cast<unsigned>(num_heads), static_cast<unsigned>(tiles));
  if (head_dim == 64) {
    launch_kernel(flash_attention_kernel<T, 64, Paged>, grid, kThreads, 0, stream, p);
  } else if (head_dim == 80) {
    launch_kernel(flash_attention_kernel<T, 80, Paged>, grid, kThreads, 0, stream, p);
  } else {
    throw std::invalid_argument(std::string("phi_fast CUDA ") + op + ": unsupported head_dim " +
                                std::to_string(head_dim) + " (supported: 64, 80)");
  }
}

}  // namespace

void prefill_attention(void* out, const void* q, int64_t q_token_stride, int64_t q_head_stride, const void* k,
                       int64_t k_token_stride, int64_t k_head_stride, const void* v, int64_t v_token_stride,
                       int64_t v_head_stride, const int32_t* cu_seqlens, int64_t num_seqs, int64_t num_tokens,
                       int64_t num_heads, int64_t head_dim, float scale, bool causal, DType dtype, void* stream) {
  if (num_tokens == 0 || num_heads == 0) return;
  const cudaStream_t s = as_stream(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec_ok = rows_vec_ok<T>(q, q_token_stride, q_head_stride, k, k_token_stride, k_head_stride, v,
                                       v_token_stride, v_head_stride);
    if constexpr (!std::is_same_v<T, float>) {
      if (vec_ok && is_aligned(out, 16)) {
        FlashParams p{};
        p.out = out;
        p.q = q;
        p.k = k;
        p.v = v;
        p.q_ts = q_token_stride;
        p.q_hs = q_head_stride;
        p.k_ts = k_token_stride;
        p.k_hs = k_head_stride;
        p.v_ts = v_token_stride;
        p.v_hs = v_head_stride;
        p.cu_seqlens = cu_seqlens;
        p.num_seqs = static_cast<int>(num_seqs);
        p.scale_log2 = scale * kLog2e;
        p.causal = causal;
        launch_flash<T, false>(p, num_tokens, num_seqs, num_heads, head_dim, s);
        return;
      }
    }
    const RowsParams<T> p{static_cast<T*>(out), static_cast<const T*>(q), q_token_stride, q_head_stride,
                          static_cast<const T*>(k), k_token_stride, k_head_stride, static_cast<const T*>(v),
                          v_token_stride, v_head_stride, scale * kLog2e, 1, nullptr, nullptr};
    const ContiguousKeys keys{cu_seqlens, static_cast<int>(num_seqs), causal};
    launch_attend_rows<T>(p, keys, num_tokens, num_heads, head_dim, vec_ok, s);
  });
}

bool paged_prefill_supported(const void* out, const void* q, int64_t q_token_stride, int64_t q_head_stride,
                             const void* key_cache, const void* value_cache, DType dtype) {
  if (dtype == DType::f32) return false;
  return is_aligned(out, 16) && is_aligned(q, 16) && is_aligned(key_cache, 16) && is_aligned(value_cache, 16) &&
         q_token_stride % 8 == 0 && q_head_stride % 8 == 0;
}

void paged_prefill_attention(void* out, const void* q, int64_t q_token_stride, int64_t q_head_stride,
                             const void* key_cache, const void* value_cache, const int32_t* block_table,
                             int64_t block_table_stride, const int32_t* seq_lens, const int32_t* cu_seqlens_q,
                             int64_t num_seqs, int64_t num_tokens, int64_t num_heads, int64_t head_dim,
                             int64_t page_size, float scale, DType dtype, void* stream) {
  if (num_tokens == 0 || num_heads == 0) return;
  if (!paged_prefill_supported(out, q, q_token_stride, q_head_stride, key_cache, value_cache, dtype)) {
    throw std::invalid_argument("phi_fast CUDA paged_attention: the tensor-core path needs 16-bit inputs with "
                                "16-byte aligned rows (paged_prefill_supported)");
  }
  FlashParams p{};
  p.out = out;
  p.q = q;
  p.k = key_cache;
  p.v = value_cache;
  p.q_ts = q_token_stride;
  p.q_hs = q_head_stride;
  p.k_ts = p.v_ts = num_heads * head_dim;  // a cache row (one slot) is [H, D]
  p.k_hs = p.v_hs = head_dim;
  p.cu_seqlens = cu_seqlens_q;
  p.num_seqs = static_cast<int>(num_seqs);
  p.scale_log2 = scale * kLog2e;
  p.causal = true;
  p.block_table = block_table;
  p.block_table_stride = block_table_stride;
  p.seq_lens = seq_lens;
  p.page_size = static_cast<int>(page_size);
  const cudaStream_t s = as_stream(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) launch_flash<T, true>(p, num_tokens, num_seqs, num_heads, head_dim, s);
  });
}

}  // namespace phi_fast::cuda
