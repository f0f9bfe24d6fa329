// Tensor-facing ops of phi_fast._C (one per op of phi_fast/reference.py, same signatures): check inputs,
// allocate outputs, dispatch to the CPU or CUDA launcher. Bound in csrc/bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace phi_fast::ops {

// norm.cpp
at::Tensor layernorm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);
std::tuple<at::Tensor, at::Tensor> add_layernorm(const at::Tensor& x, const at::Tensor& a,
                                                 const std::optional<at::Tensor>& b, const at::Tensor& weight,
                                                 const at::Tensor& bias, double eps);
at::Tensor embed_layernorm(const at::Tensor& patches, const at::Tensor& class_embedding,
                           const at::Tensor& position_embedding, const at::Tensor& weight, const at::Tensor& bias,
                           double eps);

// activation.cpp
at::Tensor bias_gelu(const at::Tensor& x, const at::Tensor& bias, const std::string& approximate);
at::Tensor bias_quick_gelu(const at::Tensor& x, const at::Tensor& bias);

// rotary_cache.cpp
void rotary_cache(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                  const std::optional<at::Tensor>& key_cache, const std::optional<at::Tensor>& value_cache,
                  const std::optional<at::Tensor>& slot_mapping);

// attention.cpp
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& cu_seqlens, double scale, bool causal);
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q,
                           double scale);

// linear.cpp
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// quant_linear.cpp
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const std::optional<at::Tensor>& bias);
at::Tensor dequantize(const at::Tensor& qweight, const at::Tensor& scales, int64_t in_features);

// patch_embed.cpp
at::Tensor patchify(const at::Tensor& pixels, int64_t patch, const std::optional<at::Tensor>& mean,
                    const std::optional<at::Tensor>& std);

}  // namespace phi_fast::ops
