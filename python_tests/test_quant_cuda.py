"""The CUDA quantized kernels (csrc/cuda/quant_linear.cu) vs phi_fast.reference: ops.quant_linear (W8A16 / W4A16
GEMV for M <= 16; dequantized tiles into torch's GEMM above) and ops.dequantize, over int8 and int4 with groups of
32/64/128, fp32/fp16/bf16 activations, K and N off every chunk, group and block boundary, bias or not, strided x.

Targets as in test_ops_cuda.py: "cuda" (marker `cuda`, needs a GPU) and the SIMT emulator in two thread orders
("sim_forward", "sim_reverse", marker `cuda_sim`), outputs NaN-poisoned. Unlike the CPU kernels, the CUDA ones
keep x as it is (no int8 activations): the decode kernel's products are the reference's (exactly dequantized
weights times x in fp32), summed in another order, so fp32 is held to a few ulps and fp16/bf16 to the output's
rounding. Prompts (M > 16) multiply weight tiles rounded to x's dtype: held to the reference over those rounded
weights. Dequantization is exact: bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch

from phi_fast import ops, reference
from phi_fast.quant import QuantConfig, QuantizedWeight, quantize

from cuda_targets import TARGETS, on_target

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (1e-4, 2e-3), torch.bfloat16: (1e-4, 1.6e-2)}  # (atol, rtol)
CONFIGS = [QuantConfig("int8"), QuantConfig("int4", 32), QuantConfig("int4", 64), QuantConfig("int4", 128)]
IDS = ["int8", "int4g32", "int4g64", "int4g128"]
DEV = "cuda"
BACKEND = "cpp"


@pytest.fixture(autouse=True, params=TARGETS)
def target(request, sim_order, nan_filled_outputs_cpu):
    """Runs the test on CUDA tensors with the compiled kernels, or on CPU tensors under the SIMT emulator."""
    global DEV, BACKEND
    with on_target(request.param, sim_order, nan_filled_outputs_cpu) as (DEV, BACKEND):
        yield request.param
    DEV, BACKEND = "cuda", "cpp"


def _randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEV)


def _weight(n: int, k: int, cfg: QuantConfig, seed: int = 0) -> QuantizedWeight:
    """Quantized on the CPU (as load() does), then moved to the target's device."""
    w = quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / max(k, 1) ** 0.5, cfg)
    return QuantizedWeight(w.qweight.to(DEV), w.scales.to(DEV), w.in_features)


def _poison_next_alloc(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """On CUDA, leaves a freed NaN-filled block of the output's size for the op's torch.empty (on the CPU the
    target fixture has every new tensor NaN-filled)."""
    if DEV == "cuda":
        # freed at once, back into the allocator's cache
        torch.full((math.prod(shape) * torch.finfo(dtype).bits // 8,), 0xFF, dtype=torch.uint8, device=DEV)


def _check(x: torch.Tensor, w: QuantizedWeight, b: torch.Tensor | None, what: str) -> None:
    m, n = x.shape[0], w.out_features
    _poison_next_alloc((m, n), x.dtype)
    out = ops.linear(x, w, b, backend=BACKEND)
    deq = reference.dequantize(w.qweight, w.scales, w.in_features)
    if m > 16 and x.dtype != torch.float32:  # prompts: weight tiles in x's dtype into the GEMM
        deq = deq.to(x.dtype).float()
    ref = torch.nn.functional.linear(x.float(), deq, b.float() if b is not None else None).to(x.dtype)
    assert (out.dtype, out.shape, out.device) == (ref.dtype, ref.shape, ref.device), f"{what}: {out.dtype} {out.shape}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten elements?)"
    atol, rtol = TOL[x.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol, msg=lambda s: f"{what}: {s}")


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("k", [1, 17, 33, 100, 160, 300])
def test_dequantize_matches_reference_exactly(cfg, k):
    w = _weight(13, k, cfg, seed=k)
    _poison_next_alloc((13, k), torch.float32)
    out = ops.dequantize(w.qweight, w.scales, k, backend=BACKEND)
    assert out.shape == (13, k) and out.is_contiguous()
    assert torch.equal(out, reference.dequantize(w.qweight, w.scales, k))


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", [(1, 5), (33, 9), (100, 7), (160, 4), (300, 37)])
def test_quant_linear_odd_sizes(cfg, dtype, k, n):
    """K off the 16/32-weight chunks and the groups (int8 rows unaligned unless K % 16 == 0), N off the 4-row
    blocks; M = 1 with bias, 3 without."""
    w = _weight(n, k, cfg, seed=k + n)
    for m, with_bias in ((1, True), (3, False)):
        b = _randn(n, dtype=dtype, seed=5) if with_bias else None
        _check(_randn(m, k, dtype=dtype, seed=m), w, b, f"M={m} K={k} N={n} {dtype} {cfg}")


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_linear_every_m(cfg, dtype):
    """Every decode M (1..16: the M-tiles 1, 2, 4, 8, 16 and the rows they leave idle), then the prompt path (17,
    40) with N over several 4-row blocks."""
    w = _weight(22, 200, cfg, seed=3)
    b = _randn(22, dtype=dtype, seed=4)
    for m in list(range(1, 18)) + [40]:
        _check(_randn(m, 200, dtype=dtype, seed=m), w, b if m % 2 else None, f"M={m} {dtype} {cfg}")


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("k", [2112, 4200])
def test_quant_linear_full_blocks(cfg, k):
    """Rows of more than 128 chunks: 128-thread blocks whose threads loop over chunks and whose four warps are
    summed in shared memory (int8 K = 2112: aligned rows; 4200: unaligned rows, scalar loads)."""
    w = _weight(6, k, cfg, seed=k)
    for m in (1, 5):
        _check(_randn(m, k, dtype=torch.bfloat16, seed=m), w, _randn(6, dtype=torch.bfloat16, seed=2),
               f"M={m} K={k} {cfg}")


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=IDS[:2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pad", [8, 3])
def test_quant_linear_strided_x(cfg, dtype, pad):
    """x a view with a row stride (like qkv[:, 0]): 4-wide loads when the stride allows, scalar ones when not."""
    w = _weight(9, 256, cfg, seed=8)
    for m in (1, 6, 20):
        x = _randn(m, 256 + pad, dtype=dtype, seed=m)[:, :256]
        _check(x, w, None, f"pad={pad} M={m} {dtype}")


def test_quant_linear_empty_and_bad_input():
    w = _weight(8, 64, CONFIGS[1])
    assert ops.linear(torch.zeros(0, 64, device=DEV), w, None, backend=BACKEND).shape == (0, 8)
    with pytest.raises(ValueError, match="in_features is 65"):
        ops.quant_linear(torch.zeros(1, 65, device=DEV), w.qweight, w.scales, backend=BACKEND)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        ops.quant_linear(torch.zeros(1, 64, device=DEV), w.qweight, w.scales, torch.zeros(9, device=DEV),
                         backend=BACKEND)
    with pytest.raises(RuntimeError, match="qweight has dtype float32"):
        ops.quant_linear(torch.zeros(1, 64, device=DEV), w.qweight.float(), w.scales, backend=BACKEND)


def test_quant_linear_is_graph_capturable(target):
    """Decode (M = 4) and prompt (M = 40) calls captured in a CUDA graph replay to the eager result: no host sync,
    no allocation outside torch's allocator, the current stream."""
    if target != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    w = _weight(300, 2560, CONFIGS[1], seed=1)
    b = _randn(300, dtype=torch.bfloat16, seed=2)
    xs = [_randn(m, 2560, dtype=torch.bfloat16, seed=m) for m in (4, 40)]
    eager = [ops.linear(x, w, b) for x in xs]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        [ops.linear(x, w, b) for x in xs]  # warm-up off the default stream, as capture requires
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = [ops.linear(x, w, b) for x in xs]
    for x, seed in zip(xs, (7, 8)):
        x.copy_(_randn(*x.shape, dtype=x.dtype, seed=seed))
    graph.replay()
    for x, got in zip(xs, captured):
        torch.testing.assert_close(got, ops.linear(x, w, b), atol=0, rtol=0)
    assert not all(torch.equal(a, c) for a, c in zip(eager, captured)), "replay did not recompute"
