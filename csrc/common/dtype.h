// Element types shared by every launcher (CPU and CUDA), with no torch or CUDA headers.
//
// The tensor-facing layer (csrc/ops) maps torch dtypes onto DType; launchers take `void*` / `const void*`
// data pointers plus a DType and dispatch on it internally. Index tensors (positions, slot_mapping,
// block_table, seq_lens, cu_seqlens) and rotary tables have fixed types and are passed typed.
#pragma once

#include <cstdint>

namespace phi_fast {

// Storage type of activations, weights and KV caches: fp32, IEEE fp16 or bfloat16.
enum class DType : int32_t { f32 = 0, f16 = 1, bf16 = 2 };

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
  }
  return "unknown";
}

}  // namespace phi_fast
