"""Quantized weights on the CPU: the packing (phi_fast.quant), ops.dequantize and ops.quant_linear
(csrc/cpu/quant_linear.cpp for M <= 16, csrc/cpu/quant_gemm.cpp above, or dequantized tiles into torch's GEMM
on AMX CPUs) vs phi_fast.reference, and the tiled fp32 path of ops.linear for 16-bit weights on CPUs without
native bf16 dot products.

Outputs the ops allocate come back NaN-filled unless written (nan_filled_outputs), so an element a kernel fails
to write fails the test. Dequantization is exact (the same single rounding of (q - 8) * scale), so it must match
bit for bit; products are sums in another order: fp32 to a few ulps of the sum, fp16/bf16 to about two ulps.
The AVX-512, AVX2 and portable paths all run here: the last two in child processes with PHI_FAST_CPU_NO_AVX512=1
or PHI_FAST_CPU_PORTABLE=1, and the dequantizing prompt path with PHI_FAST_CPU_DEQUANT_PROMPTS=1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import phi_fast
from phi_fast import ops, reference
from phi_fast.quant import QuantConfig, QuantizedWeight, is_quantized_name, quantize

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (1e-4, 2e-3), torch.bfloat16: (1e-4, 1.6e-2)}  # (atol, rtol)
CONFIGS = [QuantConfig("int8"), QuantConfig("int4", 32), QuantConfig("int4", 64), QuantConfig("int4", 128)]
IDS = ["int8", "int4g32", "int4g64", "int4g128"]
CPP = "cpp"


def _randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _weight(n: int, k: int, cfg: QuantConfig, seed: int = 0) -> QuantizedWeight:
    return quantize(_randn(n, k, seed=seed) / max(k, 1) ** 0.5, cfg)


def _run_child(code: str, **env: str) -> None:
    """Run code in a child process with extra environment (the kernels' path switches are read once per process)."""
    paths = [str(Path(phi_fast.__file__).parents[1]), str(Path(__file__).parent), os.environ.get("PYTHONPATH")]
    full = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    result = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


# ---- the formats -----------------------------------------------------------------------------------------------


def test_int4_packing_layout():
    """One group of 32 whose q values are known: byte i = (q[i] + 8) | (q[i + 16] + 8) << 4, scale = extreme / -8."""
    q = torch.tensor(list(range(-8, 8)) + list(range(7, -9, -1)), dtype=torch.float32)  # [32], extreme -8
    w = (q * 0.5)[None]  # scale 0.5: the extreme -4.0 maps to -8
    packed = quantize(w, QuantConfig("int4", 32))
    expected = [(int(q[i]) + 8) | ((int(q[i + 16]) + 8) << 4) for i in range(16)]
    assert packed.qweight.dtype == torch.uint8 and packed.qweight.tolist() == [expected]
    assert packed.scales.tolist() == [[0.5]]
    assert torch.equal(packed.dequantize(), w)


def test_int8_format():
    w = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    packed = quantize(w, QuantConfig("int8"))
    assert packed.qweight.dtype == torch.int8
    assert packed.qweight.tolist() == [[64, -127, 32, 0], [0, 0, 0, 0]]  # round(w / (2 / 127))
    assert torch.allclose(packed.scales, torch.tensor([2.0 / 127, 0.0]))
    assert torch.equal(packed.dequantize()[1], torch.zeros(4))


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("k", [1, 31, 33, 100, 257])
def test_quantization_error_is_at_most_one_step(cfg, k):
    """Every weight is within half a step of its dequantized value (a full step where int4 clamps +8 to +7), the
    group's extreme comes back to within its fp16 scale's rounding (int4), and padding past K never shows."""
    w = _randn(19, k, seed=k) * torch.linspace(0.01, 3.0, 19)[:, None]
    packed = quantize(w, cfg)
    deq = packed.dequantize()
    assert deq.shape == (19, k) and packed.in_features == k
    if cfg.format == "int8":
        step = packed.scales[:, None].expand(19, k)
        assert (w - deq).abs().le(step * 0.5 + 1e-7).all()
    else:
        kp = -(-k // cfg.group_size) * cfg.group_size
        assert packed.qweight.shape == (19, kp // 2) and packed.scales.shape == (19, kp // cfg.group_size)
        step = packed.scales.abs().repeat_interleave(cfg.group_size, dim=1)[:, :k]
        assert (w - deq).abs().le(step * (1 + 1e-6)).all()
    if cfg.format == "int4":
        assert packed.scales.dtype == torch.float16
        extreme = w.abs().argmax(dim=1, keepdim=True)
        exact = w.gather(1, extreme)
        assert (deq.gather(1, extreme) - exact).abs().le(exact.abs() * 2.0**-11).all()  # fp16: 11 significant bits


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="unsupported quantize 'int3'"):
        QuantConfig("int3")
    with pytest.raises(ValueError, match="unsupported int4 group_size 48"):
        QuantConfig("int4", 48)
    with pytest.raises(ValueError, match=r"weight must be 2-D \[N, K\], got shape \[4\]"):
        quantize(torch.ones(4), QuantConfig("int8"))
    huge = torch.ones(2, 32)
    huge[1, 3] = 6e5  # its group's scale 6e5 / 8 is past fp16's 65504
    with pytest.raises(ValueError, match=r"a weight of magnitude 600000 is beyond what fp16 group scales hold"):
        quantize(huge, QuantConfig("int4"))
    huge[1, 3] = float("nan")
    with pytest.raises(ValueError, match="the weight holds NaN"):
        quantize(huge, QuantConfig("int4"))


def test_int4_tiny_groups_flush_to_zero_not_nan():
    """Group scales below fp16's smallest subnormal become 0: the group dequantizes to zeros, never NaN."""
    w = torch.ones(1, 64)
    w[0, 32:] = 1e-9
    deq = quantize(w, QuantConfig("int4")).dequantize()
    assert torch.equal(deq[0, :32], torch.ones(32)) and torch.equal(deq[0, 32:], torch.zeros(32))


def test_quantized_names():
    for name in ("text.layers.0.qkv.weight", "text.layers.31.fc2.weight", "text.lm_head.weight",
                 "projector.fc1.weight", "projector.fc2.weight", "text.layers.3.dense.weight"):
        assert is_quantized_name(name), name
    for name in ("text.embed", "text.layers.0.qkv.bias", "vision.layers.0.qkv.weight", "vision.patch.weight",
                 "text.layers.0.ln.weight"):
        assert not is_quantized_name(name), name


# ---- kernels vs reference -------------------------------------------------------------------------------------


@pytest.mark.usefixtures("nan_filled_outputs")
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("k", [1, 17, 32, 33, 100, 513, 1000])
def test_dequantize_matches_reference_exactly(cfg, k):
    packed = _weight(13, k, cfg, seed=k)
    out = ops.dequantize(packed.qweight, packed.scales, k, backend=CPP)
    assert torch.equal(out, reference.dequantize(packed.qweight, packed.scales, k))


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] as the decode kernels see it: int8 per block of 32 inputs, scale max|x| / 127, round half to even,
    back to fp32 (the kernels' exact products of these values are the reference for M <= 16)."""
    m, k = x.shape
    xf = torch.nn.functional.pad(x.float(), (0, -k % 32)).view(m, -1, 32)
    amax = xf.abs().amax(dim=2, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, 0.0)  # (127.0 / t is t.reciprocal() * 127)
    q = torch.round(xf * inv).clamp(-127, 127)
    return (q * (amax / 127.0)).view(m, -1)[:, :k]


def _check(x: torch.Tensor, w: QuantizedWeight, b: torch.Tensor | None, what: str) -> None:
    out = ops.linear(x, w, b, backend=CPP)
    ref = reference.quant_linear(x, w.qweight, w.scales, b)
    int8_x = x.shape[0] <= 16 or ops.cpu_features()["int8_prompts"]
    if int8_x:  # decode, and prompts on the integer GEMM: activations quantized to int8 blocks on the fly
        ref = reference.quant_linear(quantized_activations(x), w.qweight, w.scales,
                                     b.float() if b is not None else None).to(x.dtype)
    assert (out.dtype, out.shape) == (ref.dtype, ref.shape), f"{what}: {out.dtype} {out.shape} vs {ref.shape}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten elements?)"
    if x.dtype == torch.bfloat16 and not int8_x and ops.cpu_features()["native_bf16"]:
        # Prompts on CPUs with bf16 dot products multiply bf16-rounded weight tiles: held to twice the error of
        # that rounding itself (the reference's fp32 math over the same bf16 weights).
        exact = reference.quant_linear(x.float(), w.qweight, w.scales, b.float() if b is not None else None)
        rounded = reference.linear(x, w.dequantize().bfloat16(), b).float()
        bound = 2 * (rounded - exact).abs().max() + 1e-3
        assert (out.float() - exact).abs().max() <= bound, f"{what}: error above twice bf16 weight rounding's"
        return
    atol, rtol = TOL[x.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.usefixtures("nan_filled_outputs")
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", [(1, 5), (33, 9), (100, 7), (1000, 37), (1100, 4)])
def test_quant_linear_odd_sizes(cfg, dtype, k, n):
    """K not a multiple of the group or of the chunk (512), N around the 4-row blocks; M = 1 and 3."""
    w = _weight(n, k, cfg, seed=k + n)
    for m, with_bias in ((1, True), (3, False)):
        x = _randn(m, k, dtype=dtype, seed=m)
        b = _randn(n, dtype=dtype, seed=5) if with_bias else None
        _check(x, w, b, f"M={m} K={k} N={n} {dtype} {cfg}")


@pytest.mark.usefixtures("nan_filled_outputs")
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_unit_tails_and_uneven_scales(cfg, dtype):
    """K around the VNNI kernel's units (int8: 64 inputs, tails of 1..63 bytes; int4: 128, a last unit holding 1..3 runs), N
    around its 4-row blocks, M = 1, 2, 3. Every block of 32 inputs of x and every weight group sits at its own
    magnitude (factors 1/4 .. 4), so a block or group scale applied to another block's lanes shows."""
    for k in (31, 32, 63, 64, 65, 96, 97, 127, 128, 129, 160, 191, 224, 225, 257):
        weight_level = 2.0 ** (torch.arange(k) // 32 % 5 - 2).float()
        x_level = 2.0 ** -(torch.arange(k) // 32 % 3).float()
        for n in (1, 4, 7):
            w = quantize(_randn(n, k, seed=k * n) * weight_level / k ** 0.5, cfg)
            for m in (1, 2, 3):
                x = (_randn(m, k, seed=m + k) * x_level).to(dtype)
                _check(x, w, _randn(n, dtype=dtype, seed=n) if m == 2 else None, f"M={m} K={k} N={n} {dtype} {cfg}")


@pytest.mark.usefixtures("nan_filled_outputs")
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_linear_every_m(cfg, dtype):
    """Every decode M (1..16, the kernel), then the tiled prefill path (17, 600) with N over several tiles."""
    w = _weight(530, 300, cfg, seed=3)
    b = _randn(530, dtype=dtype, seed=4)
    for m in list(range(1, 18)) + [600]:
        _check(_randn(m, 300, dtype=dtype, seed=m), w, b if m % 2 else None, f"M={m} {dtype} {cfg}")


@pytest.mark.usefixtures("nan_filled_outputs")
@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=IDS[:2])
def test_quant_linear_strided_x(cfg):
    """x a view with a row stride, like qkv[:, 0]."""
    w = _weight(45, 2560, cfg, seed=8)
    for m in (1, 5, 16, 20):
        _check(_randn(m, 3, 2560, seed=m)[:, 0], w, None, f"qkv[:, 0] M={m}")


@pytest.mark.usefixtures("nan_filled_outputs")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_quant_linear_on_every_thread_split(torch_threads):
    """Weights of MBs fork a team that splits N; N = 3001 leaves a ragged last block."""
    for cfg in (CONFIGS[0], CONFIGS[2]):
        w = _weight(3001, 2560, cfg, seed=torch_threads)
        for m in (1, 4, 13, 37):
            _check(_randn(m, 2560, seed=m), w, _randn(3001, seed=2), f"{torch_threads} threads M={m} {cfg}")


def test_quant_linear_empty():
    w = _weight(8, 64, CONFIGS[1])
    out = ops.linear(torch.zeros(0, 64), w, None, backend=CPP)
    assert out.shape == (0, 8)


_CHILD_CHECK = (
    "import torch\n"
    "from test_quant_kernels import quantized_activations\n"
    "from phi_fast import ops, reference\n"
    "from phi_fast.quant import QuantConfig, quantize\n"
    "assert ops.cpu_features() == EXPECTED, ops.cpu_features()\n"
    "torch.manual_seed(0)\n"
    "for cfg in (QuantConfig('int8'), QuantConfig('int4', 32), QuantConfig('int4', 128)):\n"
    "    for m, k, n in ((1, 17, 9), (5, 1023, 1000), (16, 80, 7), (40, 300, 70), (23, 1100, 19)):\n"
    "        for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2)):\n"
    "            w = quantize(torch.randn(n, k) / k ** 0.5, cfg)\n"
    "            x, b = torch.randn(m, k).to(dtype), torch.randn(n).to(dtype)\n"
    "            assert torch.equal(ops.dequantize(w.qweight, w.scales, k, backend='cpp'), w.dequantize())\n"
    "            xr = quantized_activations(x) if m <= 16 or EXPECTED['int8_prompts'] else x.float()\n"
    "            ref = reference.quant_linear(xr, w.qweight, w.scales, b.float())\n"
    "            torch.testing.assert_close(ops.linear(x, w, b, backend='cpp').float(), ref, atol=tol, rtol=tol)\n"
)


def test_quant_linear_avx2_path():
    """The AVX2 loops (CPUs without AVX-512), forced by PHI_FAST_CPU_NO_AVX512=1."""
    if not ops.cpu_features()["avx2"]:
        pytest.skip("this CPU has no AVX2")
    expected = dict(ops.cpu_features(), avx2=True, avx512=False)
    _run_child(f"EXPECTED = {expected!r}\n" + _CHILD_CHECK, PHI_FAST_CPU_NO_AVX512="1")


def test_quant_linear_portable_path():
    """The portable loops, forced by PHI_FAST_CPU_PORTABLE=1."""
    expected = dict(ops.cpu_features(), avx2=False, avx512=False)
    _run_child(f"EXPECTED = {expected!r}\n" + _CHILD_CHECK, PHI_FAST_CPU_PORTABLE="1")


def test_quant_linear_dequantizing_prompt_path():
    """Prompts through dequantized tiles into torch's GEMM (AMX CPUs; PHI_FAST_CPU_DEQUANT_PROMPTS=1 forces it):
    x exact, so the reference's fp32 math (bf16 x with native bf16 is covered by _check on such CPUs)."""
    expected = dict(ops.cpu_features(), int8_prompts=False, native_bf16=False)
    _run_child(f"EXPECTED = {expected!r}\n" + _CHILD_CHECK, PHI_FAST_CPU_DEQUANT_PROMPTS="1", PHI_FAST_CPU_NO_BF16="1")


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_prompt_matches_decode_rows(cfg, dtype):
    """A prompt's rows come out as decode steps of the same rows would (the same int8 activations and integer
    sums; only the fp32 order of the per-block terms differs), so a prompt and its decode agree."""
    if not ops.cpu_features()["int8_prompts"]:
        pytest.skip("this CPU's prompts take dequantized tiles (AMX)")
    w = _weight(530, 1100, cfg, seed=11)
    x, b = _randn(45, 1100, dtype=dtype, seed=12), _randn(530, dtype=dtype, seed=13)
    prompt = ops.linear(x, w, b, backend=CPP)
    decode = torch.cat([ops.linear(x[i:i + 1], w, b, backend=CPP) for i in range(x.shape[0])])
    ulp = 1e-5 if dtype == torch.float32 else 8e-3  # a few fp32 roundings; one bf16 rounding step either way
    torch.testing.assert_close(prompt.float(), decode.float(), atol=ulp, rtol=ulp)


# ---- 16-bit weights for prompts without native bf16 ------------------------------------------------------------

_CHILD_LINEAR = (
    "import torch\n"
    "from phi_fast import ops, reference\n"
    "assert ops.cpu_features()['native_bf16'] == NATIVE, ops.cpu_features()\n"
    "torch.manual_seed(0)\n"
    "for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float16, 2e-3)):\n"
    "    for m, k, n in ((2, 64, 9), (17, 300, 530), (600, 200, 70)):\n"
    "        x, b = torch.randn(m, k).to(dtype), torch.randn(n).to(dtype)\n"
    "        w = (torch.randn(n, k) / k ** 0.5).to(dtype)\n"
    "        for bias in (b, None):\n"
    "            out = ops.linear(x, w, bias, backend='cpp')\n"
    "            assert out.dtype == dtype and out.shape == (m, n)\n"
    "            torch.testing.assert_close(out.float(), reference.linear(x, w, bias).float(), atol=tol, rtol=tol)\n"
)


@pytest.mark.parametrize("native", [True, False])
def test_linear_16bit_prompts_with_and_without_native_bf16(native):
    """bf16 / fp16 linear at prompt sizes: torch's GEMM with native bf16, else fp32 tiles (PHI_FAST_CPU_NO_BF16=1)."""
    if native and not ops.cpu_features()["native_bf16"]:
        pytest.skip("this CPU has no native bf16 dot products")
    env = {} if native else {"PHI_FAST_CPU_NO_BF16": "1"}
    _run_child(f"NATIVE = {native!r}\n" + _CHILD_LINEAR, **env)


# ---- errors ----------------------------------------------------------------------------------------------------


def _error_cases() -> dict[str, tuple]:
    """name: (call, exception type, pattern its message must match)."""
    x = torch.randn(4, 100)
    w8, w4 = _weight(16, 100, CONFIGS[0]), _weight(16, 100, CONFIGS[2])  # int4: Kp = 128, 2 groups
    return {
        "K mismatch int8": (lambda: ops.quant_linear(torch.randn(4, 99), w8.qweight, w8.scales, backend=CPP),
                            RuntimeError, r"quant_linear: qweight must have shape \[N, K\] = \[\*, 99\], got \[16, 100\]"),
        "K too small int4": (lambda: ops.quant_linear(torch.randn(4, 64), w4.qweight, w4.scales, backend=CPP),
                             ValueError, r"holds 65..128 inputs, but in_features is 64"),
        "bad group": (lambda: ops.quant_linear(x, w4.qweight, w4.scales[:, :1].repeat(1, 3).contiguous(),
                                               backend=CPP), ValueError, r"power of two >= 32"),
        "scales dtype": (lambda: ops.quant_linear(x, w8.qweight, w8.scales.half(), backend=CPP),
                         RuntimeError, r"quant_linear: scales has dtype float16, expected float32"),
        "int4 scales dtype": (lambda: ops.quant_linear(x, w4.qweight, w4.scales.float(), backend=CPP),
                              RuntimeError, r"quant_linear: scales has dtype float32, expected float16"),
        "scales shape": (lambda: ops.quant_linear(x, w8.qweight, w8.scales[:15], backend=CPP),
                         RuntimeError, r"quant_linear: scales must have shape \[N\] = \[16\], got \[15\]"),
        "qweight dtype": (lambda: ops.quant_linear(x, w8.qweight.int(), w8.scales, backend=CPP),
                          RuntimeError, r"qweight has dtype int32, expected int8 \(int8 format\) or uint8"),
        "bias shape": (lambda: ops.quant_linear(x, w8.qweight, w8.scales, torch.randn(15), backend=CPP),
                       RuntimeError, r"quant_linear: bias must have shape \[N\] = \[16\], got \[15\]"),
        "bias dtype": (lambda: ops.quant_linear(x, w8.qweight, w8.scales, torch.randn(16).half(), backend=CPP),
                       RuntimeError, r"quant_linear: bias has dtype float16, expected float32"),
        "x dtype": (lambda: ops.quant_linear(x.int(), w8.qweight, w8.scales, backend=CPP),
                    RuntimeError, r"quant_linear: x has unsupported dtype int32"),
        "transposed qweight": (lambda: ops.quant_linear(torch.randn(4, 16), w8.qweight[:, :16].t(), w8.scales[:16],
                                                        backend=CPP), RuntimeError, r"qweight must be contiguous"),
    }


@pytest.mark.parametrize("name", list(_error_cases()))
def test_quant_linear_errors_name_the_problem(name):
    call, error, pattern = _error_cases()[name]
    with pytest.raises(error, match=pattern):
        call()


def test_ops_document_the_reference_contract():
    assert ops.quant_linear.__doc__ == reference.quant_linear.__doc__
    assert ops.dequantize.__doc__ == reference.dequantize.__doc__
