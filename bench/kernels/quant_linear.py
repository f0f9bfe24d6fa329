"""W8A16 / W4A16 quantized linear (csrc/cuda/quant_linear.cu) at Phi-2's shapes vs torch's bf16 matmul.

    python -m bench.kernels.quant_linear [--iters N] [--out DIR]

Decode (M = 1, 4, 16; L2 flushed before every launch, so the weights come from HBM): our GEMV over packed int8
(per-channel scales) and int4 (groups of 32) weights, GB/s of the compulsory bytes (packed weights + scales + x +
out) next to the measured copy bandwidth; the baseline is F.linear in bf16 on the same shape, whose weights are 2x
(int8) or ~3.6x (int4) the bytes. Prompt (M = 620, an image prompt): dequantize tiles + cuBLAS vs F.linear bf16,
in TFLOP/s. Floors and predictions: bench/NOTES.md ("CUDA quantized linear").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import Case, run_suite
from phi_fast import ops
from phi_fast.quant import QuantConfig, quantize

# (name, in_features K, out_features N) of Phi-2's linears
SHAPES = [("qkv", 2560, 7680), ("fc1", 2560, 10240), ("fc2", 10240, 2560), ("lm_head", 2560, 51200)]
CONFIGS = [("int8", QuantConfig("int8")), ("int4 g32", QuantConfig("int4", 32))]


def make_cases() -> list[Case]:
    dt = torch.bfloat16
    cases = []
    for name, k, n in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=dt) * k ** -0.5
        b = torch.randn(n, device="cuda", dtype=dt)
        for label, cfg in CONFIGS:
            q = quantize(w, cfg)
            packed_bytes = q.nbytes
            for m in (1, 4, 16, 620):
                x = torch.randn(m, k, device="cuda", dtype=dt)
                decode = m <= 16
                cases.append(Case(
                    name=f"{name} {label}", shape=f"[{m}, {k}] x [{n}, {k}]", dtype="bf16",
                    fn=lambda x=x, q=q: ops.linear(x, q, b, backend="cpp"),
                    baseline="F.linear bf16", baseline_fn=lambda x=x, w=w: F.linear(x, w, b),
                    bytes_moved=packed_bytes + 2.0 * (m * k + m * n + n) if decode else 0.0,
                    flops=2.0 * m * k * n, flush_l2=decode))
            del q
    return cases


if __name__ == "__main__":
    run_suite("kernels-quant_linear", make_cases)
