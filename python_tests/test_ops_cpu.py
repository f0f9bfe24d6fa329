"""C++ CPU kernels (phi_fast._C, csrc/cpu) vs phi_fast.reference: every op over fp32/fp16/bf16 and awkward shapes.

Each test calls phi_fast.ops with backend="cpp" on CPU tensors. Outputs the op allocates come back NaN-filled
unless written (torch's deterministic mode fills uninitialized memory, the extension's at::empty included), and
caches written in place are poisoned with NaN directly, so an element a kernel fails to write, or writes where
it must not, fails the test. fp32 is held to 1e-5; fp16/bf16 to about two ulps (kernel and reference both
compute in fp32 and round once).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from phi_fast import _ext, env, ops, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-5, 2e-3), torch.bfloat16: (1e-5, 1.6e-2)}  # (atol, rtol)
CPP = "cpp"
pytestmark = pytest.mark.usefixtures("nan_filled_outputs")  # unwritten outputs fail


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int, scale: float = 1.0,
           offset: float = 0.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=_gen(seed)) * scale + offset).to(dtype)


def _strided(rows: int, cols: int, pad: int, dtype: torch.dtype, seed: int, scale: float = 1.0,
             offset: float = 0.0) -> torch.Tensor:
    """[rows, cols] view with row stride cols + pad (pad 0 = contiguous)."""
    return _randn(rows, cols + pad, dtype=dtype, seed=seed, scale=scale, offset=offset)[:, :cols]


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert (out.dtype, out.shape) == (ref.dtype, ref.shape), f"{what}: {out.dtype} {out.shape} vs {ref.dtype} {ref.shape}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten elements?)"
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ---- norm ----------------------------------------------------------------------------------------------------

NORM_SHAPES = [(1, 2560, 0), (15, 80, 3), (16, 1023, 0), (17, 2560, 5), (577, 1024, 0), (16, 1, 2), (1, 1, 0),
               (577, 80, 8)]  # (tokens, hidden, row padding)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,pad", NORM_SHAPES)
def test_layernorm(dtype, tokens, hidden, pad):
    x = _strided(tokens, hidden, pad, dtype, seed=1, scale=2.0, offset=1.5)  # [T, C], mean far from 0
    w = _randn(hidden, dtype=dtype, seed=2, offset=1.0)
    b = _randn(hidden, dtype=dtype, seed=3)
    out = ops.layernorm(x, w, b, 1e-5, backend=CPP)
    _assert_close(out, reference.layernorm(x, w, b, 1e-5), dtype, "layernorm")
    assert out.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_b", [True, False])
@pytest.mark.parametrize("tokens,hidden,pad", NORM_SHAPES)
def test_add_layernorm(dtype, with_b, tokens, hidden, pad):
    x = _strided(tokens, hidden, pad, dtype, seed=4, scale=3.0)
    a = _strided(tokens, hidden, pad + 1, dtype, seed=5)
    b = _strided(tokens, hidden, 0, dtype, seed=6) if with_b else None
    w, bias = _randn(hidden, dtype=dtype, seed=7, offset=1.0), _randn(hidden, dtype=dtype, seed=8)
    s, y = ops.add_layernorm(x, a, b, w, bias, 1e-5, backend=CPP)
    s_ref, y_ref = reference.add_layernorm(x, a, b, w, bias, 1e-5)
    torch.testing.assert_close(s, s_ref, atol=0, rtol=0)  # the same fp32 sums, rounded once: bit-identical
    _assert_close(y, y_ref, dtype, "add_layernorm y")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_layernorm_sum_rounds_like_torch(dtype):
    """s = a + x rounded from fp32 must match torch bit for bit: ties to even, subnormals, overflow to inf, NaN."""
    g = _gen(9)
    magnitudes = 2.0 ** torch.randint(-30, 18, (4096,), generator=g).float()
    a = (torch.randn(4096, generator=g) * magnitudes).to(dtype).view(64, 64)
    x = (torch.randn(4096, generator=g) * magnitudes.flip(0)).to(dtype).view(64, 64)
    one = torch.ones(64, dtype=dtype)
    x[0, :4] = torch.tensor([2.0 ** -11, 2.0 ** -9, -(2.0 ** -25), float("nan")]).to(dtype)  # ties and friends
    a[0, :4] = torch.tensor([1.0, 1.0, 0.0, 1.0]).to(dtype)
    s, _ = ops.add_layernorm(x, a, None, one, one, 1e-5, backend=CPP)
    s_ref, _ = reference.add_layernorm(x, a, None, one, one, 1e-5)
    assert torch.equal(s.view(torch.int16), s_ref.view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,num_patches,hidden,pad", [(1, 576, 1024, 0), (2, 15, 80, 3), (3, 16, 1023, 0),
                                                          (1, 1, 1, 0)])
def test_embed_layernorm(dtype, batch, num_patches, hidden, pad):
    patches = _randn(batch, num_patches, hidden + pad, dtype=dtype, seed=10)[..., :hidden]  # [B, N, C]
    cls = _randn(hidden, dtype=dtype, seed=11)
    pos = _randn(num_patches + 1, hidden, dtype=dtype, seed=12, scale=0.5)
    w, b = _randn(hidden, dtype=dtype, seed=13, offset=1.0), _randn(hidden, dtype=dtype, seed=14)
    out = ops.embed_layernorm(patches, cls, pos, w, b, 1e-5, backend=CPP)
    _assert_close(out, reference.embed_layernorm(patches, cls, pos, w, b, 1e-5), dtype, "embed_layernorm")


# ---- activation ----------------------------------------------------------------------------------------------

ACT_SHAPES = [(1, 10240, 0), (17, 1023, 5), (16, 80, 0), (15, 1, 2), (577, 4096, 0)]  # (tokens, width, padding)


def _activation_input(tokens: int, width: int, pad: int, dtype: torch.dtype) -> torch.Tensor:
    x = _strided(tokens, width, pad, dtype, seed=15, scale=4.0)
    tails = torch.tensor([-100.0, -20.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 20.0, 100.0])[:width]
    x[0, : len(tails)] = tails.to(dtype)  # saturated tails and the neighbourhood of 0
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("tokens,width,pad", ACT_SHAPES)
def test_bias_gelu(dtype, approximate, tokens, width, pad):
    x = _activation_input(tokens, width, pad, dtype)
    bias = _randn(width, dtype=dtype, seed=16)
    out = ops.bias_gelu(x, bias, approximate, backend=CPP)
    _assert_close(out, reference.bias_gelu(x, bias, approximate), dtype, f"bias_gelu {approximate}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,width,pad", ACT_SHAPES)
def test_bias_quick_gelu(dtype, tokens, width, pad):
    x = _activation_input(tokens, width, pad, dtype)
    bias = _randn(width, dtype=dtype, seed=17)
    out = ops.bias_quick_gelu(x, bias, backend=CPP)
    _assert_close(out, reference.bias_quick_gelu(x, bias), dtype, "bias_quick_gelu")


# ---- rotary_cache --------------------------------------------------------------------------------------------

def _qkv(tokens: int, heads: int, head_dim: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    """[T, 3, H, D] view with padded heads (head stride D + 8): q = qkv[:, 0] etc. are non-contiguous."""
    return _randn(tokens, 3, heads, head_dim + 8, dtype=dtype, seed=seed, scale=scale)[..., :head_dim]


def _slot_mapping(tokens: int, num_slots: int, seed: int) -> torch.Tensor:
    """Distinct shuffled slots with every third token padding (-1)."""
    slots = torch.randperm(num_slots, generator=_gen(seed))[:tokens].clone()
    slots[1::3] = -1
    return slots


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("rotary", ["32", "full"])
@pytest.mark.parametrize("tokens", [1, 15, 16, 17])
def test_rotary_cache(dtype, head_dim, rotary, tokens):
    heads, page_size, num_pages = 4, 16, 3
    rotary_dim = 32 if rotary == "32" else head_dim
    cos, sin = reference.rotary_tables(rotary_dim, 2048)
    qkv = _qkv(tokens, heads, head_dim, dtype, seed=18)
    positions = torch.randint(0, 2048, (tokens,), generator=_gen(19))
    slots = _slot_mapping(tokens, num_pages * page_size, seed=20)
    caches = [torch.full((num_pages, page_size, heads, head_dim), float("nan"), dtype=dtype) for _ in range(2)]
    qkv_ref, caches_ref = qkv.clone(), [c.clone() for c in caches]

    ops.rotary_cache(qkv, positions, cos, sin, caches[0], caches[1], slots, backend=CPP)
    reference.rotary_cache(qkv_ref, positions, cos, sin, caches_ref[0], caches_ref[1], slots)

    _assert_close(qkv, qkv_ref, dtype, "rotated qkv")
    for name, cache, cache_ref in zip(("key_cache", "value_cache"), caches, caches_ref):
        torch.testing.assert_close(cache, cache_ref, atol=TOL[dtype][0], rtol=TOL[dtype][1], equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")
        written = cache.view(-1, heads, head_dim)[slots[slots >= 0]]
        assert torch.isfinite(written).all(), f"{name}: mapped slots not written"
        assert torch.isnan(cache).sum() == cache_ref.isnan().sum(), f"{name}: a skipped slot was written"


def test_rotary_cache_without_cache():
    qkv = _qkv(17, 32, 80, torch.bfloat16, seed=21)
    cos, sin = reference.rotary_tables(32, 2048)
    positions = torch.arange(17) + 600
    qkv_ref = qkv.clone()
    ops.rotary_cache(qkv, positions, cos, sin, None, None, None, backend=CPP)
    reference.rotary_cache(qkv_ref, positions, cos, sin, None, None, None)
    _assert_close(qkv, qkv_ref, torch.bfloat16, "rotated qkv")


# ---- attention -----------------------------------------------------------------------------------------------

def _dense_attention_fp64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                          first_limit: int | None) -> torch.Tensor:
    """q: [Tq, H, D]; k, v: [Tk, H, D] -> [Tq, H, D] fp64; query i sees keys <= first_limit + i (None: all)."""
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    if first_limit is not None:
        mask = torch.arange(k.shape[0])[None, :] > torch.arange(q.shape[0])[:, None] + first_limit
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double())


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)


PREFILL_CASES = [([1], 4), ([15], 4), ([16], 4), ([17], 4), ([577], 16), ([1, 17, 16, 15, 33, 64], 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths,heads", PREFILL_CASES)
def test_prefill_attention(dtype, head_dim, causal, lengths, heads):
    qkv = _qkv(sum(lengths), heads, head_dim, dtype, seed=22)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # non-contiguous views, as the model passes them
    cu_seqlens, scale = _cu(lengths), head_dim ** -0.5
    out = ops.prefill_attention(q, k, v, cu_seqlens, scale, causal, backend=CPP)
    _assert_close(out, reference.prefill_attention(q, k, v, cu_seqlens, scale, causal), dtype, "prefill_attention")
    assert out.is_contiguous()


def test_prefill_attention_fp16_large_scores_stay_finite():
    """Phi-2 overflows fp16 in q.k: the kernel's fp32 scores must not."""
    qkv = _qkv(40, 2, 80, torch.float16, seed=23)
    qkv[:, :2] *= 60.0  # |q.k| up to ~1e5 > fp16 max 65504; v stays O(1)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    assert (torch.einsum("qhd,khd->hqk", q.float(), k.float()).abs() > 65504).any()
    cu_seqlens = _cu([40])
    out = ops.prefill_attention(q, k, v, cu_seqlens, 80 ** -0.5, True, backend=CPP)
    _assert_close(out, reference.prefill_attention(q, k, v, cu_seqlens, 80 ** -0.5, True), torch.float16, "fp16")


def _paged_case(seq_lens: list[int], q_lens: list[int], page_size: int, heads: int, head_dim: int,
                dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """A paged cache holding seq_lens[s] random tokens for each sequence on shuffled pages (block tables padded
    with -1; unowned slots and the tails of last pages are NaN) and q: [sum(q_lens), H, D] non-contiguous.
    -> q, key_cache, value_cache, block_table, seq_lens, cu_seqlens_q."""
    g = _gen(seed)
    pages_per_seq = [math.ceil(n / page_size) for n in seq_lens]
    num_pages = sum(pages_per_seq) + 3
    order = torch.randperm(num_pages, generator=g)
    caches = [torch.full((num_pages, page_size, heads, head_dim), float("nan"), dtype=dtype) for _ in range(2)]
    block_table = torch.full((len(seq_lens), max(pages_per_seq) + 1), -1, dtype=torch.int32)
    first = 0
    for s, (length, n_pages) in enumerate(zip(seq_lens, pages_per_seq)):
        pages = order[first:first + n_pages]
        first += n_pages
        block_table[s, :n_pages] = pages.to(torch.int32)
        positions = torch.arange(length)
        for cache in caches:
            cache[pages[positions // page_size], positions % page_size] = torch.randn(
                length, heads, head_dim, generator=g).to(dtype)
    q = _qkv(sum(q_lens), heads, head_dim, dtype, seed=seed + 1)[:, 0]
    return q, caches[0], caches[1], block_table, torch.tensor(seq_lens, dtype=torch.int32), _cu(q_lens)


PAGED_CASES = {  # name: (seq_lens, q_lens)
    "decode": ([1, 15, 16, 17, 31, 32, 33, 100], [1] * 8),
    "prefix": ([17, 40, 16, 5, 33], [17, 3, 1, 5, 16]),  # q_len == seq_len (no prefix) and q_len < seq_len
    "empty_query": ([20, 7], [0, 2]),
    # a mixed step: every chunk size over every prefix length (chunk 1: a decode row), and an idle sequence
    "mixed": ([p + c for p in (0, 1, 15, 16, 17) for c in (1, 15, 16, 17, 64)] + [9],
              [c for _ in range(5) for c in (1, 15, 16, 17, 64)] + [0]),
    "long": ([600 + 577, 35 + 600, 600 + 32, 601], [577, 600, 32, 1]),  # prompt-sized chunks and a decode row
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("case", list(PAGED_CASES))
@pytest.mark.parametrize("page_size", [16, 32])
def test_paged_attention(dtype, head_dim, case, page_size):
    seq_lens, q_lens = PAGED_CASES[case]
    q, kc, vc, table, lens, cu_q = _paged_case(seq_lens, q_lens, page_size, 3, head_dim, dtype, seed=24)
    scale = head_dim ** -0.5
    out = ops.paged_attention(q, kc, vc, table, lens, cu_q, scale, backend=CPP)
    _assert_close(out, reference.paged_attention(q, kc, vc, table, lens, cu_q, scale), dtype, "paged_attention")
    for s, (length, q_len) in enumerate(zip(seq_lens, q_lens)):  # plain attention over the gathered K/V
        positions = torch.arange(length)
        rows = table[s, positions // page_size].long(), positions % page_size
        lo, hi = cu_q[s].item(), cu_q[s + 1].item()
        dense = _dense_attention_fp64(q[lo:hi], kc[rows], vc[rows], scale, length - q_len)
        _assert_close(out[lo:hi], dense.to(dtype), dtype, f"paged_attention seq {s} vs gathered dense")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_lens", [[1100], [900, 1300], [700, 5, 1200]], ids=["1seq", "2seqs", "3seqs"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_paged_attention_phi2_size_on_every_thread_split(dtype, seq_lens, torch_threads):
    """Phi-2-sized decode (32 heads x 80, ~1000 keys) is big enough to fork a team: heads split across threads
    when there are fewer sequences than threads, sequences otherwise."""
    q, kc, vc, table, lens, cu_q = _paged_case(seq_lens, [1] * len(seq_lens), 16, 32, 80, dtype, seed=31)
    out = ops.paged_attention(q, kc, vc, table, lens, cu_q, 80 ** -0.5, backend=CPP)
    _assert_close(out, reference.paged_attention(q, kc, vc, table, lens, cu_q, 80 ** -0.5), dtype, "paged 32x80")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_large_norm_and_gelu_on_every_thread_split(torch_threads):
    x, a, b = (_randn(2048, 2560, seed=s) for s in (41, 42, 43))
    w, bias = _randn(2560, seed=44), _randn(2560, seed=45)
    s_out, y = ops.add_layernorm(x, a, b, w, bias, 1e-5, backend=CPP)
    g = ops.bias_gelu(a, bias, "tanh", backend=CPP)
    s_ref, y_ref = reference.add_layernorm(x, a, b, w, bias, 1e-5)
    _assert_close(s_out, s_ref, torch.float32, "add_layernorm sum")
    _assert_close(y, y_ref, torch.float32, "add_layernorm")
    _assert_close(g, reference.bias_gelu(a, bias, "tanh"), torch.float32, "bias_gelu")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_cache_then_paged_attention_equals_prefill(dtype):
    """The decoder's prefill path both ways: rotary_cache into pages + paged_attention == prefill_attention."""
    lengths, heads, head_dim, page_size = [17, 1, 32], 4, 80, 16
    qkv = _qkv(sum(lengths), heads, head_dim, dtype, seed=25)
    cos, sin = reference.rotary_tables(32, 2048)
    positions = torch.cat([torch.arange(n) for n in lengths])
    pages_per_seq = [math.ceil(n / page_size) for n in lengths]
    order = torch.randperm(sum(pages_per_seq), generator=_gen(26)).to(torch.int32)
    table = torch.full((len(lengths), max(pages_per_seq)), -1, dtype=torch.int32)
    slots, first = [], 0
    for s, (n, n_pages) in enumerate(zip(lengths, pages_per_seq)):
        table[s, :n_pages] = order[first:first + n_pages]
        first += n_pages
        pos = torch.arange(n)
        slots.append(table[s, pos // page_size].long() * page_size + pos % page_size)
    caches = [torch.full((len(order), page_size, heads, head_dim), float("nan"), dtype=dtype) for _ in range(2)]
    ops.rotary_cache(qkv, positions, cos, sin, caches[0], caches[1], torch.cat(slots), backend=CPP)
    cu = _cu(lengths)
    paged = ops.paged_attention(qkv[:, 0], caches[0], caches[1], table, torch.tensor(lengths, dtype=torch.int32),
                                cu, head_dim ** -0.5, backend=CPP)
    prefill = ops.prefill_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, head_dim ** -0.5, True, backend=CPP)
    _assert_close(paged, prefill, dtype, "paged vs prefill")


def test_attention_portable_tiles_match_reference(run_portable):
    """The attention kernels' portable GEMM tiles (used on CPUs without AVX2+FMA), forced by the environment."""
    code = (
        "import torch\n"
        "from phi_fast import ops, reference\n"
        "torch.manual_seed(0)\n"
        "for d, lengths in ((64, [17, 40]), (80, [1, 33])):\n"
        "    q, k, v = torch.randn(3, sum(lengths), 3, d).unbind(0)\n"
        "    cu = torch.tensor([0] + lengths).cumsum(0).int()\n"
        "    for causal in (True, False):\n"
        "        out = ops.prefill_attention(q, k, v, cu, d ** -0.5, causal, backend='cpp')\n"
        "        torch.testing.assert_close(out, reference.prefill_attention(q, k, v, cu, d ** -0.5, causal),\n"
        "                                   atol=1e-5, rtol=1e-5)\n"
    )
    run_portable(code)


# ---- patch embedding -----------------------------------------------------------------------------------------

MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073))
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711))


@pytest.mark.parametrize("batch,height,width,patch", [(1, 336, 336, 14), (2, 28, 42, 14), (1, 4, 6, 2)])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_patchify_uint8(batch, height, width, patch, layout):
    pixels = torch.randint(0, 256, (batch, height, width, 3), generator=_gen(27), dtype=torch.uint8)
    pixels = pixels.permute(0, 3, 1, 2)  # [B, 3, H, W] straight from HWC images
    if layout == "nchw":
        pixels = pixels.contiguous()
    out = ops.patchify(pixels, patch, MEAN, STD, backend=CPP)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference.patchify(pixels, patch, MEAN, STD), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_patchify_float(dtype):
    pixels = _randn(2, 3, 28, 56 + 5, dtype=dtype, seed=28)[..., :56]
    out = ops.patchify(pixels, 14, backend=CPP)
    torch.testing.assert_close(out, reference.patchify(pixels, 14), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pixel_kind", ["uint8", "float"])
def test_patch_embed(dtype, pixel_kind):
    """The composite against the reference backend and against CLIP's conv2d formulation."""
    hidden, patch, side = 64, 14, 42
    weight = _randn(hidden, 3 * patch * patch, dtype=dtype, seed=29, scale=0.05)
    cls, pos = _randn(hidden, dtype=dtype, seed=30), _randn((side // patch) ** 2 + 1, hidden, dtype=dtype, seed=31)
    ln_w, ln_b = _randn(hidden, dtype=dtype, seed=32, offset=1.0), _randn(hidden, dtype=dtype, seed=33)
    if pixel_kind == "uint8":
        pixels = torch.randint(0, 256, (2, 3, side, side), generator=_gen(34), dtype=torch.uint8)
        normalized = ((pixels.float() / 255.0 - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)).to(dtype)
    else:
        pixels = normalized = _randn(2, 3, side, side, dtype=dtype, seed=34)
    args = (weight, cls, pos, ln_w, ln_b, 1e-5, patch, MEAN, STD)
    out = ops.patch_embed(pixels, *args, backend=CPP)
    _assert_close(out, ops.patch_embed(pixels, *args, backend="reference"), dtype, "patch_embed vs reference")
    conv = F.conv2d(normalized.float(), weight.float().view(hidden, 3, patch, patch), stride=patch)
    x = torch.cat((cls.float().expand(2, 1, hidden), conv.flatten(2).transpose(1, 2)), dim=1) + pos.float()
    expected = F.layer_norm(x, (hidden,), ln_w.float(), ln_b.float(), 1e-5)
    atol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=0)


# ---- input validation ----------------------------------------------------------------------------------------

def _error_cases() -> dict[str, tuple]:
    """name: (call, exception type, pattern the message must match)."""
    x, w, b = torch.randn(4, 80), torch.randn(80), torch.randn(80)
    q = torch.randn(5, 2, 80)
    cu = _cu([5])
    qkv = torch.randn(5, 3, 2, 80)
    cos, sin = reference.rotary_tables(32, 64)
    pos = torch.arange(5)
    cache = torch.zeros(2, 16, 2, 80)
    table, lens, cu_q = torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([5], dtype=torch.int32), _cu([5])
    return {
        "int dtype": (lambda: ops.layernorm(x.int(), w, b, 1e-5, backend=CPP), RuntimeError,
                      r"layernorm: x has unsupported dtype int32 \(supported: float32, float16, bfloat16\)"),
        "mixed dtypes": (lambda: ops.layernorm(x, w.half(), b, 1e-5, backend=CPP), RuntimeError,
                         r"layernorm: weight has dtype float16, expected float32"),
        "weight shape": (lambda: ops.layernorm(x, w[:79], b, 1e-5, backend=CPP), RuntimeError,
                         r"layernorm: weight must have shape \[C\] = \[80\], got \[79\]"),
        "x rank": (lambda: ops.bias_gelu(x[None], b, backend=CPP), RuntimeError,
                   r"bias_gelu: x must have shape \[T, N\]"),
        "add shapes": (lambda: ops.add_layernorm(x, x[:3], None, w, b, 1e-5, backend=CPP), RuntimeError,
                       r"add_layernorm: a must have shape \[T, C\] = \[4, 80\], got \[3, 80\]"),
        "last stride": (lambda: ops.bias_quick_gelu(x.t(), torch.randn(4), backend=CPP), RuntimeError,
                        r"bias_quick_gelu: x must have a unit-stride last dim"),
        "approximate": (lambda: ops.bias_gelu(x, b, "erf", backend=CPP), ValueError,
                        r"bias_gelu: unsupported approximate 'erf' \(supported: 'tanh', 'none'\)"),
        "meta device": (lambda: ops.layernorm(x.to("meta"), w, b, 1e-5, backend=CPP), RuntimeError,
                        r"layernorm: x is on meta"),
        "head_dim 96": (lambda: ops.prefill_attention(*(torch.randn(5, 2, 96),) * 3, cu, 0.1, True, backend=CPP),
                        ValueError, r"prefill_attention: unsupported head_dim 96 \(supported: 64, 80\)"),
        "k heads": (lambda: ops.prefill_attention(q, torch.randn(5, 3, 80), q, cu, 0.1, True, backend=CPP),
                    RuntimeError,
                    r"prefill_attention: k must have shape \[T, H, D\] = \[5, 2, 80\], got \[5, 3, 80\]"),
        "cu_seqlens end": (lambda: ops.prefill_attention(q, q, q, _cu([4]), 0.1, True, backend=CPP), RuntimeError,
                           r"cu_seqlens\[-1\] must equal the number of tokens 5, got 4"),
        "cu_seqlens dtype": (lambda: ops.prefill_attention(q, q, q, cu.long(), 0.1, True, backend=CPP),
                             RuntimeError, r"cu_seqlens has dtype int64, expected int32"),
        "rotary head_dim": (lambda: ops.rotary_cache(torch.randn(5, 3, 2, 96), pos, cos, sin, None, None, None,
                                                     backend=CPP), ValueError, r"unsupported head_dim 96"),
        "rotary_dim": (lambda: ops.rotary_cache(torch.randn(5, 3, 2, 64), pos, *reference.rotary_tables(80, 64),
                                                None, None, None, backend=CPP),
                       ValueError, r"rotary_cache: unsupported rotary_dim 80"),
        "position range": (lambda: ops.rotary_cache(qkv, pos + 60, cos, sin, None, None, None, backend=CPP),
                           RuntimeError, r"rotary_cache: positions\[4\] = 64 is outside the rotary tables \[0, 64\)"),
        "slot range": (lambda: ops.rotary_cache(qkv, pos, cos, sin, cache, cache.clone(), pos + 30, backend=CPP),
                       RuntimeError, r"rotary_cache: slot_mapping\[2\] = 32 is outside the cache \(32 slots\)"),
        "one cache": (lambda: ops.rotary_cache(qkv, pos, cos, sin, cache, None, pos, backend=CPP), RuntimeError,
                      r"key_cache and value_cache must be given together"),
        "page size 8": (lambda: ops.paged_attention(q, torch.zeros(4, 8, 2, 80), torch.zeros(4, 8, 2, 80), table,
                                                    lens, cu_q, 0.1, backend=CPP),
                        ValueError, r"paged_attention: unsupported page_size 8 \(supported: 16, 32\)"),
        "short seq": (lambda: ops.paged_attention(q, cache, cache, table, lens - 1, cu_q, 0.1, backend=CPP),
                      RuntimeError, r"seq_lens\[0\] = 4 is shorter than its 5 queries"),
        "bad page": (lambda: ops.paged_attention(q, cache, cache, table + 2, lens, cu_q, 0.1, backend=CPP),
                     RuntimeError, r"paged_attention: block_table\[0, 0\] = 2 is outside the cache \(2 pages\)"),
        "too many pages": (lambda: ops.paged_attention(q, cache, cache, table[:, :1], lens + 12, cu_q, 0.1,
                                                       backend=CPP),
                           RuntimeError, r"seq_lens\[0\] = 17 needs 2 pages, block_table has 1 per sequence"),
        "uint8 needs mean": (lambda: ops.patchify(torch.zeros(1, 3, 28, 28, dtype=torch.uint8), 14, backend=CPP),
                             RuntimeError, r"patchify: uint8 pixels need mean and std"),
        "image size": (lambda: ops.patchify(torch.zeros(1, 3, 28, 30), 14, backend=CPP), ValueError,
                       r"patchify: image size 28x30 is not a multiple of patch 14"),
        "channels": (lambda: ops.patchify(torch.zeros(1, 4, 28, 28), 14, backend=CPP), RuntimeError,
                     r"patchify: pixels must have shape \[B, 3, H, W\]"),
        "pixel dtype": (lambda: ops.patchify(torch.zeros(1, 3, 28, 28, dtype=torch.int32), 14, backend=CPP),
                        RuntimeError, r"patchify: pixels has unsupported dtype int32"),
        "pos rows": (lambda: ops.embed_layernorm(torch.randn(1, 4, 80), b, torch.randn(4, 80), w, b, 1e-5,
                                                 backend=CPP),
                     RuntimeError, r"embed_layernorm: position_embedding must have shape \[N \+ 1, C\] = \[5, 80\]"),
        "patch weight": (lambda: ops.patch_embed(torch.zeros(1, 3, 28, 28), torch.randn(80, 3 * 16), b,
                                                 torch.randn(5, 80), w, b, 1e-5, 14, backend=CPP),
                         ValueError, r"patch_embed: weight has shape \(80, 48\), expected \[C, 588\]"),
    }


@pytest.mark.parametrize("name", list(_error_cases()))
def test_errors_name_the_problem(name):
    call, error, pattern = _error_cases()[name]
    with pytest.raises(error, match=pattern):
        call()


# ---- the ops module ------------------------------------------------------------------------------------------

OP_NAMES = ["layernorm", "add_layernorm", "bias_gelu", "bias_quick_gelu", "rotary_cache", "prefill_attention",
            "paged_attention", "patchify", "embed_layernorm"]


@pytest.mark.parametrize("name", OP_NAMES)
def test_ops_document_the_reference_contract(name):
    assert getattr(ops, name).__doc__ == getattr(reference, name).__doc__


def test_backend_selection():
    q = torch.randn(5, 2, 96)  # head_dim 96: the reference computes it, the kernels refuse it
    args = (q, q, q, _cu([5]), 0.1, True)
    expected = reference.prefill_attention(*args)
    torch.testing.assert_close(ops.prefill_attention(*args, backend="reference"), expected)
    with pytest.raises(ValueError, match="unsupported head_dim 96"):
        ops.prefill_attention(*args)
    with ops.use_backend("reference"):
        torch.testing.assert_close(ops.prefill_attention(*args), expected)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ops.prefill_attention(*args, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"), ops.use_backend("fast"):
        pass


def test_available_backends_and_env_report():
    assert ops.available_backends()[:2] == ["reference", "cpu"]
    info = env.report()
    assert info["phi_fast._C"].startswith("loaded")
    assert info["_C built with torch"] == torch.__version__
    assert info["available backends"] == ", ".join(ops.available_backends())


def test_extension_built_for_another_torch_is_refused(monkeypatch):
    ext = _ext.extension()
    monkeypatch.setattr(ext, "torch_version", lambda: "1.0.0")
    _ext.extension.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"built against torch 1\.0\.0 .*pip install --no-build-isolation"):
            ops.layernorm(torch.randn(2, 80), torch.ones(80), torch.zeros(80), 1e-5)
        assert ops.available_backends() == ["reference"]
    finally:
        monkeypatch.undo()
        _ext.extension.cache_clear()
    assert "cpu" in ops.available_backends()
