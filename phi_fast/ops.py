"""The fused ops, one Python function each: the only way model code reaches the kernels.

Every function has the signature and docstring of its phi_fast.reference twin plus `backend`:
- "auto" (default): the process-wide default, which is "cpp" unless PHI_FAST_BACKEND=reference is set or a
  `use_backend(...)` block says otherwise;
- "cpp": the compiled kernels of phi_fast._C, on the tensors' device (CPU, or CUDA when built with it); a
  missing or stale build raises ImportError saying how to rebuild, an unsupported input a RuntimeError or
  ValueError naming the argument and the bad value;
- "reference": phi_fast.reference (pure PyTorch, fp32 math), the oracle;
- "sim": the CUDA kernels on CPU tensors under the SIMT emulator (phi_fast/_sim.py: built on first use from a
  source checkout's csrc/, for tests; same checks as "cpp", GEMMs are torch's).
Validation lives in the C++ ops (csrc/ops), which check every argument before touching memory.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from types import ModuleType

import torch

from . import _ext, _sim, reference
from .quant import QuantizedWeight

BACKENDS = ("auto", "cpp", "reference", "sim")
_DEFAULT_BACKEND = contextvars.ContextVar("phi_fast_backend", default=os.environ.get("PHI_FAST_BACKEND", "cpp"))


def _impl(backend: str) -> ModuleType:
    """The module implementing the ops for `backend`: phi_fast._C or phi_fast.reference (same function names)."""
    name = _DEFAULT_BACKEND.get() if backend == "auto" else backend
    if name == "cpp":
        return _ext.extension()
    if name == "reference":
        return reference
    if name == "sim":
        return _sim.extension()
    source = "PHI_FAST_BACKEND / use_backend" if backend == "auto" else "backend"
    raise ValueError(f"unknown {source} {name!r} (supported: 'cpp', 'reference', 'sim'; and 'auto' for the "
                     "argument)")


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Within the block, backend="auto" means `backend` ("cpp", "reference" or "sim") in this thread/context."""
    if backend not in ("cpp", "reference", "sim"):
        raise ValueError(f"unknown backend {backend!r} (supported: 'cpp', 'reference', 'sim')")
    token = _DEFAULT_BACKEND.set(backend)
    try:
        yield
    finally:
        _DEFAULT_BACKEND.reset(token)


def available_backends() -> list[str]:
    """What can run here: "reference" always, "cpu" when phi_fast._C loads, "cuda" when it was built with CUDA
    and torch sees a GPU."""
    names = ["reference"]
    if _ext.load_error() is not None:
        return names
    names.append("cpu")
    if _ext.extension().has_cuda() and torch.cuda.is_available():
        names.append("cuda")
    return names


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
              backend: str = "auto") -> torch.Tensor:
    """y = LayerNorm(x) over the last dim. x: [T, C]; weight, bias: [C] -> y: [T, C]."""
    return _impl(backend).layernorm(x, weight, bias, eps)


def add_layernorm(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, weight: torch.Tensor,
                  bias: torch.Tensor, eps: float, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Parallel residual + LayerNorm: s = (a + b) + x (or a + x when b is None); y = LayerNorm(s).

    x, a, b: [T, C]; weight, bias: [C] -> (s: [T, C], y: [T, C]). y is computed from s in fp32,
    before s is rounded to the output dtype.
    """
    return _impl(backend).add_layernorm(x, a, b, weight, bias, eps)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "tanh", backend: str = "auto") -> torch.Tensor:
    """y = gelu(x + bias). x: [T, N]; bias: [N]. approximate: "tanh" (gelu_new) or "none" (erf)."""
    return _impl(backend).bias_gelu(x, bias, approximate)


def bias_quick_gelu(x: torch.Tensor, bias: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """y = h * sigmoid(1.702 h), h = x + bias. x: [T, N]; bias: [N]."""
    return _impl(backend).bias_quick_gelu(x, bias)


def rotary_cache(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 key_cache: torch.Tensor | None, value_cache: torch.Tensor | None,
                 slot_mapping: torch.Tensor | None, backend: str = "auto") -> None:
    """Partial NeoX rotary on q and k, in place, then k, v written into the paged cache.

    qkv: [T, 3, H, D] (q, k, v of the fused GEMM, any strides with a unit last dim), modified in place:
    the first R = 2 * cos.shape[1] dims of q and k are rotated, r' = r*cos + rotate_half(r)*sin.
    positions: int64 [T]; cos, sin: fp32 [max_positions, R/2].
    key_cache, value_cache: [num_pages, page_size, H, D] or None (no cache write); slot_mapping: int64 [T].
    """
    _impl(backend).rotary_cache(qkv, positions, cos, sin, key_cache, value_cache, slot_mapping)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      scale: float, causal: bool, backend: str = "auto") -> torch.Tensor:
    """Attention over contiguous variable-length sequences (no cache).

    q, k, v: [T, H, D] (any strides with a unit last dim); cu_seqlens: int32 [S + 1], sequence s owns
    tokens cu_seqlens[s]:cu_seqlens[s+1]. causal=True for Phi-2, False for CLIP. -> [T, H, D] contiguous.
    """
    return _impl(backend).prefill_attention(q, k, v, cu_seqlens, scale, causal)


def paged_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    scale: float, backend: str = "auto") -> torch.Tensor:
    """Causal attention of new queries over a paged cache that already holds their own k, v.

    q: [T, H, D] (any strides with a unit last dim); sequence s owns queries cu_seqlens_q[s]:cu_seqlens_q[s+1]
    (q_len of them) which sit at the last q_len positions of its seq_lens[s] cached tokens; query j sees
    cached positions <= seq_lens[s] - q_len + j. Decode is q_len = 1. -> [T, H, D] contiguous.
    """
    return _impl(backend).paged_attention(q, key_cache, value_cache, block_table, seq_lens, cu_seqlens_q, scale)


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None,
           backend: str = "auto") -> torch.Tensor:
    """out = x @ weight^T + bias (bias may be None). x: [M, K]; weight: [N, K]; bias: [N] -> [M, N] in x's dtype."""
    if isinstance(weight, QuantizedWeight):
        return quant_linear(x, weight.qweight, weight.scales, bias, backend)
    return _impl(backend).linear(x, weight, bias)


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 backend: str = "auto") -> torch.Tensor:
    """out = x @ dequantize(qweight, scales, K)^T + bias. x: [M, K]; qweight: int8 [N, K] or packed int4 uint8
    [N, Kp / 2]; scales: fp32 [N] or fp16 [N, Kp / G]; bias: [N] or None -> [M, N] in x's dtype."""
    return _impl(backend).quant_linear(x, qweight, scales, bias)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, in_features: int, backend: str = "auto") -> torch.Tensor:
    """int8 / packed int4 weights -> fp32 [N, in_features] (formats: phi_fast.quant).

    qweight int8 [N, K], scales fp32 [N]: w = q * scale. qweight uint8 [N, Kp / 2] (packed int4), scales fp16
    [N, Kp / G]: each 16-byte run holds 32 weights (byte i: weight i in the low nibble, weight i + 16 in the high
    one, as q + 8), w = (nibble - 8) * scale of its group of G; columns past in_features are padding.
    """
    return _impl(backend).dequantize(qweight, scales, in_features)


def cpu_features() -> dict[str, bool]:
    """The CPU kernel paths this process takes: {"avx2", "avx512", "native_bf16", "int8_prompts"} (CPU features
    and the PHI_FAST_CPU_PORTABLE / PHI_FAST_CPU_NO_AVX512 / PHI_FAST_CPU_NO_BF16 / PHI_FAST_CPU_DEQUANT_PROMPTS
    switches). int8_prompts: quantized linears at prompt sizes quantize x to int8 blocks, as decode does."""
    return dict(_ext.extension().cpu_features())


def patchify(pixels: torch.Tensor, patch: int, mean: torch.Tensor | None = None,
             std: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Images to the patch-embedding GEMM's input.

    pixels: [B, 3, H, W] float (already normalized) or uint8 (then x/255, (x - mean)/std per channel;
    mean, std: fp32 [3]). H, W multiples of patch. -> [B, (H/p)*(W/p), 3*p*p] rows in (c, ky, kx) order,
    patches row-major; float32 for uint8 input, else the input dtype.
    """
    return _impl(backend).patchify(pixels, patch, mean, std)


def embed_layernorm(patches: torch.Tensor, class_embedding: torch.Tensor, position_embedding: torch.Tensor,
                    weight: torch.Tensor, bias: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """CLIP embeddings + pre_layrnorm: x = cat(class, patches) + pos; y = LayerNorm(x).

    patches: [B, N, C] (the patch GEMM's output); class_embedding: [C]; position_embedding: [N + 1, C];
    weight, bias: [C] -> [B, N + 1, C].
    """
    return _impl(backend).embed_layernorm(patches, class_embedding, position_embedding, weight, bias, eps)


def patch_embed(pixels: torch.Tensor, weight: torch.Tensor, class_embedding: torch.Tensor,
                position_embedding: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                patch: int, mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
                backend: str = "auto") -> torch.Tensor:
    """CLIP patch embedding + pre-LayerNorm: patchify -> patches @ weight.T (in weight's dtype) -> embed_layernorm.

    pixels: [B, 3, H, W] uint8 (normalized with mean, std: fp32 [3]) or float (already normalized);
    weight: [C, 3*p*p] (the bias-free conv weight flattened in (c, ky, kx) order; [C, 3, p, p] is accepted);
    class_embedding: [C]; position_embedding: [N + 1, C]; ln_weight, ln_bias: [C] -> [B, N + 1, C] in
    weight's dtype, N = (H/p)*(W/p).
    """
    impl = _impl(backend)
    rows = impl.patchify(pixels, patch, mean, std)  # [B, N, 3*p*p]
    w = weight.reshape(weight.shape[0], -1)  # [C, 3*p*p]
    if w.shape[1] != rows.shape[-1]:
        raise ValueError(f"patch_embed: weight has shape {tuple(weight.shape)}, expected [C, {rows.shape[-1]}] "
                         f"(3*p*p for patch {patch})")
    embeddings = torch.matmul(rows.to(w.dtype), w.t())  # [B, N, C]
    return impl.embed_layernorm(embeddings, class_embedding, position_embedding, ln_weight, ln_bias, eps)
