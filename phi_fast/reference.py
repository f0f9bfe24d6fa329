"""Pure-PyTorch reference of every fused op: the executable spec and the oracle of every test.

Each function computes in fp32 and returns tensors in the input dtype (or writes the caches in their
dtype). The C++ CPU and CUDA kernels implement exactly these signatures; `phi_fast.ops` picks the backend.

Paged KV cache contract (design.md section 2):
    key_cache, value_cache: [num_pages, page_size, num_heads, head_dim]
    block_table:            int32 [num_seqs, max_pages_per_seq]
    seq_lens:               int32 [num_seqs], tokens in the cache including the new ones
    slot_mapping:           int64 [num_tokens], page_id * page_size + offset, -1 = skip
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_GELU_TANH_C = math.sqrt(2.0 / math.pi)


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """y = LayerNorm(x) over the last dim. x: [T, C]; weight, bias: [C] -> y: [T, C]."""
    y = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return y.to(x.dtype)


def add_layernorm(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, weight: torch.Tensor,
                  bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Parallel residual + LayerNorm: s = (a + b) + x (or a + x when b is None); y = LayerNorm(s).

    x, a, b: [T, C]; weight, bias: [C] -> (s: [T, C], y: [T, C]). y is computed from s in fp32,
    before s is rounded to the output dtype.
    """
    s = a.float() + b.float() if b is not None else a.float()
    s = s + x.float()
    y = F.layer_norm(s, (s.shape[-1],), weight.float(), bias.float(), eps)
    return s.to(x.dtype), y.to(x.dtype)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """gelu_new: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), written out as Phi-2 does."""
    return 0.5 * x * (1.0 + torch.tanh(_GELU_TANH_C * (x + 0.044715 * torch.pow(x, 3.0))))


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """y = gelu(x + bias). x: [T, N]; bias: [N]. approximate: "tanh" (gelu_new) or "none" (erf)."""
    h = x.float() + bias.float()
    if approximate == "tanh":
        y = gelu_tanh(h)
    elif approximate == "none":
        y = F.gelu(h)
    else:
        raise ValueError(f"unsupported approximate {approximate!r} (supported: 'tanh', 'none')")
    return y.to(x.dtype)


def bias_quick_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """y = h * sigmoid(1.702 h), h = x + bias. x: [T, N]; bias: [N]."""
    h = x.float() + bias.float()
    return (h * torch.sigmoid(1.702 * h)).to(x.dtype)


def rotary_tables(rotary_dim: int, max_positions: int, theta: float = 10000.0,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos, sin tables: [max_positions, rotary_dim // 2] (emb = cat(freqs, freqs), so one half suffices)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim))
    freqs = torch.outer(torch.arange(max_positions, device=device, dtype=torch.int64).float(), inv_freq)
    return freqs.cos(), freqs.sin()


def rotary_cache(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 key_cache: torch.Tensor | None, value_cache: torch.Tensor | None,
                 slot_mapping: torch.Tensor | None) -> None:
    """Partial NeoX rotary on q and k, in place, then k, v written into the paged cache.

    qkv: [T, 3, H, D] (q, k, v of the fused GEMM, any strides with a unit last dim), modified in place:
    the first R = 2 * cos.shape[1] dims of q and k are rotated, r' = r*cos + rotate_half(r)*sin.
    positions: int64 [T]; cos, sin: fp32 [max_positions, R/2].
    key_cache, value_cache: [num_pages, page_size, H, D] or None (no cache write); slot_mapping: int64 [T].
    """
    half = cos.shape[1]
    c = cos[positions][:, None, :]  # [T, 1, R/2]
    s = sin[positions][:, None, :]
    for j in (0, 1):
        r = qkv[:, j, :, : 2 * half].float()  # [T, H, R]
        r1, r2 = r[..., :half], r[..., half:]
        rot = torch.cat((r1 * c - r2 * s, r2 * c + r1 * s), dim=-1)
        qkv[:, j, :, : 2 * half] = rot.to(qkv.dtype)
    if key_cache is None:
        return
    page_size = key_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    pages, offsets = slots // page_size, slots % page_size
    key_cache[pages, offsets] = qkv[keep, 1].to(key_cache.dtype)
    value_cache[pages, offsets] = qkv[keep, 2].to(value_cache.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal_offset: int | None) -> torch.Tensor:
    """q: [Tq, H, D], k, v: [Tk, H, D] in fp32 -> [Tq, H, D]. causal_offset: query i sees keys <= i + offset."""
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal_offset is not None:
        tq, tk = q.shape[0], k.shape[0]
        mask = torch.arange(tk, device=q.device)[None, :] > (torch.arange(tq, device=q.device)[:, None] + causal_offset)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      scale: float, causal: bool) -> torch.Tensor:
    """Attention over contiguous variable-length sequences (no cache).

    q, k, v: [T, H, D] (any strides with a unit last dim); cu_seqlens: int32 [S + 1], sequence s owns
    tokens cu_seqlens[s]:cu_seqlens[s+1]. causal=True for Phi-2, False for CLIP. -> [T, H, D] contiguous.
    """
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    bounds = cu_seqlens.tolist()
    for s in range(len(bounds) - 1):
        lo, hi = bounds[s], bounds[s + 1]
        o = _attend(q[lo:hi].float(), k[lo:hi].float(), v[lo:hi].float(), scale, 0 if causal else None)
        out[lo:hi] = o.to(q.dtype)
    return out


def gather_pages(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence from a paged cache -> [length, H, D]."""
    page_size = cache.shape[1]
    n_pages = (length + page_size - 1) // page_size
    pages = cache[block_table_row[:n_pages].long()]  # [n_pages, page_size, H, D]
    return pages.reshape(-1, *cache.shape[2:])[:length]


def paged_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Causal attention of new queries over a paged cache that already holds their own k, v.

    q: [T, H, D] (any strides with a unit last dim); sequence s owns queries cu_seqlens_q[s]:cu_seqlens_q[s+1]
    (q_len of them) which sit at the last q_len positions of its seq_lens[s] cached tokens; query j sees
    cached positions <= seq_lens[s] - q_len + j. Decode is q_len = 1. -> [T, H, D] contiguous.
    """
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    bounds, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for s in range(len(lens)):
        lo, hi = bounds[s], bounds[s + 1]
        k = gather_pages(key_cache, block_table[s], lens[s]).float()
        v = gather_pages(value_cache, block_table[s], lens[s]).float()
        o = _attend(q[lo:hi].float(), k, v, scale, lens[s] - (hi - lo))
        out[lo:hi] = o.to(q.dtype)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """out = x @ weight^T + bias (bias may be None). x: [M, K]; weight: [N, K]; bias: [N] -> [M, N] in x's dtype."""
    out = F.linear(x.float(), weight.float(), bias.float() if bias is not None else None)
    return out.to(x.dtype)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, in_features: int) -> torch.Tensor:
    """int8 / packed int4 weights -> fp32 [N, in_features] (formats: phi_fast.quant).

    qweight int8 [N, K], scales fp32 [N]: w = q * scale. qweight uint8 [N, Kp / 2] (packed int4), scales fp16
    [N, Kp / G]: each 16-byte run holds 32 weights (byte i: weight i in the low nibble, weight i + 16 in the high
    one, as q + 8), w = (nibble - 8) * scale of its group of G; columns past in_features are padding.
    """
    if qweight.dtype == torch.int8:
        return qweight.float() * scales.float()[:, None]
    n, half = qweight.shape
    runs = qweight.view(n, half // 16, 16)
    q = torch.cat((runs & 15, runs >> 4), dim=-1).reshape(n, 2 * half)  # [N, Kp] nibbles
    groups = scales.shape[1]
    w = (q.float() - 8.0).view(n, groups, -1) * scales.float()[:, :, None]
    return w.reshape(n, 2 * half)[:, :in_features].contiguous()


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """out = x @ dequantize(qweight, scales, K)^T + bias. x: [M, K]; qweight: int8 [N, K] or packed int4 uint8
    [N, Kp / 2]; scales: fp32 [N] or fp16 [N, Kp / G]; bias: [N] or None -> [M, N] in x's dtype."""
    w = dequantize(qweight, scales, x.shape[1])
    return F.linear(x.float(), w, bias.float() if bias is not None else None).to(x.dtype)


def patchify(pixels: torch.Tensor, patch: int, mean: torch.Tensor | None = None,
             std: torch.Tensor | None = None) -> torch.Tensor:
    """Images to the patch-embedding GEMM's input.

    pixels: [B, 3, H, W] float (already normalized) or uint8 (then x/255, (x - mean)/std per channel;
    mean, std: fp32 [3]). H, W multiples of patch. -> [B, (H/p)*(W/p), 3*p*p] rows in (c, ky, kx) order,
    patches row-major; float32 for uint8 input, else the input dtype.
    """
    x = pixels.float()
    if pixels.dtype == torch.uint8:
        x = (x / 255.0 - mean.float().view(1, 3, 1, 1)) / std.float().view(1, 3, 1, 1)
    b, c, h, w = x.shape
    x = x.view(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    out = x.reshape(b, (h // patch) * (w // patch), c * patch * patch)
    return out if pixels.dtype == torch.uint8 else out.to(pixels.dtype)


def embed_layernorm(patches: torch.Tensor, class_embedding: torch.Tensor, position_embedding: torch.Tensor,
                    weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """CLIP embeddings + pre_layrnorm: x = cat(class, patches) + pos; y = LayerNorm(x).

    patches: [B, N, C] (the patch GEMM's output); class_embedding: [C]; position_embedding: [N + 1, C];
    weight, bias: [C] -> [B, N + 1, C].
    """
    b, n, c = patches.shape
    cls = class_embedding.float().expand(b, 1, c)
    x = torch.cat((cls, patches.float()), dim=1) + position_embedding.float()[None]
    return F.layer_norm(x, (c,), weight.float(), bias.float(), eps).to(patches.dtype)
