// CPU kernels of the attention family: prefill_attention (varlen, causal or not, K/V contiguous) and
// paged_attention (new queries over a paged KV cache; decode is one query per sequence).
//
// Math, per query q_i and head: o_i = sum_j p_ij v_j / sum_j p_ij, p_ij = exp(scale * q_i . k_j - m_i), over
// the keys j the query sees (all of its sequence; j <= i when causal; for paged, cached positions
// <= seq_len - q_len + i). Computed as an online softmax over chunks of keys (flash-attention's recurrence):
// per chunk, m' = max(m, max_j s_ij), acc = acc * exp(m - m') + sum_j exp(s_ij - m') v_j, l likewise;
// o = acc / l at the end. fp32 throughout; fp16/bf16 q, k, v are widened chunk by chunk.
// Layouts: q, k, v [T, H, D] with element strides (token, head, 1); caches [num_pages, page_size, H, D]
// contiguous, so a page holds page_size key rows of one head at stride H * D; out [T, H, D] contiguous.
// Threads: one task per (sequence, block of kQueryBlock queries, head), OpenMP dynamic schedule (causal
// blocks differ in cost). A task keeps its queries, accumulators and the current K/V chunk (<= 64 rows)
// in per-thread buffers; the dot products and the p * v updates run over D unit-stride and vectorize.
#include "cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/kernel_utils.h"

namespace phi_fast::cpu {
namespace {

constexpr int64_t kQueryBlock = 32;  // queries sharing each K/V chunk in one task
constexpr int64_t kKeyChunk = 64;    // keys per online-softmax step in prefill (paged steps one page)

// One unit of work: queries [first_query, first_query + num_queries) of `seq`, head `head`.
struct Task {
  int64_t seq, first_query, num_queries, head;
};

// Per-thread online-softmax state of up to kQueryBlock queries and the scratch of one K/V chunk.
struct QueryBlockState {
  std::vector<float> q, acc, max, sum, scores, key_rows, value_rows;
  QueryBlockState(int64_t head_dim, int64_t chunk)
      : q(kQueryBlock * head_dim), acc(kQueryBlock * head_dim), max(kQueryBlock), sum(kQueryBlock),
        scores(chunk), key_rows(chunk * head_dim), value_rows(chunk * head_dim) {}

  // Loads num_queries query rows (fp32) and clears the accumulators.
  template <typename T>
  void start(const T* q_src, int64_t q_token_stride, int64_t num_queries, int64_t head_dim) {
    for (int64_t i = 0; i < num_queries; ++i) load_row(q.data() + i * head_dim, q_src + i * q_token_stride, head_dim);
    std::fill(acc.begin(), acc.begin() + num_queries * head_dim, 0.0f);
    std::fill(max.begin(), max.begin() + num_queries, -std::numeric_limits<float>::infinity());
    std::fill(sum.begin(), sum.begin() + num_queries, 0.0f);
  }

  // Writes o_i = acc_i / l_i to out rows (stride out_token_stride).
  template <typename T>
  void finish(T* out, int64_t out_token_stride, int64_t num_queries, int64_t head_dim) const {
    for (int64_t i = 0; i < num_queries; ++i) {
      const float inv = 1.0f / sum[i];
      const float* a = acc.data() + i * head_dim;
      T* o = out + i * out_token_stride;
      for (int64_t c = 0; c < head_dim; ++c) o[c] = from_float<T>(a[c] * inv);
    }
  }

  // Folds keys key0 .. key0 + n - 1 (fp32 rows at k + j * k_stride, v + j * v_stride) into the state.
  // Query i sees keys with index <= first_limit + i when causal, all keys otherwise.
  void attend_chunk(int64_t num_queries, int64_t head_dim, float scale, const float* __restrict k, int64_t k_stride,
                    const float* __restrict v, int64_t v_stride, int64_t key0, int64_t n, bool causal,
                    int64_t first_limit) {
    float* __restrict s = scores.data();
    for (int64_t i = 0; i < num_queries; ++i) {
      const int64_t visible = causal ? std::min(n, first_limit + i - key0 + 1) : n;
      if (visible <= 0) continue;
      const float* __restrict qi = q.data() + i * head_dim;
      float chunk_max = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < visible; ++j) {
        const float* __restrict kj = k + j * k_stride;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < head_dim; ++c) dot += qi[c] * kj[c];
        s[j] = dot * scale;
        chunk_max = std::max(chunk_max, s[j]);
      }
      const float new_max = std::max(max[i], chunk_max);
      if (new_max == -std::numeric_limits<float>::infinity()) continue;  // every score so far is -inf
      const float rescale = exp_f32(max[i] - new_max);
      float chunk_sum = 0.0f;
#pragma omp simd reduction(+ : chunk_sum)
      for (int64_t j = 0; j < visible; ++j) {
        s[j] = exp_f32(s[j] - new_max);
        chunk_sum += s[j];
      }
      max[i] = new_max;
      sum[i] = sum[i] * rescale + chunk_sum;
      float* __restrict a = acc.data() + i * head_dim;
      if (rescale != 1.0f) {
        for (int64_t c = 0; c < head_dim; ++c) a[c] *= rescale;
      }
      for (int64_t j = 0; j < visible; ++j) {
        const float p = s[j];
        const float* __restrict vj = v + j * v_stride;
        for (int64_t c = 0; c < head_dim; ++c) a[c] += p * vj[c];
      }
    }
  }
};

// n rows of head_dim values at src (row stride `stride`) as fp32: in place for float, else widened into dst.
template <typename T>
inline const float* chunk_as_float(const T* src, int64_t stride, int64_t n, int64_t head_dim, float* dst,
                                   int64_t* float_stride) {
  if constexpr (std::is_same_v<T, float>) {
    *float_stride = stride;
    return src;
  } else {
    for (int64_t j = 0; j < n; ++j) load_row(dst + j * head_dim, src + j * stride, head_dim);
    *float_stride = head_dim;
    return dst;
  }
}

// Tasks of sequences whose queries are token ranges [query_bounds[s], query_bounds[s + 1]).
std::vector<Task> make_tasks(const int32_t* query_bounds, int64_t num_seqs, int64_t num_heads) {
  std::vector<Task> tasks;
  for (int64_t s = 0; s < num_seqs; ++s) {
    for (int64_t q0 = query_bounds[s]; q0 < query_bounds[s + 1]; q0 += kQueryBlock) {
      const int64_t nq = std::min<int64_t>(kQueryBlock, query_bounds[s + 1] - q0);
      for (int64_t h = 0; h < num_heads; ++h) tasks.push_back({s, q0, nq, h});
    }
  }
  return tasks;
}

template <typename T>
void prefill_attention_kernel(T* out, const T* q, int64_t q_ts, int64_t q_hs, const T* k, int64_t k_ts,
                              int64_t k_hs, const T* v, int64_t v_ts, int64_t v_hs, const int32_t* cu_seqlens,
                              int64_t num_seqs, int64_t num_heads, int64_t head_dim, float scale, bool causal) {
  const std::vector<Task> tasks = make_tasks(cu_seqlens, num_seqs, num_heads);
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
#pragma omp parallel if (num_tasks > 1)
  {
    QueryBlockState state(head_dim, kKeyChunk);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < num_tasks; ++t) {
      const Task& task = tasks[t];
      const int64_t seq_start = cu_seqlens[task.seq], h = task.head;
      const int64_t first = task.first_query - seq_start;  // index of the block's first query in its sequence
      const int64_t key_end = causal ? first + task.num_queries : cu_seqlens[task.seq + 1] - seq_start;
      state.start(q + task.first_query * q_ts + h * q_hs, q_ts, task.num_queries, head_dim);
      for (int64_t key0 = 0; key0 < key_end; key0 += kKeyChunk) {
        const int64_t n = std::min(kKeyChunk, key_end - key0);
        int64_t ks, vs;
        const float* kf = chunk_as_float(k + (seq_start + key0) * k_ts + h * k_hs, k_ts, n, head_dim,
                                         state.key_rows.data(), &ks);
        const float* vf = chunk_as_float(v + (seq_start + key0) * v_ts + h * v_hs, v_ts, n, head_dim,
                                         state.value_rows.data(), &vs);
        state.attend_chunk(task.num_queries, head_dim, scale, kf, ks, vf, vs, key0, n, causal, first);
      }
      state.finish(out + (task.first_query * num_heads + h) * head_dim, num_heads * head_dim, task.num_queries,
                   head_dim);
    }
  }
}

template <typename T>
void paged_attention_kernel(T* out, const T* q, int64_t q_ts, int64_t q_hs, const T* key_cache,
                            const T* value_cache, const int32_t* block_table, int64_t block_table_stride,
                            const int32_t* seq_lens, const int32_t* cu_seqlens_q, int64_t num_seqs,
                            int64_t num_heads, int64_t head_dim, int64_t page_size, float scale) {
  const std::vector<Task> tasks = make_tasks(cu_seqlens_q, num_seqs, num_heads);
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  const int64_t row_stride = num_heads * head_dim;  // between consecutive tokens of one head in a page
#pragma omp parallel if (num_tasks > 1)
  {
    QueryBlockState state(head_dim, page_size);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < num_tasks; ++t) {
      const Task& task = tasks[t];
      const int64_t s = task.seq, h = task.head;
      const int64_t q_len = cu_seqlens_q[s + 1] - cu_seqlens_q[s];
      // The block's first query sits at cached position seq_len - q_len + (its index among the new queries).
      const int64_t first_limit = seq_lens[s] - q_len + (task.first_query - cu_seqlens_q[s]);
      const int64_t key_end = first_limit + task.num_queries + 1;
      const int32_t* pages = block_table + s * block_table_stride;
      state.start(q + task.first_query * q_ts + h * q_hs, q_ts, task.num_queries, head_dim);
      for (int64_t key0 = 0; key0 < key_end; key0 += page_size) {
        const int64_t n = std::min(page_size, key_end - key0);
        const int64_t page_offset = (static_cast<int64_t>(pages[key0 / page_size]) * page_size * num_heads + h) * head_dim;
        int64_t ks, vs;
        const float* kf = chunk_as_float(key_cache + page_offset, row_stride, n, head_dim, state.key_rows.data(), &ks);
        const float* vf =
            chunk_as_float(value_cache + page_offset, row_stride, n, head_dim, state.value_rows.data(), &vs);
        state.attend_chunk(task.num_queries, head_dim, scale, kf, ks, vf, vs, key0, n, true, first_limit);
      }
      state.finish(out + (task.first_query * num_heads + h) * head_dim, num_heads * head_dim, task.num_queries,
                   head_dim);
    }
  }
}

}  // namespace

void prefill_attention(void* out, const void* q, int64_t q_token_stride, int64_t q_head_stride, const void* k,
                       int64_t k_token_stride, int64_t k_head_stride, const void* v, int64_t v_token_stride,
                       int64_t v_head_stride, const int32_t* cu_seqlens, int64_t num_seqs, int64_t /*num_tokens*/,
                       int64_t num_heads, int64_t head_dim, float scale, bool causal, DType dtype) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    prefill_attention_kernel(static_cast<T*>(out), static_cast<const T*>(q), q_token_stride, q_head_stride,
                             static_cast<const T*>(k), k_token_stride, k_head_stride, static_cast<const T*>(v),
                             v_token_stride, v_head_stride, cu_seqlens, num_seqs, num_heads, head_dim, scale,
                             causal);
  });
}

void paged_attention(void* out, const void* q, int64_t q_token_stride, int64_t q_head_stride,
                     const void* key_cache, const void* value_cache, const int32_t* block_table,
                     int64_t block_table_stride, const int32_t* seq_lens, const int32_t* cu_seqlens_q,
                     int64_t num_seqs, int64_t /*num_tokens*/, int64_t num_heads, int64_t head_dim,
                     int64_t page_size, int64_t /*max_pages_per_seq*/, float scale, DType dtype) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    paged_attention_kernel(static_cast<T*>(out), static_cast<const T*>(q), q_token_stride, q_head_stride,
                           static_cast<const T*>(key_cache), static_cast<const T*>(value_cache), block_table,
                           block_table_stride, seq_lens, cu_seqlens_q, num_seqs, num_heads, head_dim, page_size,
                           scale);
  });
}

}  // namespace phi_fast::cpu
