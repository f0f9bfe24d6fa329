// CPU launchers of the norm family (csrc/cpu/norm.cpp). Torch-free: raw pointers, element strides, DType.
// Same parameters as csrc/cuda/norm.h with num_threads in place of the stream. Conventions: outputs first;
// outputs contiguous; inputs validated by csrc/ops; weight/bias/embeddings share the activations' DType; fp32
// accumulation; num_threads is the caller's thread budget (at::get_num_threads() in csrc/ops), of which a call
// uses only as many as its size pays for (one, with no OpenMP team, for decode-sized work: kernel_utils.h).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace phi_fast::cpu {

// y = LayerNorm(x) * weight + bias over the last dim.
// y: [T, C] contiguous; x: [T, C] with row stride x_stride; weight, bias: [C].
void layernorm(void* y, const void* x, int64_t x_stride, const void* weight, const void* bias,
               int64_t num_tokens, int64_t hidden, float eps, DType dtype, int num_threads);

// s = (a + b) + x (s = a + x when b is null), in fp32; y = LayerNorm(s) from the fp32 s; s rounded last.
// s, y: [T, C] contiguous; x, a, b: [T, C] with row strides x_stride, a_stride, b_stride; weight, bias: [C].
void add_layernorm(void* s, void* y, const void* x, int64_t x_stride, const void* a, int64_t a_stride,
                   const void* b, int64_t b_stride, const void* weight, const void* bias,
                   int64_t num_tokens, int64_t hidden, float eps, DType dtype, int num_threads);

// CLIP embeddings + pre-LayerNorm: row 0 = class_embedding, row n = patches[b, n - 1]; + position_embedding[n];
// then LayerNorm.
// y: [B, N + 1, C] contiguous; patches: [B, N, C] with strides (patches_batch_stride, patches_row_stride, 1);
// class_embedding: [C]; position_embedding: [N + 1, C] contiguous; weight, bias: [C].
void embed_layernorm(void* y, const void* patches, int64_t patches_batch_stride, int64_t patches_row_stride,
                     const void* class_embedding, const void* position_embedding, const void* weight,
                     const void* bias, int64_t batch, int64_t num_patches, int64_t hidden, float eps,
                     DType dtype, int num_threads);

}  // namespace phi_fast::cpu
