"""ops.linear on the CPU (csrc/cpu/linear.cpp for small M, torch's GEMM above) vs phi_fast.reference.

Outputs the op allocates come back NaN-filled unless written (torch's deterministic mode fills uninitialized
memory, the extension's at::empty included), so an element the kernel fails to write fails the test. Sums run
in fp32 in a different order than the reference's GEMM: fp32 is held to a few ulps of the sum's magnitude,
fp16/bf16 to about two ulps of the output.
"""

from __future__ import annotations


import pytest
import torch

from phi_fast import ops, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (1e-4, 2e-3), torch.bfloat16: (1e-4, 1.6e-2)}  # (atol, rtol)
CPP = "cpp"
pytestmark = pytest.mark.usefixtures("nan_filled_outputs")  # unwritten outputs fail


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _case(m: int, k: int, n: int, dtype: torch.dtype, with_bias: bool, row_pad: int = 0, seed: int = 0):
    """x: [m, k] with row stride k + row_pad (a view into a wider tensor when row_pad > 0); weight: [n, k]
    scaled so outputs are O(1); bias: [n] or None."""
    x = _randn(m, k + row_pad, dtype=dtype, seed=seed)[:, :k]
    w = (_randn(n, k, dtype=torch.float32, seed=seed + 1) / max(k, 1) ** 0.5).to(dtype)
    b = _randn(n, dtype=dtype, seed=seed + 2) if with_bias else None
    return x, w, b


def _check(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, what: str) -> None:
    out = ops.linear(x, w, b, backend=CPP)
    ref = reference.linear(x, w, b)
    assert (out.dtype, out.shape) == (ref.dtype, ref.shape), f"{what}: {out.dtype} {out.shape} vs {ref.shape}"
    assert out.is_contiguous(), f"{what}: output strides {out.stride()}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten elements?)"
    atol, rtol = TOL[x.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3, 17, 80, 1023])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
def test_linear_odd_sizes(dtype, k, n):
    """K around the 8-lane vectors (scalar tails), N around the 4- and 8-row blocks; M = 1 and 3, bias or not."""
    for m, with_bias in ((1, True), (3, False)):
        _check(*_case(m, k, n, dtype, with_bias, seed=k + n), f"linear M={m} K={k} N={n} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", list(range(1, 18)) + [40])
def test_linear_every_m(dtype, m):
    """Every M up to and above the kernel's limit (16; 1 for bf16: torch's GEMM above), K over several chunks of 512."""
    _check(*_case(m, 1100, 37, dtype, with_bias=m % 2 == 0, seed=m), f"linear M={m} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 5, 16])
def test_linear_strided_x(dtype, m):
    """x a view with a row stride, like qkv[:, 0] of the fused projection's output."""
    qkv = _randn(m, 3, 2560, dtype=dtype, seed=7)
    _, w, b = _case(1, 2560, 45, dtype, with_bias=True, seed=8)
    _check(qkv[:, 0], w, b, f"linear qkv[:, 0] M={m} {dtype}")
    _check(*_case(m, 80, 33, dtype, with_bias=False, row_pad=5, seed=9), f"linear padded rows M={m} {dtype}")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m", [1, 4, 13])
def test_linear_on_every_thread_split(torch_threads, m):
    """Weights of MBs fork a team that splits N; N = 3001 leaves a ragged last block on each thread count."""
    for dtype in (torch.float32, torch.bfloat16):
        _check(*_case(m, 2560, 3001, dtype, with_bias=True, seed=torch_threads),
               f"linear {torch_threads} threads {dtype}")


def test_linear_empty():
    for m, k, n in ((0, 16, 8), (3, 16, 0), (3, 0, 8)):
        x, w, b = _case(m, k, n, torch.float32, with_bias=True)
        out = ops.linear(x, w, b, backend=CPP)
        torch.testing.assert_close(out, reference.linear(x, w, b))


def test_linear_portable_path_matches_reference(run_portable):
    """The portable loops (used on CPUs without AVX2+FMA), forced by the environment."""
    code = (
        "import torch\n"
        "from phi_fast import ops, reference\n"
        "torch.manual_seed(0)\n"
        "for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2)):\n"
        "    for m, k, n in ((1, 17, 9), (5, 1023, 1000), (16, 80, 7)):\n"
        "        x, b = torch.randn(m, k).to(dtype), torch.randn(n).to(dtype)\n"
        "        w = (torch.randn(n, k) / k ** 0.5).to(dtype)\n"
        "        torch.testing.assert_close(ops.linear(x, w, b, backend='cpp').float(),\n"
        "                                   reference.linear(x, w, b).float(), atol=tol, rtol=tol)\n"
    )
    run_portable(code)


def _error_cases() -> dict[str, tuple]:
    """name: (call, pattern the RuntimeError's message must match)."""
    x, w, b = torch.randn(4, 80), torch.randn(16, 80), torch.randn(16)
    return {
        "K mismatch": (lambda: ops.linear(x, w[:, :79].contiguous(), b, backend=CPP),
                       r"linear: weight must have shape \[N, K\] = \[\*, 80\], got \[16, 79\]"),
        "bias shape": (lambda: ops.linear(x, w, b[:15], backend=CPP),
                       r"linear: bias must have shape \[N\] = \[16\], got \[15\]"),
        "x rank": (lambda: ops.linear(x[None], w, b, backend=CPP), r"linear: x must have shape \[M, K\]"),
        "weight dtype": (lambda: ops.linear(x, w.bfloat16(), b, backend=CPP),
                         r"linear: weight has dtype bfloat16, expected float32"),
        "bias dtype": (lambda: ops.linear(x.half(), w.half(), b, backend=CPP),
                       r"linear: bias has dtype float32, expected float16"),
        "int dtype": (lambda: ops.linear(x.int(), w.int(), None, backend=CPP),
                      r"linear: x has unsupported dtype int32"),
        "transposed weight": (lambda: ops.linear(x, torch.randn(80, 16).t(), b, backend=CPP),
                              r"linear: weight must be contiguous, got strides \[1, 16\]"),
        "x last stride": (lambda: ops.linear(torch.randn(80, 4).t(), w, b, backend=CPP),
                          r"linear: x must have a unit-stride last dim"),
    }


@pytest.mark.parametrize("name", list(_error_cases()))
def test_linear_errors_name_the_problem(name):
    call, pattern = _error_cases()[name]
    with pytest.raises(RuntimeError, match=pattern):
        call()


def test_linear_documents_the_reference_contract():
    assert ops.linear.__doc__ == reference.linear.__doc__
