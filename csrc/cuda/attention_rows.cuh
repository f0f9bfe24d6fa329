// One-query-per-block attention with an online softmax, shared by paged_attention (decode and any q_len, with
// split-K) and by prefill_attention's path for fp32 or unaligned inputs. Included by attention_*.cu only.
//
// Math: for query t of head h, with keys j < ctx visible (ctx from the Keys policy) and s_j = scale q . k_j,
//   o = sum_j exp(s_j - m) v_j / sum_j exp(s_j - m),  m = max_j s_j,  all in fp32 (exp2 of log2e-scaled scores).
//   With split-K, block `split` covers keys [split * chunk, min(ctx, (split + 1) * chunk)), chunk =
//   ceil(ctx / num_splits), and writes its unnormalized o, its max m and its sum l to the workspace;
//   combine_splits_kernel (attention_paged.cu) merges them. num_splits == 1 writes the normalized o directly.
// Layouts: q [T, H, D] with strides (q_ts, q_hs, 1); key row r of head h at k + r * k_ts + h * k_hs (same for v);
//   the Keys policy maps (query, key index j) to that row r (page lookup or contiguous offset);
//   out [T, H, D] contiguous; workspace o: [T, H, num_splits, D] fp32, then ml: [T, H, num_splits, 2] fp32.
// Thread mapping: grid (T, H, num_splits), 128 threads. Keys are processed in tiles of 128:
//   phase 1: thread i owns key (tile + i): a full-row dot product with q held in fp32 registers (D / VEC loads
//     of VEC elements in flight), then a block max updates the running max m;
//   phase 2: thread (g, c), c < D / VEC, g < G = 128 / (D / VEC), accumulates VEC output dims c over the tile's
//     keys g, g + G, ... with the probabilities kept in shared memory (double-buffered: two barriers per tile).
//   At the end the G partial accumulators are summed through shared memory.
#pragma once

#include <cmath>

#include "cuda/kernel_utils.cuh"

namespace phi_fast::cuda {

constexpr int kRowThreads = 128;
constexpr int kRowWarps = kRowThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;

// The keys one query sees: `ctx` of them, key j of the sequence `seq` that starts at row `start`; seq = -1: the
// query is not this kernel's (its block exits without writing).
struct KeyRange {
  int seq;
  int ctx;
  int64_t start;
};

// Largest s in [0, num_seqs) with cu[s] <= t (the sequence owning token t; empty sequences are skipped because
// the last of equal offsets wins). Tries s = t first, the decode case with one query per sequence.
__device__ __forceinline__ int find_sequence(const int32_t* cu, int num_seqs, int64_t t) {
  if (t < num_seqs && cu[t] <= t && t < cu[t + 1]) return static_cast<int>(t);
  int lo = 0;
  int hi = num_seqs;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (cu[mid] <= t) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Paged cache: queries of sequence s are its last q_len cached positions; query i of them sees
// positions <= seq_lens[s] - q_len + i; position p lives in cache row
// block_table[s, p / page_size] * page_size + p % page_size. With single_only, only the queries of q_len-1
// sequences are this kernel's (a mixed call: the tensor-core kernel takes the others).
struct PagedKeys {
  const int32_t* block_table;
  int64_t block_table_stride;
  const int32_t* seq_lens;
  const int32_t* cu_seqlens_q;
  int num_seqs;
  int page_size;
  bool single_only;

  __device__ KeyRange locate(int64_t t) const {
    const int s = find_sequence(cu_seqlens_q, num_seqs, t);
    const int first = cu_seqlens_q[s];
    const int q_len = cu_seqlens_q[s + 1] - first;
    if (single_only && q_len != 1) return {-1, 0, 0};
    return {s, seq_lens[s] - q_len + static_cast<int>(t - first) + 1, 0};
  }

  __device__ int64_t row(const KeyRange& r, int j) const {
    const int page = block_table[r.seq * block_table_stride + j / page_size];
    return static_cast<int64_t>(page) * page_size + j % page_size;
  }
};

// Contiguous varlen sequences: sequence s owns rows cu_seqlens[s]..cu_seqlens[s+1]; causal queries see keys <= self.
struct ContiguousKeys {
  const int32_t* cu_seqlens;
  int num_seqs;
  bool causal;

  __device__ KeyRange locate(int64_t t) const {
    const int s = find_sequence(cu_seqlens, num_seqs, t);
    const int start = cu_seqlens[s];
    const int ctx = causal ? static_cast<int>(t - start) + 1 : cu_seqlens[s + 1] - start;
    return {s, ctx, start};
  }

  __device__ int64_t row(const KeyRange& r, int j) const { return r.start + j; }
};

template <typename T>
struct RowsParams {
  T* out;
  const T* q;
  int64_t q_ts, q_hs;
  const T* k;
  int64_t k_ts, k_hs;
  const T* v;
  int64_t v_ts, v_hs;
  float scale_log2;  // scale * log2(e)
  int num_splits;
  float* partial_o;   // [T, H, num_splits, D], used when num_splits > 1
  float* partial_ml;  // [T, H, num_splits, 2]
};

template <typename T, int D, int VEC, typename Keys>
__global__ void __launch_bounds__(kRowThreads) attend_rows_kernel(RowsParams<T> p, Keys keys) {
  constexpr int kNV = D / VEC;                   // vectors per row
  constexpr int kG = kRowThreads / kNV;          // key groups in phase 2
  constexpr int kIters = (kRowThreads + kG - 1) / kG;
  __shared__ float q_s[D];
  __shared__ float prob_s[2][kRowThreads];
  __shared__ int64_t row_s[2][kRowThreads];
  __shared__ float max_s[2][kRowWarps];
  __shared__ float out_s[kG * D];
  __shared__ float scratch[32];

  const int64_t t = blockIdx.x;
  const int head = blockIdx.y;
  const int num_heads = gridDim.y;
  const int split = blockIdx.z;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;

  const KeyRange range = keys.locate(t);
  if (range.seq < 0) return;  // the same for every thread of the block
  const int chunk = (range.ctx + p.num_splits - 1) / p.num_splits;
  const int k_lo = split * chunk;
  const int k_hi = min(range.ctx, k_lo + chunk);

  const T* q = p.q + t * p.q_ts + head * p.q_hs;
  for (int d = tid; d < D; d += kRowThreads) q_s[d] = to_f32(q[d]) * p.scale_log2;
  __syncthreads();
  float qr[D];
#pragma unroll
  for (int d = 0; d < D; ++d) qr[d] = q_s[d];

  const int g = tid / kNV;  // phase-2 role
  const int c = tid % kNV;
  const bool active = g < kG;
  const T* k_head = p.k + head * p.k_hs;
  const T* v_head = p.v + head * p.v_hs + c * VEC;

  float m = -INFINITY;
  float l = 0.0f;
  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;

  int buf = 0;
  for (int base = k_lo; base < k_hi; base += kRowThreads, buf ^= 1) {
    const int j = base + tid;
    float s = -INFINITY;
    if (j < k_hi) {
      const int64_t row = keys.row(range, j);
      row_s[buf][tid] = row;
      const T* kp = k_head + row * p.k_ts;
      float part[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) part[i] = 0.0f;
#pragma unroll
      for (int cc = 0; cc < kNV; ++cc) {
        float kv[VEC];
        load_f32<VEC>(kp + cc * VEC, kv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) part[i] = fmaf(qr[cc * VEC + i], kv[i], part[i]);
      }
      s = 0.0f;
#pragma unroll
      for (int i = 0; i < VEC; ++i) s += part[i];
    }
    const float wmax = warp_max(s);
    if (lane == 0) max_s[buf][warp] = wmax;
    __syncthreads();
    float tile_max = max_s[buf][0];
#pragma unroll
    for (int w = 1; w < kRowWarps; ++w) tile_max = fmaxf(tile_max, max_s[buf][w]);
    const float m_new = fmaxf(m, tile_max);  // finite: the tile has at least one key
    const float alpha = exp2f(m - m_new);
    const float prob = j < k_hi ? exp2f(s - m_new) : 0.0f;
    l = l * alpha + prob;
    prob_s[buf][tid] = prob;
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] *= alpha;
    m = m_new;
    __syncthreads();
    if (active) {
      const int n_valid = min(kRowThreads, k_hi - base);
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int kk = g + it * kG;
        if (kk < n_valid) {
          float vv[VEC];
          load_f32<VEC>(v_head + row_s[buf][kk] * p.v_ts, vv);
          const float pk = prob_s[buf][kk];
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] = fmaf(pk, vv[i], acc[i]);
        }
      }
    }
  }

  const float l_total = block_sum(l, scratch);  // starts with a barrier: phase 2 is done everywhere
  if (active) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out_s[g * D + c * VEC + i] = acc[i];
  }
  __syncthreads();
  const int64_t out_row = t * num_heads + head;
  for (int d = tid; d < D; d += kRowThreads) {
    float o = 0.0f;
#pragma unroll
    for (int gg = 0; gg < kG; ++gg) o += out_s[gg * D + d];
    if (p.num_splits == 1) {
      p.out[out_row * D + d] = from_f32<T>(l_total > 0.0f ? o / l_total : 0.0f);
    } else {
      p.partial_o[(out_row * p.num_splits + split) * D + d] = o;
    }
  }
  if (p.num_splits > 1 && tid == 0) {
    p.partial_ml[(out_row * p.num_splits + split) * 2] = m;
    p.partial_ml[(out_row * p.num_splits + split) * 2 + 1] = l_total;
  }
}

// Launches attend_rows_kernel on grid (T, H, num_splits) for head_dim 64 or 80, with 16-byte loads when q, k, v
// allow them (else scalar loads).
template <typename T, typename Keys>
void launch_attend_rows(const RowsParams<T>& p, const Keys& keys, int64_t num_tokens, int64_t num_heads,
                        int64_t head_dim, bool vec_ok, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(num_tokens), static_cast<unsigned>(num_heads),
                  static_cast<unsigned>(p.num_splits));
  constexpr int kV = kVec<T>;
  if (head_dim == 64) {
    if (vec_ok) {
      launch_kernel(attend_rows_kernel<T, 64, kV, Keys>, grid, kRowThreads, 0, stream, p, keys);
    } else {
      launch_kernel(attend_rows_kernel<T, 64, 1, Keys>, grid, kRowThreads, 0, stream, p, keys);
    }
  } else if (head_dim == 80) {
    if (vec_ok) {
      launch_kernel(attend_rows_kernel<T, 80, kV, Keys>, grid, kRowThreads, 0, stream, p, keys);
    } else {
      launch_kernel(attend_rows_kernel<T, 80, 1, Keys>, grid, kRowThreads, 0, stream, p, keys);
    }
  } else {
    throw std::invalid_argument("phi_fast CUDA attention: unsupported head_dim " + std::to_string(head_dim) +
                                " (supported: 64, 80)");
  }
}

// 16-byte loads of q, k, v rows need 16-byte aligned bases and strides that are multiples of kVec<T>.
template <typename T>
bool rows_vec_ok(const void* q, int64_t q_ts, int64_t q_hs, const void* k, int64_t k_ts, int64_t k_hs,
                 const void* v, int64_t v_ts, int64_t v_hs) {
  constexpr int kV = kVec<T>;
  return is_aligned(q, 16) && is_aligned(k, 16) && is_aligned(v, 16) && q_ts % kV == 0 && q_hs % kV == 0 &&
         k_ts % kV == 0 && k_hs % kV == 0 && v_ts % kV == 0 && v_hs % kV == 0;
}

}  // namespace phi_fast::cuda
