// paged_attention: causal attention of new queries over the paged KV cache (decode is one query per sequence),
// flash-decoding style. Launchers declared in csrc/cuda/attention.h; the attention kernel itself is
// attend_rows_kernel (csrc/cuda/attention_rows.cuh) with the PagedKeys policy.
// A call with query chunks (q_len >= 2; only possible when T > S) also launches the tensor-core flash kernel
// of csrc/cuda/attention_prefill.cu for them, after the rows kernel, which then takes only the q_len-1 queries
// (a mixed step: decode rows + prompt chunks over cached prefixes). fp32 or unaligned inputs keep every query on
// the rows kernel.
//
// Split-K: when T * H blocks do not fill the GPU, each query's keys are cut into num_splits chunks handled by
// separate blocks, whose partial (o, m, l) go to the caller's workspace; combine_splits_kernel then computes
//   M = max_i m_i,  L = sum_i l_i 2^(m_i - M),  out = sum_i o_i 2^(m_i - M) / L
// (m_i are maxima of log2e-scaled scores; an empty chunk has m = -inf, l = 0 and adds nothing).
// num_splits depends only on host-known sizes (T, H, max_pages_per_seq * page_size, SM count), never on device
// data, so the launch is CUDA-graph capturable; the workspace is [T, H, num_splits, D] + [T, H, num_splits, 2]
// fp32. Thread mapping of the combine: one block per (t, h), thread d < D owns output dim d.
#include "cuda/attention.h"
#include "cuda/attention_rows.cuh"

namespace phi_fast::cuda {
namespace {

constexpr int kMaxSplits = 16;        // upper bound of the split count
constexpr int kMinKeysPerSplit = 64;  // below this a split costs more than it saves
constexpr int kBlocksPerSm = 2;       // split until T * H * num_splits reaches this many blocks per SM
constexpr int kMaxSmsAssumed = 256;   // workspace sizing without a device: any GPU has at most this many SMs

// Split count for these sizes on a GPU with `sms` SMs (1 = no split).
int64_t num_splits_for(int64_t num_tokens, int64_t num_heads, int64_t max_context, int64_t sms) {
  const int64_t rows = num_tokens * num_heads;
  if (rows == 0) return 1;
  int64_t splits = ceil_div(kBlocksPerSm * sms, rows);
  splits = splits < ceil_div(max_context, kMinKeysPerSplit) ? splits : ceil_div(max_context, kMinKeysPerSplit);
  splits = splits < kMaxSplits ? splits : kMaxSplits;
  return splits > 1 ? splits : 1;
}

int64_t split_bytes(int64_t num_tokens, int64_t num_heads, int64_t head_dim, int64_t splits) {
  return num_tokens * num_heads * splits * (head_dim + 2) * static_cast<int64_t>(sizeof(float));
}

template <typename T>
__global__ void combine_splits_kernel(T* __restrict__ out, const float* __restrict__ partial_o,
                                      const float* __restrict__ partial_ml, int num_splits, int head_dim,
                                      int num_heads, PagedKeys keys) {
  const int64_t row = blockIdx.x;  // t * H + h
  const int d = threadIdx.x;
  if (d >= head_dim) return;
  if (keys.single_only && keys.locate(row / num_heads).seq < 0) return;  // a row of the tensor-core kernel
  const float* ml = partial_ml + row * num_splits * 2;
  float m_max = -INFINITY;
  for (int i = 0; i < num_splits; ++i) m_max = fmaxf(m_max, ml[2 * i]);
  float sum = 0.0f;
  float o = 0.0f;
  for (int i = 0; i < num_splits; ++i) {
    if (ml[2 * i + 1] > 0.0f) {
      const float w = exp2f(ml[2 * i] - m_max);
      sum += ml[2 * i + 1] * w;
      o += partial_o[(row * num_splits + i) * head_dim + d] * w;
    }
  }
  out[row * head_dim + d] = from_f32<T>(sum > 0.0f ? o / sum : 0.0f);
}

}  // namespace

int64_t paged_attention_workspace_bytes(int64_t /*num_seqs*/, int64_t num_tokens, int64_t num_heads, int64_t head_dim,
                                        int64_t page_size, int64_t max_pages_per_seq) {
  const int64_t splits = num_splits_for(num_tokens, num_heads, page_size * max_pages_per_seq, kMaxSmsAssumed);
  return splits > 1 ? split_bytes(num_tokens, num_heads, head_dim, splits) : 0;
}

void paged_attention(void* out, const void* q, int64_t q_token_stride, int64_t q_head_stride,
                     const void* key_cache, const void* value_cache, const int32_t* block_table,
                     int64_t block_table_stride, const int32_t* seq_lens, const int32_t* cu_seqlens_q,
                     int64_t num_seqs, int64_t num_tokens, int64_t num_heads, int64_t head_dim, int64_t page_size,
                     int64_t max_pages_per_seq, float scale, DType dtype, void* workspace,
                     int64_t workspace_bytes, void* stream) {
  if (num_tokens == 0 || num_heads == 0) return;
  int64_t splits = num_splits_for(num_tokens, num_heads, page_size * max_pages_per_seq, sm_count());
  while (splits > 1 && (workspace == nullptr ||
                        split_bytes(num_tokens, num_heads, head_dim, splits) > workspace_bytes)) {
    --splits;  // a smaller workspace than paged_attention_workspace_bytes asked for: split less
  }
  const cudaStream_t s = as_stream(stream);
  // Query chunks (q_len >= 2) go to the tensor-core kernel when the dtype and alignment allow it. Only a call
  // with more tokens than sequences can hold one: decode-only calls (T == S) launch exactly what they always did.
  const bool chunks = num_tokens > num_seqs &&
                      paged_prefill_supported(out, q, q_token_stride, q_head_stride, key_cache, value_cache, dtype);
  const int64_t cache_row = num_heads * head_dim;  // a cache row (one slot) is [H, D]
  const PagedKeys keys{block_table, block_table_stride, seq_lens, cu_seqlens_q, static_cast<int>(num_seqs),
                       static_cast<int>(page_size), chunks};
  float* partial_o = splits > 1 ? static_cast<float*>(workspace) : nullptr;
  float* partial_ml = splits > 1 ? partial_o + num_tokens * num_heads * splits * head_dim : nullptr;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const RowsParams<T> p{static_cast<T*>(out),
                          static_cast<const T*>(q),
                          q_token_stride,
                          q_head_stride,
                          static_cast<const T*>(key_cache),
                          cache_row,
                          head_dim,
                          static_cast<const T*>(value_cache),
                          cache_row,
                          head_dim,
                          scale * kLog2e,
                          static_cast<int>(splits),
                          partial_o,
                          partial_ml};
    const bool vec_ok = rows_vec_ok<T>(q, q_token_stride, q_head_stride, key_cache, cache_row, head_dim,
                                       value_cache, cache_row, head_dim);
    launch_attend_rows<T>(p, keys, num_tokens, num_heads, head_dim, vec_ok, s);
    if (splits > 1) {
      launch_kernel(combine_splits_kernel<T>, static_cast<unsigned>(num_tokens * num_heads), 128, 0, s,
                    static_cast<T*>(out), partial_o, partial_ml, static_cast<int>(splits),
                    static_cast<int>(head_dim), static_cast<int>(num_heads), keys);
    }
  });
  if (chunks) {
    paged_prefill_attention(out, q, q_token_stride, q_head_stride, key_cache, value_cache, block_table,
                            block_table_stride, seq_lens, cu_seqlens_q, num_seqs, num_tokens, num_heads, head_dim,
                            page_size, scale, dtype, stream);
  }
}

}  // namespace phi_fast::cuda
