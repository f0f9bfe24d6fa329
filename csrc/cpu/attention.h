// CPU launchers of the attention family (csrc/cpu/attention.cpp). Same parameters as csrc/cuda/attention.h
// with num_threads in place of the stream and paged_attention's workspace; conventions in csrc/cpu/norm.h.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace phi_fast::cpu {

// Varlen attention over contiguous sequences: sequence s owns tokens cu_seqlens[s]..cu_seqlens[s+1];
// o_i = sum_j softmax_j(scale * q_i . k_j) v_j over that sequence's keys j (j <= i when causal).
// out: [T, H, D] contiguous; q, k, v: [T, H, D] with strides (*_token_stride, *_head_stride, 1);
// cu_seqlens: int32 [num_seqs + 1], cu_seqlens[0] = 0, cu_seqlens[num_seqs] = T.
void prefill_attention(void* out, const void* q, int64_t q_token_stride, int64_t q_head_stride, const void* k,
                       int64_t k_token_stride, int64_t k_head_stride, const void* v, int64_t v_token_stride,
                       int64_t v_head_stride, const int32_t* cu_seqlens, int64_t num_seqs, int64_t num_tokens,
                       int64_t num_heads, int64_t head_dim, float scale, bool causal, DType dtype, int num_threads);

// Causal attention of new queries over a paged KV cache that already holds their k, v.
// Sequence s owns queries cu_seqlens_q[s]..cu_seqlens_q[s+1] (q_len of them, >= 0), sitting at the last q_len
// of its seq_lens[s] cached positions; query j of s sees cached positions p <= seq_lens[s] - q_len + j.
// Position p of s is at key_cache[block_table[s, p / page_size], p % page_size]. Decode is q_len = 1.
// out: [T, H, D] contiguous; q: [T, H, D] with strides (q_token_stride, q_head_stride, 1);
// key_cache, value_cache: [num_pages, page_size, H, D] contiguous; block_table: int32 [num_seqs,
// max_pages_per_seq] with row stride block_table_stride; seq_lens: int32 [num_seqs];
// cu_seqlens_q: int32 [num_seqs + 1].
void paged_attention(void* out, const void* q, int64_t q_token_stride, int64_t q_head_stride,
                     const void* key_cache, const void* value_cache, const int32_t* block_table,
                     int64_t block_table_stride, const int32_t* seq_lens, const int32_t* cu_seqlens_q,
                     int64_t num_seqs, int64_t num_tokens, int64_t num_heads, int64_t head_dim, int64_t page_size,
                     int64_t max_pages_per_seq, float scale, DType dtype, int num_threads);

}  // namespace phi_fast::cpu
