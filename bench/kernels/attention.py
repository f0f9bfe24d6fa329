"""paged_attention (decode, prompt chunks over a cached prefix, mixed steps) and prefill_attention on Phi-2 / CLIP
shapes vs torch SDPA and the previous paged path in the same run.

    python -m bench.kernels.attention [--iters N] [--out DIR] [--device cuda|cpu]

Decode: batch x context with 32 heads of 80, page size 16, shuffled block tables; GB/s counts the K/V bytes read
(the floor); the baseline is SDPA on the same K/V already contiguous ([B, H, L, D], no paging, so it is
cheaper than any real paged baseline). Prefill: causal 32 x 80 at 640 and 2048 tokens (Phi-2) and
bidirectional 16 x 64 at 577 tokens (CLIP), vs SDPA's flash backend on contiguous [1, H, T, D] inputs;
TFLOP/s counts 4 T^2 H D (halved when causal).
Paged prefill: a chunk of `new` queries over `prefix` cached tokens (35 + 600: a prompt after the system prompt;
600 + 32: a question after an image prompt), 32 x 80, TFLOP/s counting the visible (causal) query-key pairs
4 H D sum_i (prefix + i + 1). Two baselines: the rows path (main's paged_attention for q_len > 1: one CUDA-core
block per query and head), reached through the same op by giving each query its own one-query sequence over the
same pages, and SDPA on contiguous K/V with a lower-right causal mask.
Mixed step: 4 decode rows over 700 tokens + a 128-query chunk after 35, as one call vs the two parts as two calls.
On the CPU (--device cpu): decode at batch 1 over 620 and 2000 tokens (bf16, cold K/V: calls cycle through
>= 256 MiB of copies), and the paged prefill and mixed-step cases (fp32); the others are GPU targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from bench.common import Case, run_suite
from phi_fast import ops

PAGE_SIZE = 16


def _decode_case(batch: int, context: int, heads: int = 32, head_dim: int = 80, device: str = "cuda") -> Case:
    """On the CPU the case cycles through copies of its K/V (>= 256 MiB in all, paged and dense alike), so each
    call reads them from memory as decode does (the GPU flushes L2 instead)."""
    dt = torch.bfloat16
    pages_per_seq = (context + PAGE_SIZE - 1) // PAGE_SIZE
    num_pages = batch * pages_per_seq
    kv_bytes = 2 * batch * context * heads * head_dim * 2
    copies = 1 if device == "cuda" else -(-(256 << 20) // kv_bytes)
    table = torch.randperm(num_pages, device=device).to(torch.int32).view(batch, pages_per_seq)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    cu = torch.arange(batch + 1, dtype=torch.int32, device=device)
    q = torch.randn(batch, 3, heads, head_dim, device=device, dtype=dt)[:, 0]  # strided, as out of the QKV GEMM
    q_dense = q.unsqueeze(2).contiguous()  # [B, H, 1, D]
    scale = head_dim ** -0.5
    paged, dense = [], []
    for _ in range(copies):
        kc = torch.randn(num_pages, PAGE_SIZE, heads, head_dim, device=device, dtype=dt)
        vc = torch.randn_like(kc)
        paged.append((kc, vc))
        dense.append(tuple(c[table.long()].reshape(batch, -1, heads, head_dim)[:, :context].transpose(1, 2)
                           .contiguous() for c in (kc, vc)))
    turn = {"paged": 0, "dense": 0}

    def next_copy(kind: str, pool: list) -> tuple[torch.Tensor, torch.Tensor]:
        turn[kind] += 1
        return pool[turn[kind] % len(pool)]

    def ours():
        kc, vc = next_copy("paged", paged)
        return ops.paged_attention(q, kc, vc, table, lens, cu, scale, backend="cpp")

    def sdpa():
        k, v = next_copy("dense", dense)
        return F.scaled_dot_product_attention(q_dense, k, v, scale=scale)

    return Case(
        name="paged_attention decode", shape=f"{batch} x {context}, {heads} x {head_dim}", dtype="bf16", fn=ours,
        baseline="SDPA, contiguous K/V", baseline_fn=sdpa, bytes_moved=kv_bytes + 2 * batch * heads * head_dim * 2,
        flush_l2=True)


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


class _PagedBatch:
    """Sequences with seq_lens[s] cached tokens on shuffled pages of a [num_pages, 16, H, D] cache, the last
    q_lens[s] of which are queries."""

    def __init__(self, seq_lens: list[int], q_lens: list[int], heads: int, head_dim: int, dtype: torch.dtype,
                 device: str):
        pages = [(n + PAGE_SIZE - 1) // PAGE_SIZE for n in seq_lens]
        self.kc = torch.randn(sum(pages), PAGE_SIZE, heads, head_dim, device=device, dtype=dtype)
        self.vc = torch.randn_like(self.kc)
        order = torch.randperm(sum(pages), device=device).to(torch.int32)
        self.table = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32, device=device)
        first = 0
        for s, n in enumerate(pages):
            self.table[s, :n] = order[first:first + n]
            first += n
        self.lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        self.cu = torch.tensor([0] + q_lens, device=device).cumsum(0).to(torch.int32)
        tokens = sum(q_lens)
        self.q = torch.randn(tokens, 3, heads, head_dim, device=device, dtype=dtype)[:, 0]  # strided
        self.scale = head_dim ** -0.5
        self.seq_lens, self.q_lens = seq_lens, q_lens

    def call(self) -> torch.Tensor:
        return ops.paged_attention(self.q, self.kc, self.vc, self.table, self.lens, self.cu, self.scale,
                                   backend="cpp")

    def as_rows(self) -> "_PagedBatch":
        """The same queries as one-query sequences over the same pages (T == S: the rows kernel only)."""
        rows = object.__new__(_PagedBatch)
        rows.kc, rows.vc, rows.q, rows.scale = self.kc, self.vc, self.q, self.scale
        seq = torch.repeat_interleave(torch.arange(len(self.q_lens), device=self.q.device),
                                      torch.tensor(self.q_lens, device=self.q.device))
        rows.table = self.table[seq].contiguous()
        first = torch.repeat_interleave(self.lens - torch.diff(self.cu), torch.tensor(self.q_lens,
                                                                                      device=self.q.device))
        rows.lens = (first + torch.arange(len(seq), device=self.q.device) - self.cu[seq] + 1).to(torch.int32)
        rows.cu = torch.arange(len(seq) + 1, dtype=torch.int32, device=self.q.device)
        return rows

    def flops(self) -> float:
        heads, head_dim = self.q.shape[1], self.q.shape[2]
        pairs = sum(q * (n - q) + q * (q + 1) // 2 for n, q in zip(self.seq_lens, self.q_lens))
        return 4.0 * pairs * heads * head_dim


def _paged_prefill_cases(prefix: int, new: int, device: str, heads: int = 32, head_dim: int = 80) -> list[Case]:
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    batch = _PagedBatch([prefix + new], [new], heads, head_dim, dt, device)
    rows = batch.as_rows()
    ctx = prefix + new
    k_dense = batch.kc[batch.table[0].long()].reshape(-1, heads, head_dim)[:ctx].transpose(0, 1).unsqueeze(0)
    v_dense = batch.vc[batch.table[0].long()].reshape(-1, heads, head_dim)[:ctx].transpose(0, 1).unsqueeze(0)
    k_dense, v_dense = k_dense.contiguous(), v_dense.contiguous()  # [1, H, ctx, D]
    q_dense = batch.q.transpose(0, 1).unsqueeze(0).contiguous()  # [1, H, new, D]
    mask = causal_lower_right(new, ctx)

    def sdpa():
        return F.scaled_dot_product_attention(q_dense, k_dense, v_dense, attn_mask=mask, scale=batch.scale)

    shape = f"{prefix} cached + {new} new, {heads} x {head_dim}"
    name, dtype = "paged_attention prefill chunk", "bf16" if device == "cuda" else "fp32"
    return [Case(name=name, shape=shape, dtype=dtype, fn=batch.call, baseline="rows path (one query per block)",
                 baseline_fn=rows.call, flops=batch.flops()),
            Case(name=name, shape=shape, dtype=dtype, fn=batch.call, baseline="SDPA, contiguous K/V, lower-right "
                 "causal", baseline_fn=sdpa, flops=batch.flops())]


def _mixed_case(device: str, heads: int = 32, head_dim: int = 80) -> Case:
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    decode, chunk = [700] * 4, (35, 128)
    mixed = _PagedBatch(decode + [sum(chunk)], [1] * 4 + [chunk[1]], heads, head_dim, dt, device)
    parts = [_PagedBatch(decode, [1] * 4, heads, head_dim, dt, device),
             _PagedBatch([sum(chunk)], [chunk[1]], heads, head_dim, dt, device)]

    def separately():
        return [part.call() for part in parts]

    return Case(name="paged_attention mixed step", shape=f"4 decode x 700 + {chunk[1]} after {chunk[0]}, "
                f"{heads} x {head_dim}", dtype="bf16" if device == "cuda" else "fp32", fn=mixed.call,
                baseline="the two parts as two calls", baseline_fn=separately, flops=mixed.flops())


def make_cases(device: str = "cuda") -> list[Case]:
    paged = _paged_prefill_cases(35, 600, device) + _paged_prefill_cases(600, 32, device) + [_mixed_case(device)]
    if device == "cpu":  # decode at batch 1: after an image prompt, and at a longer context
        return [_decode_case(1, 620, device="cpu"), _decode_case(1, 2000, device="cpu"), *paged]
    return [_decode_case(1, 640), _decode_case(32, 2048), _decode_case(64, 700),
            _prefill_case(640, 32, 80, True), _prefill_case(2048, 32, 80, True), _prefill_case(577, 16, 64, False),
            *paged]


if __name__ == "__main__":
    run_suite("kernels-attention", make_cases, cpu=True)
