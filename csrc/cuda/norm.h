// CUDA launchers of the norm family (kernels in csrc/cuda/norm.cu). Declarations only, no CUDA types:
// `stream` is a cudaStream_t passed as void* (cast with static_cast<cudaStream_t>(stream)), so this header
// can be included by host code built without CUDA headers. Same math and parameters as csrc/cpu/norm.h.
//
// Conventions for every launcher in csrc/cuda/*.h:
// - outputs first, then inputs; strides in elements (int64_t); last dims are unit-stride;
// - outputs are contiguous, allocated by the caller (csrc/ops); inputs are already validated there;
// - weight/bias/embeddings have the same DType as the activations; fp32 accumulation;
// - nothing is launched for zero-sized work; launch errors are checked by the caller
//   (C10_CUDA_KERNEL_LAUNCH_CHECK), so launchers do not synchronize.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace phi_fast::cuda {

// y = LayerNorm(x) * weight + bias over the last dim.
// y: [T, C] contiguous; x: [T, C] with row stride x_stride; weight, bias: [C].
void layernorm(void* y, const void* x, int64_t x_stride, const void* weight, const void* bias,
               int64_t num_tokens, int64_t hidden, float eps, DType dtype, void* stream);

// s = (a + b) + x (s = a + x when b is null), in fp32; y = LayerNorm(s) from the fp32 s; s rounded last.
// s, y: [T, C] contiguous; x, a, b: [T, C] with row strides x_stride, a_stride, b_stride; weight, bias: [C].
void add_layernorm(void* s, void* y, const void* x, int64_t x_stride, const void* a, int64_t a_stride,
                   const void* b, int64_t b_stride, const void* weight, const void* bias,
                   int64_t num_tokens, int64_t hidden, float eps, DType dtype, void* stream);

// CLIP embeddings + pre-LayerNorm: row 0 = class_embedding, row n = patches[b, n - 1]; + position_embedding[n];
// then LayerNorm.
// y: [B, N + 1, C] contiguous; patches: [B, N, C] with strides (patches_batch_stride, patches_row_stride, 1);
// class_embedding: [C]; position_embedding: [N + 1, C] contiguous; weight, bias: [C].
void embed_layernorm(void* y, const void* patches, int64_t patches_batch_stride, int64_t patches_row_stride,
                     const void* class_embedding, const void* position_embedding, const void* weight,
                     const void* bias, int64_t batch, int64_t num_patches, int64_t hidden, float eps,
                     DType dtype, void* stream);

}  // namespace phi_fast::cuda
