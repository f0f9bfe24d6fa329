"""bias_gelu / bias_quick_gelu on the real shapes (Phi-2 fc1 10240, projector 2560, CLIP MLP 4096) vs PyTorch.

    python -m bench.kernels.activation [--iters N] [--out DIR]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import Case, run_suite
from phi_fast import ops


def make_cases() -> list[Case]:
    dt, size = torch.bfloat16, 2
    cases = []
    for name, tokens, width in (("phi2 fc1 gelu_new", 1, 10240), ("phi2 fc1 gelu_new", 64, 10240),
                                ("phi2 fc1 gelu_new", 640, 10240), ("phi2 fc1 gelu_new", 2048, 10240),
                                ("projector gelu erf", 576, 2560), ("clip fc1 quick_gelu", 577, 4096)):
        x = torch.randn(tokens, width, device="cuda", dtype=dt)
        bias = torch.randn(width, device="cuda", dtype=dt)
        if "quick" in name:
            fn = lambda x=x, bias=bias: ops.bias_quick_gelu(x, bias, backend="cpp")
            baseline = "h = x + b; h * sigmoid(1.702 h)"
            baseline_fn = lambda x=x, bias=bias: _torch_quick_gelu(x + bias)
        else:
            approximate = "tanh" if "gelu_new" in name else "none"
            fn = lambda x=x, bias=bias, ap=approximate: ops.bias_gelu(x, bias, ap, backend="cpp")
            baseline = f"F.gelu(x + b, approximate={approximate!r})"
            baseline_fn = lambda x=x, bias=bias, ap=approximate: F.gelu(x + bias, approximate=ap)
        cases.append(Case(name=name, shape=f"[{tokens}, {width}]", dtype="bf16", fn=fn, baseline=baseline,
                          baseline_fn=baseline_fn, bytes_moved=size * (2 * tokens * width + width),
                          flush_l2=tokens <= 64))
    return cases


def _torch_quick_gelu(h):
    return h * torch.sigmoid(1.702 * h)


if __name__ == "__main__":
    run_suite("kernels-activation", make_cases)
