// Tensor-facing prefill_attention and paged_attention: checks, output allocation, dispatch to phi_fast::cpu /
// phi_fast::cuda (csrc/cpu/attention.h, csrc/cuda/attention.h).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "cpu/attention.h"
#include "cuda/attention.h"
#include "ops/checks.h"
#include "ops/ops.h"

namespace phi_fast::ops {

// q, k, v: [T, H, D]; cu_seqlens: int32 [S + 1] -> [T, H, D]
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& cu_seqlens, double scale, bool causal) {
  const OpContext ctx = make_context("prefill_attention", "q", q);
  check_arg(ctx, "q", q, {-1, -1, -1}, "[T, H, D]", Layout::unit_last_stride);
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  check_head_dim(ctx, D);
  check_arg(ctx, "k", k, {T, H, D}, "[T, H, D]", Layout::unit_last_stride);
  check_arg(ctx, "v", v, {T, H, D}, "[T, H, D]", Layout::unit_last_stride);
  check_arg(ctx, "cu_seqlens", cu_seqlens, {-1}, "[S + 1]", Layout::contiguous, at::kInt);
  TORCH_CHECK(cu_seqlens.numel() >= 1, "prefill_attention: cu_seqlens must hold at least one entry (0)");
  const int64_t S = cu_seqlens.numel() - 1;
  if (ctx.device.is_cpu()) check_cu_seqlens_values(ctx, "cu_seqlens", cu_seqlens, T);
  at::Tensor out = at::empty({T, H, D}, q.options());
  if (out.numel() == 0) return out;
  const float sc = static_cast<float>(scale);
  dispatch_device(
      ctx,
      [&] {
        cpu::prefill_attention(out.data_ptr(), q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0),
                               k.stride(1), v.data_ptr(), v.stride(0), v.stride(1), cu_seqlens.data_ptr<int32_t>(),
                               S, T, H, D, sc, causal, ctx.dtype, at::get_num_threads());
      },
      [&]([[maybe_unused]] void* stream) {
        PHI_FAST_CUDA_ONLY(cuda::prefill_attention(out.data_ptr(), q.data_ptr(), q.stride(0), q.stride(1),
                                                   k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(), v.stride(0),
                                                   v.stride(1), cu_seqlens.data_ptr<int32_t>(), S, T, H, D, sc,
                                                   causal, ctx.dtype, stream);)
      });
  return out;
}

// CPU only: every sequence holds its queries (q_len <= seq_len) and its pages exist in block_table and the cache.
static void check_paged_values(const OpContext& ctx, const at::Tensor& block_table, const at::Tensor& seq_lens,
                               const at::Tensor& cu_seqlens_q, int64_t num_pages, int64_t page_size) {
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* cu = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  const int64_t max_pages = block_table.size(1);
  for (int64_t s = 0; s < seq_lens.numel(); ++s) {
    const int64_t q_len = cu[s + 1] - cu[s];
    TORCH_CHECK(lens[s] >= q_len, ctx.op, ": seq_lens[", s, "] = ", lens[s], " is shorter than its ", q_len,
                " queries (seq_lens counts the new tokens too)");
    const int64_t pages = (lens[s] + page_size - 1) / page_size;
    TORCH_CHECK(pages <= max_pages, ctx.op, ": seq_lens[", s, "] = ", lens[s], " needs ", pages,
                " pages, block_table has ", max_pages, " per sequence");
    for (int64_t p = 0; p < pages; ++p) {
      const int32_t page = table[s * block_table.stride(0) + p];
      TORCH_CHECK(page >= 0 && page < num_pages, ctx.op, ": block_table[", s, ", ", p, "] = ", page,
                  " is outside the cache (", num_pages, " pages)");
    }
  }
}

// q: [T, H, D]; key_cache, value_cache: [num_pages, page_size, H, D]; block_table: int32 [S, max_pages];
// seq_lens: int32 [S]; cu_seqlens_q: int32 [S + 1] -> [T, H, D]
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q,
                           double scale) {
  const OpContext ctx = make_context("paged_attention", "q", q);
  check_arg(ctx, "q", q, {-1, -1, -1}, "[T, H, D]", Layout::unit_last_stride);
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  check_head_dim(ctx, D);
  check_arg(ctx, "key_cache", key_cache, {-1, -1, H, D}, "[num_pages, page_size, H, D]", Layout::contiguous);
  const int64_t num_pages = key_cache.size(0), page_size = key_cache.size(1);
  check_page_size(ctx, page_size);
  check_arg(ctx, "value_cache", value_cache, {num_pages, page_size, H, D}, "[num_pages, page_size, H, D]",
            Layout::contiguous);
  check_arg(ctx, "block_table", block_table, {-1, -1}, "[S, max_pages]", Layout::unit_last_stride, at::kInt);
  const int64_t S = block_table.size(0), max_pages = block_table.size(1);
  check_arg(ctx, "seq_lens", seq_lens, {S}, "[S]", Layout::contiguous, at::kInt);
  check_arg(ctx, "cu_seqlens_q", cu_seqlens_q, {S + 1}, "[S + 1]", Layout::contiguous, at::kInt);
  if (ctx.device.is_cpu()) {
    check_cu_seqlens_values(ctx, "cu_seqlens_q", cu_seqlens_q, T);
    check_paged_values(ctx, block_table, seq_lens, cu_seqlens_q, num_pages, page_size);
  }
  at::Tensor out = at::empty({T, H, D}, q.options());
  if (out.numel() == 0) return out;
  const float sc = static_cast<float>(scale);
  dispatch_device(
      ctx,
      [&] {
        cpu::paged_attention(out.data_ptr(), q.data_ptr(), q.stride(0), q.stride(1), key_cache.data_ptr(),
                             value_cache.data_ptr(), block_table.data_ptr<int32_t>(), block_table.stride(0),
                             seq_lens.data_ptr<int32_t>(), cu_seqlens_q.data_ptr<int32_t>(), S, T, H, D, page_size,
                             max_pages, sc, ctx.dtype, at::get_num_threads());
      },
      [&]([[maybe_unused]] void* stream) {
        PHI_FAST_CUDA_ONLY(
            const int64_t bytes = cuda::paged_attention_workspace_bytes(S, T, H, D, page_size, max_pages);
            at::Tensor workspace = at::empty({bytes}, q.options().dtype(at::kByte));
            cuda::paged_attention(out.data_ptr(), q.data_ptr(), q.stride(0), q.stride(1), key_cache.data_ptr(),
                                  value_cache.data_ptr(), block_table.data_ptr<int32_t>(), block_table.stride(0),
                                  seq_lens.data_ptr<int32_t>(), cu_seqlens_q.data_ptr<int32_t>(), S, T, H, D,
                                  page_size, max_pages, sc, ctx.dtype, bytes ? workspace.data_ptr() : nullptr, bytes,
                                  stream);)
      });
  return out;
}

}  // namespace phi_fast::ops
