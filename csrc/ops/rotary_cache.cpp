// Tensor-facing rotary_cache: checks, dispatch to phi_fast::cpu / phi_fast::cuda (csrc/cpu/rotary_cache.h,
// csrc/cuda/rotary_cache.h). In place on qkv and the caches; nothing allocated.
#include <ATen/Parallel.h>

#include "cpu/rotary_cache.h"
#include "cuda/rotary_cache.h"
#include "ops/checks.h"
#include "ops/ops.h"

namespace phi_fast::ops {

// qkv: [T, 3, H, D] (rotated in place); positions: int64 [T]; cos, sin: fp32 [max_positions, R/2];
// key_cache, value_cache: [num_pages, page_size, H, D] or None; slot_mapping: int64 [T] (-1 = skip) or None
void rotary_cache(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                  const std::optional<at::Tensor>& key_cache, const std::optional<at::Tensor>& value_cache,
                  const std::optional<at::Tensor>& slot_mapping) {
  const OpContext ctx = make_context("rotary_cache", "qkv", qkv);
  check_arg(ctx, "qkv", qkv, {-1, 3, -1, -1}, "[T, 3, H, D]", Layout::unit_last_stride);
  const int64_t T = qkv.size(0), H = qkv.size(2), D = qkv.size(3);
  check_head_dim(ctx, D);
  check_arg(ctx, "positions", positions, {T}, "[T]", Layout::contiguous, at::kLong);
  check_arg(ctx, "cos", cos, {-1, -1}, "[max_positions, R/2]", Layout::contiguous, at::kFloat);
  const int64_t max_positions = cos.size(0), half = cos.size(1);
  check_arg(ctx, "sin", sin, {max_positions, half}, "[max_positions, R/2]", Layout::contiguous, at::kFloat);
  TORCH_CHECK_VALUE(half >= 1 && 2 * half <= D, "rotary_cache: unsupported rotary_dim ", 2 * half,
                    " = 2 * cos.shape[1] (supported: even, 2 <= rotary_dim <= head_dim ", D, ")");
  TORCH_CHECK(key_cache.has_value() == value_cache.has_value(), "rotary_cache: key_cache and value_cache must be ",
              "given together (got ", key_cache ? "key_cache only" : "value_cache only", ")");
  const bool write_cache = key_cache.has_value();
  int64_t page_size = 0;
  if (write_cache) {
    check_arg(ctx, "key_cache", *key_cache, {-1, -1, H, D}, "[num_pages, page_size, H, D]", Layout::contiguous);
    page_size = key_cache->size(1);
    check_page_size(ctx, page_size);
    check_arg(ctx, "value_cache", *value_cache, {key_cache->size(0), page_size, H, D}, "[num_pages, page_size, H, D]",
              Layout::contiguous);
    TORCH_CHECK(slot_mapping.has_value(), "rotary_cache: slot_mapping is required with key_cache/value_cache");
    check_arg(ctx, "slot_mapping", *slot_mapping, {T}, "[T]", Layout::contiguous, at::kLong);
  }
  if (T == 0) return;
  if (ctx.device.is_cpu()) {
    const int64_t* pos = positions.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(pos[t] >= 0 && pos[t] < max_positions, "rotary_cache: positions[", t, "] = ", pos[t],
                  " is outside the rotary tables [0, ", max_positions, ")");
    }
    if (write_cache) {
      const int64_t* slots = slot_mapping->data_ptr<int64_t>();
      const int64_t num_slots = key_cache->size(0) * page_size;
      for (int64_t t = 0; t < T; ++t) {
        TORCH_CHECK(slots[t] < num_slots, "rotary_cache: slot_mapping[", t, "] = ", slots[t],
                    " is outside the cache (", num_slots, " slots)");
      }
    }
  }
  void* k_cache = write_cache ? key_cache->data_ptr() : nullptr;
  void* v_cache = write_cache ? value_cache->data_ptr() : nullptr;
  const int64_t* slots = write_cache ? slot_mapping->data_ptr<int64_t>() : nullptr;
  dispatch_device(
      ctx,
      [&] {
        cpu::rotary_cache(qkv.data_ptr(), qkv.stride(0), qkv.stride(1), qkv.stride(2), positions.data_ptr<int64_t>(),
                          cos.data_ptr<float>(), sin.data_ptr<float>(), 2 * half, k_cache, v_cache, slots, T, H, D,
                          page_size, ctx.dtype, at::get_num_threads());
      },
      [&]([[maybe_unused]] void* stream) {
        PHI_FAST_CUDA_ONLY(cuda::rotary_cache(qkv.data_ptr(), qkv.stride(0), qkv.stride(1), qkv.stride(2),
                                              positions.data_ptr<int64_t>(), cos.data_ptr<float>(),
                                              sin.data_ptr<float>(), 2 * half, k_cache, v_cache, slots, T, H, D,
                                              page_size, ctx.dtype, stream);)
      });
}

}  // namespace phi_fast::ops
