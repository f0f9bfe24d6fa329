// CPU launchers of the activation family (csrc/cpu/activation.cpp). Same parameters as csrc/cuda/activation.h
// with num_threads in place of the stream; conventions in csrc/cpu/norm.h.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace phi_fast::cpu {

// y = gelu(x + bias): tanh_approximation true = gelu_new 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3))),
// false = exact erf form 0.5 h (1 + erf(h / sqrt(2))).
// y: [T, N] contiguous; x: [T, N] with row stride x_stride; bias: [N].
void bias_gelu(void* y, const void* x, int64_t x_stride, const void* bias, int64_t num_tokens, int64_t width,
               bool tanh_approximation, DType dtype, int num_threads);

// y = h * sigmoid(1.702 h), h = x + bias.
// y: [T, N] contiguous; x: [T, N] with row stride x_stride; bias: [N].
void bias_quick_gelu(void* y, const void* x, int64_t x_stride, const void* bias, int64_t num_tokens,
                     int64_t width, DType dtype, int num_threads);

}  // namespace phi_fast::cpu
