"""GEMM choices of the Phi-2 block, measured rather than assumed (decode M = 1, 64; prefill M = 640).

    python -m bench.kernels.gemm [--iters N] [--out DIR]

- qkv (N = 7680) and fc1 (N = 10240) read the same LayerNorm output: one GEMM over the concatenated weight
  (N = 17920) vs two. "ours" is the concatenated GEMM, the baseline the two separate ones.
- dense (K = 2560) and fc2 (K = 10240) both land in the residual: one GEMM over [attn | gelu] with stacked
  weights (K = 12800) vs two GEMMs and an add. "ours" is the stacked GEMM.
- fc1 + bias + gelu_new: our GEMM then ops.bias_gelu vs cuBLASLt's GELU epilogue (torch._addmm_activation).
The model keeps whichever wins; bench/NOTES.md records the numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import Case, run_suite
from phi_fast import ops

HIDDEN, QKV, MLP = 2560, 3 * 2560, 10240


def make_cases() -> list[Case]:
    dt = torch.bfloat16
    cases = []
    w = lambda n, k: torch.randn(n, k, device="cuda", dtype=dt) * k ** -0.5
    b = lambda n: torch.randn(n, device="cuda", dtype=dt)
    w_qkv, w_fc1, w_dense, w_fc2 = w(QKV, HIDDEN), w(MLP, HIDDEN), w(HIDDEN, HIDDEN), w(HIDDEN, MLP)
    b_qkv, b_fc1, b_out = b(QKV), b(MLP), b(HIDDEN)
    w_qkv_fc1, b_qkv_fc1 = torch.cat([w_qkv, w_fc1]), torch.cat([b_qkv, b_fc1])
    w_dense_fc2 = torch.cat([w_dense, w_fc2], dim=1)  # [2560, 12800]
    for m in (1, 64, 640):
        h = torch.randn(m, HIDDEN, device="cuda", dtype=dt)
        attn_gelu = torch.randn(m, HIDDEN + MLP, device="cuda", dtype=dt)
        attn, gelu = attn_gelu[:, :HIDDEN], attn_gelu[:, HIDDEN:]
        small = m <= 64
        cases.append(Case(
            name="qkv+fc1 concatenated", shape=f"[{m}, {HIDDEN}] x [{QKV + MLP}, {HIDDEN}]", dtype="bf16",
            fn=lambda h=h: F.linear(h, w_qkv_fc1, b_qkv_fc1),
            baseline="F.linear qkv; F.linear fc1",
            baseline_fn=lambda h=h: (F.linear(h, w_qkv, b_qkv), F.linear(h, w_fc1, b_fc1)),
            flops=2.0 * m * HIDDEN * (QKV + MLP), flush_l2=small))
        cases.append(Case(
            name="dense+fc2 stacked", shape=f"[{m}, {HIDDEN + MLP}] x [{HIDDEN}, {HIDDEN + MLP}]", dtype="bf16",
            fn=lambda ag=attn_gelu: F.linear(ag, w_dense_fc2, b_out),
            baseline="F.linear dense + F.linear fc2",
            baseline_fn=lambda a=attn, g=gelu: F.linear(a, w_dense) + F.linear(g, w_fc2, b_out),
            flops=2.0 * m * HIDDEN * (HIDDEN + MLP), flush_l2=small))
        cases.append(Case(
            name="fc1 + bias_gelu", shape=f"[{m}, {HIDDEN}] x [{MLP}, {HIDDEN}]", dtype="bf16",
            fn=lambda h=h: ops.bias_gelu(F.linear(h, w_fc1), b_fc1, "tanh", backend="cpp"),
            baseline="torch._addmm_activation(use_gelu=True) (cuBLASLt epilogue)",
            baseline_fn=lambda h=h: torch._addmm_activation(b_fc1, h, w_fc1.t(), use_gelu=True),
            flops=2.0 * m * HIDDEN * MLP, flush_l2=small))
    return cases


if __name__ == "__main__":
    run_suite("kernels-gemm", make_cases)
