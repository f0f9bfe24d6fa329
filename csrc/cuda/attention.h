// CUDA launchers of the attention family (kernels in csrc/cuda/attention*.cu). Declarations only;
// `stream` is a cudaStream_t passed as void*. Same math and parameters as csrc/cpu/attention.h, plus
// a scratch buffer for paged_attention's split-K partials; conventions in csrc/cuda/norm.h.
// head_dim is 64 or 80 (checked by csrc/ops). Index arrays live on the device: the launchers must not read
// them on the host (no synchronization); grids are sized from num_tokens / num_seqs / max_pages_per_seq,
// e.g. ceil(num_tokens / BLOCK_M) + num_seqs query tiles covers every varlen split.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace phi_fast::cuda {

// Varlen attention over contiguous sequences: sequence s owns tokens cu_seqlens[s]..cu_seqlens[s+1];
// o_i = sum_j softmax_j(scale * q_i . k_j) v_j over that sequence's keys j (j <= i when causal).
// out: [T, H, D] contiguous; q, k, v: [T, H, D] with strides (*_token_stride, *_head_stride, 1);
// cu_seqlens: int32 [num_seqs + 1], cu_seqlens[0] = 0, cu_seqlens[num_seqs] = T.
void prefill_attention(void* out, const void* q, int64_t q_token_stride, int64_t q_head_stride, const void* k,
                       int64_t k_token_stride, int64_t k_head_stride, const void* v, int64_t v_token_stride,
                       int64_t v_head_stride, const int32_t* cu_seqlens, int64_t num_seqs, int64_t num_tokens,
                       int64_t num_heads, int64_t head_dim, float scale, bool causal, DType dtype, void* stream);

// Bytes of device scratch paged_attention needs for these sizes (split-K partial outputs, maxima and sums;
// 0 when it never splits). Depends only on host-known sizes; the caller allocates at least this much.
int64_t paged_attention_workspace_bytes(int64_t num_seqs, int64_t num_tokens, int64_t num_heads,
                                        int64_t head_dim, int64_t page_size, int64_t max_pages_per_seq);

// Causal attention of new queries over a paged KV cache that already holds their k, v.
// Sequence s owns queries cu_seqlens_q[s]..cu_seqlens_q[s+1] (q_len of them, >= 0), sitting at the last q_len
// of its seq_lens[s] cached positions; query j of s sees cached positions p <= seq_lens[s] - q_len + j.
// Position p of s is at key_cache[block_table[s, p / page_size], p % page_size]. Decode is q_len = 1.
// out: [T, H, D] contiguous; q: [T, H, D] with strides (q_token_stride, q_head_stride, 1);
// key_cache, value_cache: [num_pages, page_size, H, D] contiguous; block_table: int32 [num_seqs,
// max_pages_per_seq] with row stride block_table_stride; seq_lens: int32 [num_seqs];
// cu_seqlens_q: int32 [num_seqs + 1]; workspace: workspace_bytes (>= paged_attention_workspace_bytes) of
// device scratch, may be null when that is 0.
// Sequences with q_len 1 take the CUDA-core rows kernel (split-K); when T > S, those with q_len >= 2 (prompt
// chunks over a cached prefix) take the tensor-core kernel of paged_prefill_attention in a second launch
// (16-bit dtypes with aligned rows; otherwise the rows kernel does every query). Decode-only calls (T == S)
// launch exactly the rows kernel (+ the split combine): the same launches in and out of CUDA graphs.
void paged_attention(void* out, const void* q, int64_t q_token_stride, int64_t q_head_stride,
                     const void* key_cache, const void* value_cache, const int32_t* block_table,
                     int64_t block_table_stride, const int32_t* seq_lens, const int32_t* cu_seqlens_q,
                     int64_t num_seqs, int64_t num_tokens, int64_t num_heads, int64_t head_dim, int64_t page_size,
                     int64_t max_pages_per_seq, float scale, DType dtype, void* workspace,
                     int64_t workspace_bytes, void* stream);

// The tensor-core part of paged_attention (called by it; csrc/cuda/attention_prefill.cu): the same math and
// arguments, for the sequences with q_len >= 2 only (rows of q_len-1 sequences are left untouched).
// Needs paged_prefill_supported (16-bit dtype, out, q, caches 16-byte aligned, q strides multiples of 8).
bool paged_prefill_supported(const void* out, const void* q, int64_t q_token_stride, int64_t q_head_stride,
                             const void* key_cache, const void* value_cache, DType dtype);
void paged_prefill_attention(void* out, const void* q, int64_t q_token_stride, int64_t q_head_stride,
                             const void* key_cache, const void* value_cache, const int32_t* block_table,
                             int64_t block_table_stride, const int32_t* seq_lens, const int32_t* cu_seqlens_q,
                             int64_t num_seqs, int64_t num_tokens, int64_t num_heads, int64_t head_dim,
                             int64_t page_size, float scale, DType dtype, void* stream);

}  // namespace phi_fast::cuda
