// Prompt-sized linear layers on the CPU whose weights are not in a fast GEMM's dtype (packed int8/int4, or bf16 /
// fp16 on CPUs without native bf16 dot products): the weight is converted tile by tile (a few hundred rows at a
// time, never the whole layer) and each tile goes through torch's GEMM (MKL / oneDNN), which is compute-bound at
// these sizes, so the conversion (one pass over the tile) costs a few percent.
#pragma once

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <optional>

#include "cpu/vec_avx512.h"

namespace phi_fast::ops {

// Rows per weight tile: about 2 MB of fp32 (the tile is re-read from L2/L3 by every block of x rows).
inline int64_t tile_rows(int64_t K) { return std::clamp<int64_t>((int64_t{2} << 20) / (4 * std::max<int64_t>(K, 1)), 64, 512); }

// out = x @ W^T + bias -> [M, N] in x's dtype, W given by tile(n0, rows) -> fp32 [rows, K] (any row stride, unit
// last stride). The GEMM runs in bf16 when x is bf16 and the CPU has native bf16 dot products, else in fp32.
// x: [M, K]; bias: [N] in x's dtype or None.
template <typename Tile>
at::Tensor tiled_linear(const at::Tensor& x, const std::optional<at::Tensor>& bias, int64_t N, Tile&& tile) {
  const bool bf16 = x.scalar_type() == at::kBFloat16 && cpu::native_bf16();
  const at::ScalarType compute = bf16 ? at::kBFloat16 : at::kFloat;
  const at::Tensor xc = x.to(compute);
  const at::Tensor bc = bias ? bias->to(compute) : at::Tensor();
  at::Tensor out = at::empty({x.size(0), N}, x.options().dtype(compute));
  const int64_t rows = tile_rows(x.size(1));
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t n = std::min(rows, N - n0);
    const at::Tensor w = tile(n0, n).to(compute);  // [n, K]
    at::Tensor o = out.narrow(1, n0, n);
    if (bc.defined()) {
      at::addmm_out(o, bc.narrow(0, n0, n), xc, w.t());
    } else {
      at::mm_out(o, xc, w.t());
    }
  }
  return out.to(x.scalar_type());
}

}  // namespace phi_fast::ops
