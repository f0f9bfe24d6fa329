"""LayerNorm family on the real shapes (Phi-2 hidden 2560, CLIP 1024 x 577) vs PyTorch in the same run.

    python -m bench.kernels.norm [--iters N] [--out DIR]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import Case, run_suite
from phi_fast import ops

EPS = 1e-5


def make_cases() -> list[Case]:
    dt, size = torch.bfloat16, 2
    cases = []
    for tokens in (1, 64, 640, 2048):
        c = 2560
        x, a, b = (torch.randn(tokens, c, device="cuda", dtype=dt) for _ in range(3))
        w, bias = torch.randn(c, device="cuda", dtype=dt), torch.randn(c, device="cuda", dtype=dt)
        decode = tokens <= 64
        cases.append(Case(
            name="layernorm", shape=f"[{tokens}, {c}]", dtype="bf16",
            fn=lambda x=x, w=w, bias=bias: ops.layernorm(x, w, bias, EPS, backend="cpp"),
            baseline="F.layer_norm",
            baseline_fn=lambda x=x, w=w, bias=bias: F.layer_norm(x, (x.shape[-1],), w, bias, EPS),
            bytes_moved=size * (2 * tokens * c + 2 * c), flush_l2=decode))
        cases.append(Case(
            name="add_layernorm", shape=f"[{tokens}, {c}]", dtype="bf16",
            fn=lambda x=x, a=a, b=b, w=w, bias=bias: ops.add_layernorm(x, a, b, w, bias, EPS, backend="cpp"),
            baseline="s = a + b + x; F.layer_norm(s)",
            baseline_fn=lambda x=x, a=a, b=b, w=w, bias=bias: _torch_add_layernorm(x, a, b, w, bias),
            bytes_moved=size * (5 * tokens * c + 2 * c), flush_l2=decode))
    batch, patches, c = 1, 576, 1024
    p = torch.randn(batch, patches, c, device="cuda", dtype=dt)
    cls = torch.randn(c, device="cuda", dtype=dt)
    pos = torch.randn(patches + 1, c, device="cuda", dtype=dt)
    w, bias = torch.randn(c, device="cuda", dtype=dt), torch.randn(c, device="cuda", dtype=dt)
    cases.append(Case(
        name="embed_layernorm", shape=f"[{batch}, {patches}, {c}]", dtype="bf16",
        fn=lambda: ops.embed_layernorm(p, cls, pos, w, bias, EPS, backend="cpp"),
        baseline="cat + add + F.layer_norm",
        baseline_fn=lambda: F.layer_norm(torch.cat((cls.expand(batch, 1, c), p), 1) + pos, (c,), w, bias, EPS),
        bytes_moved=size * (batch * patches * c + (patches + 1) * c + batch * (patches + 1) * c + 3 * c)))
    return cases


def _torch_add_layernorm(x, a, b, w, bias):
    s = a + b + x
    return s, F.layer_norm(s, (s.shape[-1],), w, bias, EPS)


if __name__ == "__main__":
    run_suite("kernels-norm", make_cases)
