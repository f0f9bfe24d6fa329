"""paged_attention (decode) and prefill_attention on Phi-2 / CLIP shapes vs torch SDPA in the same run.

    python -m bench.kernels.attention [--iters N] [--out DIR]

Decode: batch x context with 32 heads of 80, page size 16, shuffled block tables; GB/s counts the K/V bytes read
(the floor); the baseline is SDPA on the same K/V already contiguous ([B, H, L, D], no paging, so it is
cheaper than any real paged baseline). Prefill: causal 32 x 80 at 640 and 2048 tokens (Phi-2) and
bidirectional 16 x 64 at 577 tokens (CLIP), vs SDPA's flash backend on contiguous [1, H, T, D] inputs;
TFLOP/s counts 4 T^2 H D (halved when causal).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import Case, run_suite
from phi_fast import ops

PAGE_SIZE = 16


def _decode_case(batch: int, context: int, heads: int = 32, head_dim: int = 80) -> Case:
    dt = torch.bfloat16
    pages_per_seq = (context + PAGE_SIZE - 1) // PAGE_SIZE
    num_pages = batch * pages_per_seq
    kc = torch.randn(num_pages, PAGE_SIZE, heads, head_dim, device="cuda", dtype=dt)
    vc = torch.randn_like(kc)
    table = torch.randperm(num_pages, device="cuda").to(torch.int32).view(batch, pages_per_seq)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, 3, heads, head_dim, device="cuda", dtype=dt)[:, 0]  # strided, as out of the QKV GEMM
    scale = head_dim ** -0.5
    k_dense = kc[table.long()].reshape(batch, -1, heads, head_dim)[:, :context].transpose(1, 2).contiguous()
    v_dense = vc[table.long()].reshape(batch, -1, heads, head_dim)[:, :context].transpose(1, 2).contiguous()
    q_dense = q.unsqueeze(2).contiguous()  # [B, H, 1, D]
    kv_bytes = 2 * batch * context * heads * head_dim * 2
    return Case(
        name="paged_attention decode", shape=f"{batch} x {context}, {heads} x {head_dim}", dtype="bf16",
        fn=lambda: ops.paged_attention(q, kc, vc, table, lens, cu, scale, backend="cpp"),
        baseline="SDPA, contiguous K/V",
        baseline_fn=lambda: F.scaled_dot_product_attention(q_dense, k_dense, v_dense, scale=scale),
        bytes_moved=kv_bytes + 2 * batch * heads * head_dim * 2, flush_l2=True)


def _prefill_case(tokens: int, heads: int, head_dim: int, causal: bool) -> Case:
    dt = torch.bfloat16
    qkv = torch.randn(tokens, 3, heads, head_dim, device="cuda", dtype=dt)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, tokens], dtype=torch.int32, device="cuda")
    scale = head_dim ** -0.5
    qd, kd, vd = (t.transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v))  # [1, H, T, D]

    def baseline():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, scale=scale)

    flops = 4 * tokens * tokens * heads * head_dim / (2 if causal else 1)
    return Case(
        name=f"prefill_attention {'causal' if causal else 'bidirectional'}",
        shape=f"{tokens} tokens, {heads} x {head_dim}", dtype="bf16",
        fn=lambda: ops.prefill_attention(q, k, v, cu, scale, causal, backend="cpp"),
        baseline="SDPA flash backend", baseline_fn=baseline, flops=flops)


def make_cases() -> list[Case]:
    return [_decode_case(1, 640), _decode_case(32, 2048), _decode_case(64, 700),
            _prefill_case(640, 32, 80, True), _prefill_case(2048, 32, 80, True), _prefill_case(577, 16, 64, False)]


if __name__ == "__main__":
    run_suite("kernels-attention", make_cases)
