"""Batched next-token choice in tensor ops only: no host sync and no data-dependent shape, so it runs inside a
captured CUDA graph, and gives the same tokens on CPU and CUDA for the same inputs (up to float ties).

Per row s of the logits:
- temperature[s] == 0: argmax of the raw logits (the first maximum on ties);
- else the Gumbel-max trick over z = logits / temperature, restricted first by top_k[s] (0 = off: keeps the
  tokens whose z reaches the k-th largest), then by top_p[s] (1 = off: keeps the smallest set of most likely
  tokens of the renormalized top-k distribution whose probability reaches top_p; at least one). The kept set is
  "z >= threshold", so tokens tied with the last kept one are all kept.

Randomness is a pure function of (seed[s], step[s], vocab index): a counter-based 32-bit integer hash gives each
(row, token) a uniform u in (0, 1), the noise is g = -log(-log(u)), and the token is argmax(z + g) over the kept
set. The same (seed, step) therefore gives the same token whatever else is in the batch, on any device; the
engine passes each request's seed and the position of the token being sampled as step.

The hash (a lowbias32-style mixer) works on values in [0, 2^32) held in int64 tensors and multiplies only by
constants below 2^31, so no product exceeds 2^63: no signed overflow, and every right shift is of a
non-negative value. u takes 23 random bits: (k + 0.5) / 2^23, exact in fp32 and never 0 or 1.

Three kinds of the same computation, for a batch chosen on the host with `sampler_kind`:
    "greedy"    argmax only (every row has temperature 0);
    "sample"    Gumbel-max over the whole vocabulary (no row filters);
    "filtered"  adds one sort of each row for top-k / top-p (exact for every row).
A kind gives the same tokens as "filtered" for every batch `sampler_kind` would pick it for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

SAMPLER_KINDS = ("greedy", "sample", "filtered")

_MASK32 = 0xFFFFFFFF
_MUL1, _MUL2 = 0x21F0AAAD, 0x735A2D97  # odd, < 2^31: x * c < 2^63 for x < 2^32
_GOLDEN = 0x9E3779B9 & 0x7FFFFFFF  # spreads small counters before mixing
_VOCAB_SALT = 0x5BD1E995
_UNIFORM_BITS = 23

_vocab_hash_cache: dict[tuple[int, torch.device], torch.Tensor] = {}


def sampler_kind(temperature: Sequence[float], top_k: Sequence[int], top_p: Sequence[float]) -> str:
    """The cheapest kind of `sample_tokens` that is exact for a batch with these per-row parameters (host values,
    e.g. lists or numpy arrays of S entries each)."""
    t, k, p = np.asarray(temperature), np.asarray(top_k), np.asarray(top_p)
    if not t.any():
        return "greedy"
    if ((t == 0) | ((k == 0) & (p >= 1.0))).all():
        return "sample"
    return "filtered"


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """x: int64, values in [0, 2^32) -> a bijective 32-bit mix of it, same shape, values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _MASK32
    return x ^ (x >> 15)


def _vocab_hash(vocab_size: int, device: torch.device) -> torch.Tensor:
    """[V] int64: a fixed 32-bit hash of each vocabulary index (cached per device, except while a graph is
    being captured: a tensor made during capture holds no values until the graph is replayed)."""
    key = (vocab_size, device)
    table = _vocab_hash_cache.get(key)
    if table is None:
        index = torch.arange(vocab_size, dtype=torch.int64, device=device)
        table = _mix32(((index * _GOLDEN) & _MASK32) ^ _VOCAB_SALT)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _vocab_hash_cache[key] = table
    return table


def _row_keys(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """seed, step: int64 [S] -> [S] int64 32-bit keys; (seed, step) pairs differing in one 32-bit half never
    collide, others with probability 2^-32."""
    words = torch.stack((seed & _MASK32, (seed >> 32) & _MASK32, step & _MASK32, (step >> 32) & _MASK32))  # [4, S]
    lane = torch.arange(4, dtype=torch.int64, device=seed.device).unsqueeze(1)  # [4, 1]
    hashed = _mix32(words ^ ((lane + 1) * _GOLDEN & _MASK32))  # [4, S], each word salted by its lane
    return hashed.sum(0) & _MASK32  # _mix32 is bijective: a change in one word changes the sum


def random_bits(seed: torch.Tensor, step: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """seed, step: int64 [S] -> int64 [S, V], 32 random bits (in [0, 2^32)) for every (row, vocabulary index)."""
    keys = _row_keys(seed, step)  # [S]
    return _mix32(keys.unsqueeze(1) ^ _vocab_hash(vocab_size, seed.device).unsqueeze(0))


def gumbel_noise(seed: torch.Tensor, step: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """seed, step: int64 [S] -> fp32 [S, V] standard Gumbel noise, -log(-log(u)) with u = (k + 0.5) / 2^23."""
    k = random_bits(seed, step, vocab_size) >> (32 - _UNIFORM_BITS)  # [S, V] in [0, 2^23)
    u = (k.to(torch.float32) + 0.5) * (2.0 ** -_UNIFORM_BITS)  # exact: in [2^-24, 1 - 2^-24]
    return -torch.log(-torch.log(u))


def _check(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seed: torch.Tensor, step: torch.Tensor, kind: str) -> None:
    if kind not in SAMPLER_KINDS:
        raise ValueError(f"sample_tokens: unknown kind {kind!r} (supported: {SAMPLER_KINDS})")
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"sample_tokens: logits must be fp32 [S, V], got {logits.dtype} {tuple(logits.shape)}")
    rows = logits.shape[0]
    expected = {"temperature": (temperature, torch.float32), "top_k": (top_k, torch.int64),
                "top_p": (top_p, torch.float32), "seed": (seed, torch.int64), "step": (step, torch.int64)}
    for name, (t, dtype) in expected.items():
        if t.shape != (rows,) or t.dtype != dtype or t.device != logits.device:
            raise ValueError(f"sample_tokens: {name} must be {dtype} [{rows}] on {logits.device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  seed: torch.Tensor, step: torch.Tensor, kind: str = "filtered") -> torch.Tensor:
    """The next token of every row. Values are not checked (that would synchronize): temperature >= 0,
    top_k >= 0, top_p in (0, 1] are the caller's (SamplingParams') job.

    logits: fp32 [S, V]; temperature: fp32 [S] (0 = greedy); top_k: int64 [S] (0 = off); top_p: fp32 [S]
    (1 = off); seed: int64 [S]; step: int64 [S] (the sampled token's position) -> int64 [S] token ids.
    kind: "greedy" | "sample" | "filtered" (see the module docstring; "filtered" is right for any batch).
    """
    _check(logits, temperature, top_k, top_p, seed, step, kind)
    greedy = torch.argmax(logits, dim=-1)  # [S]
    if kind == "greedy":
        return greedy
    vocab = logits.shape[1]
    z = logits / torch.where(temperature > 0, temperature, 1.0).unsqueeze(1)  # [S, V]
    score = z + gumbel_noise(seed, step, vocab)  # [S, V]
    if kind == "filtered":
        score = score.masked_fill(~keep_mask(z, top_k, top_p), float("-inf"))
    return torch.where(temperature > 0, torch.argmax(score, dim=-1), greedy)


def keep_mask(z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The tokens top-k then top-p let through. z: fp32 [S, V] (logits / temperature); top_k: int64 [S]
    (0 = off); top_p: fp32 [S] (1 = off) -> bool [S, V], every token whose z reaches the last kept one's."""
    vocab = z.shape[1]
    ordered = torch.sort(z, dim=-1, descending=True).values  # [S, V]
    rank = torch.arange(vocab, device=z.device).unsqueeze(0)  # [1, V]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab).unsqueeze(1)  # [S, 1]
    in_top_k = rank < k  # [S, V], a prefix of each sorted row
    probs = torch.softmax(ordered.masked_fill(~in_top_k, float("-inf")), dim=-1)  # [S, V]
    before = torch.cumsum(probs, dim=-1) - probs  # probability of the more likely tokens; 0 at rank 0
    p = top_p.unsqueeze(1)  # [S, 1]
    kept = in_top_k & ((before < p) | (p >= 1.0))  # a prefix, at least rank 0 (top_p > 0)
    last = kept.sum(dim=-1, keepdim=True) - 1  # [S, 1]
    return z >= ordered.gather(1, last)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities as OpenAI and vLLM report them: log_softmax of the raw logits (before temperature,
    top-k and top-p). Tensor ops only (runs inside a captured graph).

    logits: fp32 [S, V]; tokens: int64 [S] (the sampled ones); k: alternatives per row (<= V) ->
    values fp32 [S, 1 + k] (the sampled token's logprob, then the k largest, descending) and ids int64 [S, k].
    """
    logp = torch.log_softmax(logits, dim=-1)  # [S, V]
    top = torch.topk(logp, k, dim=-1)  # sorted, descending
    sampled = logp.gather(1, tokens.unsqueeze(1))  # [S, 1]
    return torch.cat((sampled, top.values), dim=1), top.indices
