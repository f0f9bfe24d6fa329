"""CUDA kernels (csrc/cuda) vs phi_fast.reference: every op over fp32/fp16/bf16 and awkward shapes.

Every test runs on each target (the `target` fixture): "cuda" calls phi_fast.ops with backend=BACKEND on CUDA tensors
(marker `cuda`, needs a GPU); "sim_forward" and "sim_reverse" call backend="sim" on CPU tensors, so the same CUDA
kernel sources run under the SIMT emulator (csrc/sim, marker `cuda_sim`, any machine) with the block's threads
scheduled in two opposite orders. Outputs the op allocates are NaN-poisoned (on CUDA through the caching allocator:
a freed block of the same size, filled with 0xFF bytes = NaN in every float dtype, is what the op's torch.empty gets
back; on the CPU by torch's fill_uninitialized_memory), and caches written in place are poisoned directly, so an
element the kernel fails to write fails the test. Attention follows flash-attention's rule: the error against an
fp32 reference is at most twice that of a plain PyTorch implementation in the low-precision dtype. Shapes marked
`_sized` shrink under the emulator, keeping their boundaries (pages, tiles, splits).
"""

from __future__ import annotations

import math

import pytest
import torch

from phi_fast import ops, reference

from cuda_targets import TARGETS, on_target

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol) of an elementwise / row op against the fp32 reference rounded to the dtype: about 2 ulps.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
# The current target's device and ops backend, set by the autouse `target` fixture for each test.
DEV = "cuda"
BACKEND = "cpp"



@pytest.fixture(autouse=True, params=TARGETS)
def target(request, sim_order, nan_filled_outputs_cpu):
    """Runs the test on CUDA tensors with the compiled kernels, or on CPU tensors under the SIMT emulator."""
    global DEV, BACKEND
    with on_target(request.param, sim_order, nan_filled_outputs_cpu) as (DEV, BACKEND):
        yield request.param
    DEV, BACKEND = "cuda", "cpp"


def _sized(full, emulated):
    """`full` on a GPU, the smaller `emulated` under the emulator (it runs each thread as a CPU fiber)."""
    return emulated if BACKEND == "sim" else full


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def _randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=_gen(seed), device=DEV) * scale).to(dtype)


def _strided(rows: int, cols: int, pad: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    """[rows, cols] view with row stride cols + pad (pad 0 = contiguous; a pad that is not a multiple of 8 makes
    the rows unaligned for 16-byte loads, which exercises the kernels' scalar path)."""
    return _randn(rows, cols + pad, dtype=dtype, seed=seed, scale=scale)[:, :cols]


def _poison_next_alloc(*shapes_dtypes: tuple[tuple[int, ...], torch.dtype]) -> None:
    """Leaves freed, NaN-filled blocks of these sizes in the caching allocator for the op's outputs (on the CPU,
    the `target` fixture has torch fill every new tensor with NaN instead)."""
    if DEV != "cuda":
        return
    blocks = [torch.full((math.prod(shape) * torch.finfo(dt).bits // 8,), 0xFF, dtype=torch.uint8, device=DEV)
              for shape, dt in shapes_dtypes]
    del blocks


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten or overflowed elements)"
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ---- norm ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,pad", [(1, 2560, 0), (15, 1024, 0), (577, 1024, 8), (17, 2560, 3),
                                               (16, 1002, 0), (3, 8192, 0)])
def test_layernorm(dtype, tokens, hidden, pad):
    x = _strided(tokens, hidden, pad, dtype, seed=1, scale=3.0).add_(0.5)  # in place: keeps the row stride
    w = _randn(hidden, dtype=dtype, seed=2)
    b = _randn(hidden, dtype=dtype, seed=3)
    _poison_next_alloc(((tokens, hidden), dtype))
    y = ops.layernorm(x, w, b, 1e-5, backend=BACKEND)
    _assert_close(y, reference.layernorm(x, w, b, 1e-5), dtype, "layernorm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_b", [True, False])
@pytest.mark.parametrize("tokens,hidden,pad", [(1, 2560, 0), (17, 2560, 8), (640, 2560, 0), (15, 1000, 5)])
def test_add_layernorm(dtype, with_b, tokens, hidden, pad):
    tokens = _sized(tokens, min(tokens, 64))
    x = _strided(tokens, hidden, pad, dtype, seed=4, scale=4.0)
    a = _strided(tokens, hidden, 0, dtype, seed=5)
    b = _strided(tokens, hidden, pad, dtype, seed=6) if with_b else None
    w = _randn(hidden, dtype=dtype, seed=7)
    bias = _randn(hidden, dtype=dtype, seed=8)
    _poison_next_alloc(((tokens, hidden), dtype), ((tokens, hidden), dtype))
    s, y = ops.add_layernorm(x, a, b, w, bias, 1e-5, backend=BACKEND)
    s_ref, y_ref = reference.add_layernorm(x, a, b, w, bias, 1e-5)
    _assert_close(s, s_ref, dtype, "add_layernorm s")
    _assert_close(y, y_ref, dtype, "add_layernorm y")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,patches,hidden,contiguous", [(1, 576, 1024, True), (2, 15, 64, False),
                                                             (3, 16, 1000, True)])
def test_embed_layernorm(dtype, batch, patches, hidden, contiguous):
    if contiguous:
        p = _randn(batch, patches, hidden, dtype=dtype, seed=9)
    else:  # every other row of a taller tensor
        p = _randn(batch, 2 * patches, hidden, dtype=dtype, seed=9)[:, ::2]
    cls = _randn(hidden, dtype=dtype, seed=10)
    pos = _randn(patches + 1, hidden, dtype=dtype, seed=11, scale=0.1)
    w = _randn(hidden, dtype=dtype, seed=12)
    b = _randn(hidden, dtype=dtype, seed=13)
    _poison_next_alloc(((batch, patches + 1, hidden), dtype))
    y = ops.embed_layernorm(p, cls, pos, w, b, 1e-5, backend=BACKEND)
    _assert_close(y, reference.embed_layernorm(p, cls, pos, w, b, 1e-5), dtype, "embed_layernorm")


# ---- activation -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["tanh", "none", "quick"])
@pytest.mark.parametrize("tokens,width,pad", [(1, 10240, 0), (640, 2560, 8), (17, 1001, 0), (5, 4096, 3)])
def test_bias_activation(dtype, approximate, tokens, width, pad):
    x = _strided(tokens, width, pad, dtype, seed=14, scale=3.0)
    bias = _randn(width, dtype=dtype, seed=15)
    _poison_next_alloc(((tokens, width), dtype))
    if approximate == "quick":
        y, ref = ops.bias_quick_gelu(x, bias, backend=BACKEND), reference.bias_quick_gelu(x, bias)
    else:
        y, ref = ops.bias_gelu(x, bias, approximate, backend=BACKEND), reference.bias_gelu(x, bias, approximate)
    _assert_close(y, ref, dtype, f"bias_gelu {approximate}")


# ---- rotary_cache -----------------------------------------------------------------------------------------

def _qkv(tokens: int, heads: int, head_dim: int, pad: int, dtype: torch.dtype, seed: int,
         scale: float = 1.0) -> torch.Tensor:
    """[T, 3, H, D] view into rows of 3 H D + pad elements (the fused QKV GEMM's output, maybe padded)."""
    return _strided(tokens, 3 * heads * head_dim, pad, dtype, seed, scale).view(tokens, 3, heads, head_dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,rotary_dim", [(80, 32), (80, 80), (64, 64), (64, 32)])
@pytest.mark.parametrize("tokens,pad", [(1, 0), (15, 8), (16, 0), (17, 3), (577, 0)])
def test_rotary_cache(dtype, head_dim, rotary_dim, tokens, pad):
    heads, page_size, num_pages = 4, 16, 64
    qkv = _qkv(tokens, heads, head_dim, pad, dtype, seed=16)
    positions = torch.randint(0, 2048, (tokens,), generator=_gen(17), device=DEV)
    cos, sin = reference.rotary_tables(rotary_dim, 2048, device=DEV)
    slots = torch.randperm(num_pages * page_size, generator=_gen(18), device=DEV)[:tokens]
    slots[::3] = -1  # padding tokens: skipped
    kc = torch.full((num_pages, page_size, heads, head_dim), float("nan"), dtype=dtype, device=DEV)
    vc = torch.full_like(kc, float("nan"))
    qkv_ref, kc_ref, vc_ref = qkv.clone(), kc.clone(), vc.clone()
    ops.rotary_cache(qkv, positions, cos, sin, kc, vc, slots, backend=BACKEND)
    reference.rotary_cache(qkv_ref, positions, cos, sin, kc_ref, vc_ref, slots)
    _assert_close(qkv, qkv_ref, dtype, "rotary_cache qkv")
    written = torch.zeros(num_pages * page_size, dtype=torch.bool, device=DEV)
    written[slots[slots >= 0]] = True
    for name, cache, cache_ref in (("key_cache", kc, kc_ref), ("value_cache", vc, vc_ref)):
        flat, flat_ref = cache.view(-1, heads, head_dim), cache_ref.view(-1, heads, head_dim)
        assert torch.isnan(flat[~written]).all(), f"rotary_cache wrote {name} rows outside slot_mapping"
        _assert_close(flat[written], flat_ref[written], dtype, f"rotary_cache {name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_without_cache(dtype):
    qkv = _qkv(33, 32, 80, 0, dtype, seed=19)
    positions = torch.arange(33, device=DEV) + 600
    cos, sin = reference.rotary_tables(32, 2048, device=DEV)
    qkv_ref = qkv.clone()
    ops.rotary_cache(qkv, positions, cos, sin, None, None, None, backend=BACKEND)
    reference.rotary_cache(qkv_ref, positions, cos, sin, None, None, None)
    _assert_close(qkv, qkv_ref, dtype, "rotary_cache without cache")


# ---- attention --------------------------------------------------------------------------------------------

def _attend_plain(q, k, v, scale, causal_offset):
    """Plain attention in the inputs' dtype (the low-precision PyTorch baseline). q: [Tq, H, D]; k, v: [Tk, H, D]."""
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal_offset is not None:
        mask = (torch.arange(k.shape[0], device=DEV)[None, :]
                > torch.arange(q.shape[0], device=DEV)[:, None] + causal_offset)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)


def _check_attention(out, ref, plain, dtype, what):
    """out, plain vs the fp32 reference ref: out's max error <= 2x plain's (+ a floor far below one ulp)."""
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = (out.float() - ref.float()).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-4, f"{what}: max error {err} vs the fp32 reference"
        return
    plain_err = (plain.float() - ref.float()).abs().max().item()
    assert err <= 2 * plain_err + 1e-4, f"{what}: max error {err} > 2 x plain {dtype} attention's {plain_err}"


def _cu(lengths, device=None) -> torch.Tensor:
    return torch.tensor([0] + list(lengths), device=device or DEV).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [80, 64])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths,pad", [([1], 0), ([15, 16, 17], 0), ([577], 8), ([1, 15, 16, 17, 577, 3], 0),
                                         ([40, 70], 3), ([63, 64, 65], 0)])
def test_prefill_attention(dtype, head_dim, causal, lengths, pad):
    heads = 4
    lengths = [_sized(n, min(n, 130)) for n in lengths]  # 130: three query tiles of 64, the last one ragged
    tokens = sum(lengths)
    qkv = _qkv(tokens, heads, head_dim, pad, dtype, seed=20)
    q, k, v = qkv.unbind(1)  # [T, H, D] views, token stride 3 H D + pad
    cu = _cu(lengths)
    scale = head_dim ** -0.5
    _poison_next_alloc(((tokens, heads, head_dim), dtype))
    out = ops.prefill_attention(q, k, v, cu, scale, causal, backend=BACKEND)
    ref = reference.prefill_attention(q.float(), k.float(), v.float(), cu, scale, causal)
    plain = torch.cat([_attend_plain(q[lo:hi], k[lo:hi], v[lo:hi], scale, 0 if causal else None)
                       for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist())])
    _check_attention(out, ref, plain, dtype, f"prefill_attention {lengths}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,heads,head_dim,causal", [(2048, 32, 80, True), (640, 32, 80, True),
                                                          (577, 16, 64, False)])
def test_prefill_attention_model_shapes(dtype, tokens, heads, head_dim, causal):
    heads = _sized(heads, 1 if tokens > 1024 else 2)
    qkv = _qkv(tokens, heads, head_dim, 0, dtype, seed=21)
    q, k, v = qkv.unbind(1)
    cu = _cu([tokens])
    scale = head_dim ** -0.5
    out = ops.prefill_attention(q, k, v, cu, scale, causal, backend=BACKEND)
    ref = reference.prefill_attention(q.float(), k.float(), v.float(), cu, scale, causal)
    plain = _attend_plain(q, k, v, scale, 0 if causal else None)
    _check_attention(out, ref, plain, dtype, f"prefill_attention {tokens} x {heads} x {head_dim}")


def _paged_inputs(seq_lens, q_lens, heads, head_dim, dtype, page_size=16, seed=30, pad=8):
    """A shuffled paged cache holding every sequence; unused slots and pages are NaN, so a kernel that reads
    past a sequence's length or outside its pages produces NaN. q is a strided view (row pad `pad`: 8 keeps its
    rows 16-byte aligned). Returns q, caches, block_table, seq_lens, cu_seqlens_q."""
    pages_needed = [(n + page_size - 1) // page_size for n in seq_lens]
    num_pages = sum(pages_needed) + 2
    order = torch.randperm(num_pages, generator=_gen(seed), device=DEV).to(torch.int32)
    nan_page = order[-1].item()  # never assigned to a sequence
    kc = _randn(num_pages, page_size, heads, head_dim, dtype=dtype, seed=seed + 1)
    vc = _randn(num_pages, page_size, heads, head_dim, dtype=dtype, seed=seed + 2)
    max_pages = max(pages_needed) + 1
    table = torch.full((len(seq_lens), max_pages), nan_page, dtype=torch.int32, device=DEV)
    used = 0
    for s, (n, p) in enumerate(zip(seq_lens, pages_needed)):
        table[s, :p] = order[used:used + p]
        used += p
        if n % page_size:  # slots past the end of the last page
            kc[table[s, p - 1], n % page_size:] = float("nan")
            vc[table[s, p - 1], n % page_size:] = float("nan")
    kc[nan_page] = float("nan")
    vc[nan_page] = float("nan")
    tokens = sum(q_lens)
    q = _qkv(tokens, heads, head_dim, pad, dtype, seed=seed + 3)[:, 0]  # strided q, as out of the QKV GEMM
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    return q, kc, vc, table, lens, _cu(q_lens)


def _paged_plain(q, kc, vc, table, lens, cu, scale):
    outs = []
    for s, n in enumerate(lens.tolist()):
        lo, hi = cu[s].item(), cu[s + 1].item()
        k = reference.gather_pages(kc, table[s], n)
        v = reference.gather_pages(vc, table[s], n)
        outs.append(_attend_plain(q[lo:hi], k, v, scale, n - (hi - lo)))
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [80, 64])
@pytest.mark.parametrize("seq_lens,q_lens,heads", [
    ([640], [1], 32),                        # decode, batch 1: split-K over the whole GPU
    ([1, 15, 16, 17, 577], [1] * 5, 4),      # decode, mixed lengths around page boundaries
    ([1, 2048], [1, 1], 32),                 # splits of the short sequence are empty
    ([20, 37, 16, 5], [3, 37, 1, 0], 4),     # several queries per sequence, a whole prompt, none
    ([2048] * 4, [1] * 4, 32),               # long context
])
def test_paged_attention(dtype, head_dim, seq_lens, q_lens, heads):
    heads = _sized(heads, min(heads, 8))  # fewer rows: more splits, still split-K
    q, kc, vc, table, lens, cu = _paged_inputs(seq_lens, q_lens, heads, head_dim, dtype)
    scale = head_dim ** -0.5
    _poison_next_alloc(((q.shape[0], heads, head_dim), dtype))
    out = ops.paged_attention(q, kc, vc, table, lens, cu, scale, backend=BACKEND)
    ref = reference.paged_attention(q.float(), kc.float(), vc.float(), table, lens, cu, scale)
    plain = _paged_plain(q, kc, vc, table, lens, cu, scale)
    _check_attention(out, ref, plain, dtype, f"paged_attention {seq_lens} / {q_lens}")


def _check_paged(seq_lens, q_lens, heads, head_dim, dtype, page_size=16, pad=8, seed=30):
    q, kc, vc, table, lens, cu = _paged_inputs(seq_lens, q_lens, heads, head_dim, dtype, page_size, seed, pad)
    scale = head_dim ** -0.5
    _poison_next_alloc(((q.shape[0], heads, head_dim), dtype))
    out = ops.paged_attention(q, kc, vc, table, lens, cu, scale, backend=BACKEND)
    ref = reference.paged_attention(q.float(), kc.float(), vc.float(), table, lens, cu, scale)
    plain = _paged_plain(q, kc, vc, table, lens, cu, scale)
    _check_attention(out, ref, plain, dtype, f"paged_attention {seq_lens} / {q_lens}")


CHUNKS = [1, 15, 16, 17, 64]  # queries of a prompt chunk (1: a decode row)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [80, 64])
@pytest.mark.parametrize("prefix", [0, 1, 15, 16, 17])
def test_paged_attention_mixed_step(dtype, head_dim, prefix):
    """A mixed step: chunks of every size over a cached prefix (tensor-core path for 16-bit dtypes), decode rows
    (rows path) and an idle sequence, in one call over shuffled pages."""
    seq_lens = [prefix + c for c in CHUNKS] + [40, 5]
    q_lens = CHUNKS + [1, 0]
    _check_paged(seq_lens, q_lens, _sized(4, 2), head_dim, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [80, 64])
def test_paged_attention_long_chunks(dtype, head_dim):
    """Prompt-sized chunks: 577 queries over 600 cached tokens (ten query tiles, the last ragged), a 600-token
    prompt after the 35-token system prefix, 32 queries after 600; with decode rows. Under the emulator: bf16,
    head_dim 80 and one head only."""
    if BACKEND == "sim" and (dtype != torch.bfloat16 or head_dim != 80):
        pytest.skip("the emulator runs the long chunks in bf16 x 80 only")
    seq_lens, q_lens = [600 + 577, 35 + 600, 600 + 32, 601], [577, 600, 32, 1]
    _check_paged(seq_lens, q_lens, _sized(8, 1), head_dim, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page_size", [16, 32])
def test_paged_attention_mixed_step_fallbacks(dtype, page_size):
    """Page size 32 on the tensor-core path, and q rows that are not 16-byte aligned (the whole call stays on
    the rows path)."""
    seq_lens, q_lens = [17 + 64, 33 + 15, 31, 2], [64, 15, 1, 2]
    _check_paged(seq_lens, q_lens, 2, 80, dtype, page_size=page_size)
    _check_paged(seq_lens, q_lens, 2, 80, dtype, page_size=page_size, pad=3)


def test_paged_attention_page_size_32():
    q, kc, vc, table, lens, cu = _paged_inputs([31, 32, 33, 700], [1, 1, 2, 1], 8, 80, torch.bfloat16,
                                               page_size=32)
    out = ops.paged_attention(q, kc, vc, table, lens, cu, 0.1, backend=BACKEND)
    ref = reference.paged_attention(q.float(), kc.float(), vc.float(), table, lens, cu, 0.1)
    _check_attention(out, ref, _paged_plain(q, kc, vc, table, lens, cu, 0.1), torch.bfloat16, "page_size 32")


# ---- fp16 with Phi-2-sized activations -----------------------------------------------------------------------

def test_fp16_large_activations_stay_finite():
    """Phi-2's residual stream and attention logits exceed fp16's range when accumulated in fp16; the kernels
    accumulate in fp32 and must neither overflow nor lose accuracy."""
    dt = torch.float16
    x = _randn(64, 2560, dtype=dt, seed=40, scale=2000.0)
    x[:, 7] = 30000.0  # outlier channel
    a = _randn(64, 2560, dtype=dt, seed=41, scale=1000.0)
    w, b = _randn(2560, dtype=dt, seed=42), _randn(2560, dtype=dt, seed=43)
    s, y = ops.add_layernorm(x, a, None, w, b, 1e-5, backend=BACKEND)
    s_ref, y_ref = reference.add_layernorm(x, a, None, w, b, 1e-5)
    assert torch.isfinite(s).all() and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), y_ref.float(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(s.float(), s_ref.float(), atol=0, rtol=1e-3)

    h = _randn(16, 10240, dtype=dt, seed=44, scale=300.0)
    h[0, :4] = torch.tensor([60000.0, -60000.0, 20000.0, -3.0])
    g = ops.bias_gelu(h, torch.zeros(10240, dtype=dt, device=DEV), "tanh", backend=BACKEND)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g.float(), reference.bias_gelu(h, torch.zeros_like(h[0]), "tanh").float(),
                               atol=2e-3, rtol=2e-3)

    # q . k reaches ~1e5 (beyond fp16's 65504) before the 1/sqrt(80) scale
    qkv = _qkv(300, 8, 80, 0, dt, seed=45, scale=30.0)
    q, k, v = qkv.unbind(1)
    v = v / 30.0
    cu = _cu([300])
    out = ops.prefill_attention(q, k, v, cu, 80 ** -0.5, True, backend=BACKEND)
    ref = reference.prefill_attention(q.float(), k.float(), v.float(), cu, 80 ** -0.5, True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)

    qp, kc, vc, table, lens, cu_q = _paged_inputs([300, 17], [1, 1], 8, 80, dt)
    qp, kc = qp * 30.0, kc * 30.0
    out = ops.paged_attention(qp, kc, vc, table, lens, cu_q, 80 ** -0.5, backend=BACKEND)
    ref = reference.paged_attention(qp.float(), kc.float(), vc.float(), table, lens, cu_q, 80 ** -0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


# ---- patchify ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_patchify_uint8(layout):
    hwc = torch.randint(0, 256, (2, 336, 336, 3), generator=_gen(50), device=DEV, dtype=torch.uint8)
    pixels = hwc.permute(0, 3, 1, 2)  # [B, 3, H, W] view of an HWC image
    if layout == "nchw":
        pixels = pixels.contiguous()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=DEV)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=DEV)
    _poison_next_alloc(((2, 576, 588), torch.float32))
    out = ops.patchify(pixels, 14, mean, std, backend=BACKEND)
    ref = reference.patchify(pixels, 14, mean, std)
    assert out.dtype == torch.float32 and out.shape == (2, 576, 588)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_patchify_float(dtype):
    pixels = _randn(1, 28, 42, 3, dtype=dtype, seed=51).permute(0, 3, 1, 2)  # channels-last strides
    _poison_next_alloc(((1, 6, 588), dtype))
    out = ops.patchify(pixels, 14, backend=BACKEND)
    assert torch.equal(out, reference.patchify(pixels, 14))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("height,width", [(28, 28), (42, 28), (336, 336)])
@pytest.mark.parametrize("pixel_kind", ["uint8", "float"])
def test_patch_embed_equals_conv2d_cat_add_layer_norm(dtype, batch, height, width, pixel_kind):
    """The whole vision stem against PyTorch's modules: Conv2d (no bias) -> flatten -> cat class -> + pos -> LN."""
    hidden, patch = 64, 14
    n = (height // patch) * (width // patch)
    conv = _randn(hidden, 3, patch, patch, dtype=torch.float32, seed=60, scale=0.05)
    cls, pos = _randn(hidden, dtype=torch.float32, seed=61), _randn(n + 1, hidden, dtype=torch.float32, seed=62)
    ln_w = 1 + _randn(hidden, dtype=torch.float32, seed=63, scale=0.1)
    ln_b = _randn(hidden, dtype=torch.float32, seed=64)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=DEV)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=DEV)
    raw = torch.randint(0, 256, (batch, 3, height, width), generator=_gen(65), device=DEV, dtype=torch.uint8)
    normalized = (raw.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    conv_out = torch.nn.functional.conv2d(normalized, conv, stride=patch)  # [B, C, h, w], the fp32 reference
    x = torch.cat([cls.expand(batch, 1, hidden), conv_out.flatten(2).transpose(1, 2)], dim=1) + pos
    expected = torch.nn.functional.layer_norm(x, (hidden,), ln_w, ln_b, 1e-5)
    pixels = raw if pixel_kind == "uint8" else normalized.to(dtype)
    out = ops.patch_embed(pixels, conv.reshape(hidden, -1).to(dtype), cls.to(dtype), pos.to(dtype), ln_w.to(dtype),
                          ln_b.to(dtype), 1e-5, patch, mean, std, backend=BACKEND)
    assert out.shape == (batch, n + 1, hidden) and out.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


# ---- CUDA graphs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["cuda"], indirect=True)
def test_decode_step_is_graph_capturable(target):
    """rotary_cache + paged_attention (split-K) capture into a CUDA graph (no host sync, no host reads of device
    data) and replay on new inputs bit-identically to eager calls."""
    dt, heads, head_dim = torch.bfloat16, 32, 80
    _, kc, vc, table, lens, cu = _paged_inputs([640], [1], heads, head_dim, dt)
    kc, vc = torch.nan_to_num(kc), torch.nan_to_num(vc)
    cos, sin = reference.rotary_tables(32, 2048, device=DEV)
    qkv = _qkv(1, heads, head_dim, 0, dt, seed=60)
    positions = torch.tensor([639], device=DEV)
    slots = (table[0, 639 // 16].long() * 16 + 639 % 16).view(1)
    scale = head_dim ** -0.5

    def step(qkv, kc, vc):
        ops.rotary_cache(qkv, positions, cos, sin, kc, vc, slots, backend=BACKEND)
        return ops.paged_attention(qkv[:, 0], kc, vc, table, lens, cu, scale, backend=BACKEND)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(qkv, kc, vc)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(qkv, kc, vc)

    fresh = _qkv(1, heads, head_dim, 0, dt, seed=61)
    qkv_eager, kc_eager, vc_eager = fresh.clone(), kc.clone(), vc.clone()
    qkv.copy_(fresh)
    graph.replay()
    expected = step(qkv_eager, kc_eager, vc_eager)
    torch.cuda.synchronize()
    assert torch.equal(qkv, qkv_eager) and torch.equal(kc, kc_eager)
    assert torch.equal(out, expected)
