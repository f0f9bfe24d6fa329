"""rotary_cache (partial rotary 32 of 80 + paged cache write) on Phi-2's shapes vs phi_fast.reference (PyTorch).

    python -m bench.kernels.rotary_cache [--iters N] [--out DIR]
"""

from __future__ import annotations

import torch

from bench.common import Case, run_suite
from phi_fast import ops, reference

HEADS, HEAD_DIM, ROTARY_DIM, PAGE_SIZE = 32, 80, 32, 16


def make_cases() -> list[Case]:
    dt, size = torch.bfloat16, 2
    cos, sin = reference.rotary_tables(ROTARY_DIM, 2048, device="cuda")
    cases = []
    for tokens in (1, 64, 640, 2048):
        qkv = torch.randn(tokens, 3, HEADS, HEAD_DIM, device="cuda", dtype=dt)
        positions = torch.randint(0, 2048, (tokens,), device="cuda")
        num_pages = (tokens + PAGE_SIZE - 1) // PAGE_SIZE + 1
        kc = torch.zeros(num_pages, PAGE_SIZE, HEADS, HEAD_DIM, device="cuda", dtype=dt)
        vc = torch.zeros_like(kc)
        slots = torch.randperm(num_pages * PAGE_SIZE, device="cuda")[:tokens]
        # q, k rotary dims read + written; k tail and v read; k and v written to the cache
        elements = tokens * HEADS * (3 * ROTARY_DIM + 4 * HEAD_DIM)
        cases.append(Case(
            name="rotary_cache", shape=f"qkv [{tokens}, 3, {HEADS}, {HEAD_DIM}], R={ROTARY_DIM}", dtype="bf16",
            fn=lambda a=(qkv, positions, cos, sin, kc, vc, slots): ops.rotary_cache(*a, backend="cpp"),
            baseline="phi_fast.reference.rotary_cache (PyTorch ops)",
            baseline_fn=lambda a=(qkv, positions, cos, sin, kc, vc, slots): reference.rotary_cache(*a),
            bytes_moved=size * elements, flush_l2=tokens <= 64))
    return cases


if __name__ == "__main__":
    run_suite("kernels-rotary_cache", make_cases)
