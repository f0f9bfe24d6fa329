"""phi_fast.gpu_sampling: greedy rows, reproducible counter-based randomness, top-k/top-p masks, frequencies that
match softmax(logits / T), rows independent of their batch, and CPU == CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from phi_fast.gpu_sampling import (SAMPLER_KINDS, gumbel_noise, keep_mask, random_bits, sample_tokens,
                                   sampler_kind)

# chi-square critical values at p = 0.001 by degrees of freedom (the draws are deterministic: pass or fail fixed)
CHI2_CRITICAL = {3: 16.27, 4: 18.47, 9: 27.88}


def _rows(logits: torch.Tensor, temperature=0.0, top_k=0, top_p=1.0, seed=0, step=0):
    """Per-row parameter tensors for logits [S, V]; each argument a scalar or a per-row sequence."""
    s = logits.shape[0]

    def col(v, dtype):
        return torch.as_tensor(v, dtype=dtype).expand(s).clone() if np.ndim(v) == 0 else torch.as_tensor(v, dtype=dtype)

    return (logits, col(temperature, torch.float32), col(top_k, torch.int64), col(top_p, torch.float32),
            col(seed, torch.int64), col(step, torch.int64))


def _random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def _kept_set(z: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Independent top-k then top-p rule over one row of scaled logits -> bool [V] of the tokens that may be drawn."""
    keep = np.ones_like(z, dtype=bool)
    if top_k > 0:
        keep &= z >= np.sort(z)[::-1][min(top_k, z.size) - 1]
    if top_p < 1.0:
        order = np.argsort(-z, kind="stable")
        zs = np.where(keep[order], z[order], -np.inf).astype(np.float64)
        probs = np.exp(zs - zs.max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        n = int((before < top_p).sum())
        keep &= z >= z[order[n - 1]]
    return keep


def test_sampler_kind_picks_the_cheapest_exact_kind():
    assert sampler_kind([0.0, 0.0], [5, 0], [0.5, 1.0]) == "greedy"
    assert sampler_kind([0.0, 0.7], [5, 0], [0.5, 1.0]) == "sample"
    assert sampler_kind([0.0, 0.7], [0, 3], [1.0, 1.0]) == "filtered"
    assert sampler_kind([1.0], [0], [0.9]) == "filtered"


@pytest.mark.parametrize("kind", SAMPLER_KINDS)
def test_greedy_rows_are_the_argmax_of_the_raw_logits(kind):
    logits = _random_logits(32, 300)
    temperature = [0.0 if i % 2 == 0 else 0.8 for i in range(32)] if kind != "greedy" else 0.0
    top_k = [0 if kind != "filtered" else 7] * 32
    out = sample_tokens(*_rows(logits, temperature, top_k, 1.0, seed=3, step=9), kind=kind)
    assert out.dtype == torch.int64 and out.shape == (32,)
    greedy_rows = slice(None) if kind == "greedy" else slice(0, None, 2)
    assert torch.equal(out[greedy_rows], logits.argmax(-1)[greedy_rows])


def test_ties_in_greedy_rows_take_the_first_maximum():
    logits = torch.zeros(2, 50)
    logits[:, [7, 30]] = 5.0
    assert sample_tokens(*_rows(logits)).tolist() == [7, 7]


def test_same_seed_and_step_give_the_same_token_and_other_seeds_or_steps_other_draws():
    logits = _random_logits(1, 1000, scale=0.5).expand(400, 1000).contiguous()  # near-flat: draws spread out
    args = dict(temperature=1.0, top_k=0, top_p=0.95)
    a = sample_tokens(*_rows(logits, seed=11, step=torch.arange(400), **args))
    again = sample_tokens(*_rows(logits, seed=11, step=torch.arange(400), **args))
    other_seed = sample_tokens(*_rows(logits, seed=12, step=torch.arange(400), **args))
    other_step = sample_tokens(*_rows(logits, seed=11, step=torch.arange(400) + 400, **args))
    assert torch.equal(a, again)
    assert (a == other_seed).float().mean() < 0.05  # independent draws from ~1000 tokens rarely agree
    assert (a == other_step).float().mean() < 0.05
    assert len(set(a.tolist())) > 200  # the steps of one seed are not stuck on a few tokens


def test_seeds_differing_only_in_their_high_bits_or_sign_draw_differently():
    seeds = torch.tensor([5, 5 + (1 << 32), 5 - (1 << 62), -5, -(1 << 63)], dtype=torch.int64)
    bits = random_bits(seeds, torch.zeros(5, dtype=torch.int64), 4096)
    assert bits.min() >= 0 and bits.max() < (1 << 32)
    for i in range(5):
        for j in range(i + 1, 5):
            assert (bits[i] == bits[j]).float().mean() < 0.01


def test_random_bits_are_balanced_and_gumbel_noise_has_gumbel_moments():
    seeds, steps = torch.arange(64, dtype=torch.int64), torch.arange(64, dtype=torch.int64) * 7
    bits = random_bits(seeds, steps, 5000)
    for b in range(32):
        assert abs(((bits >> b) & 1).float().mean().item() - 0.5) < 0.01, f"bit {b} is biased"
    g = gumbel_noise(seeds, steps, 5000).double()
    assert torch.isfinite(g).all()
    assert abs(g.mean().item() - 0.5772157) < 0.01  # Euler-Mascheroni
    assert abs(g.std().item() - np.pi / np.sqrt(6)) < 0.01


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_frequencies_over_many_steps_match_softmax_of_logits_over_temperature(temperature):
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.25, 1.25, -2.0]])
    n = 20000
    out = sample_tokens(*_rows(logits.expand(n, 10).contiguous(), temperature, seed=1234, step=torch.arange(n)),
                        kind="sample")
    counts = np.bincount(out.numpy(), minlength=10)
    probs = torch.softmax(logits[0].double() / temperature, 0).numpy()
    assert _chi2(counts, probs) < CHI2_CRITICAL[9]


def test_frequencies_across_seeds_at_one_step_match_softmax():
    logits = torch.tensor([[0.3, -0.2, 1.1, 0.0, 0.7, -1.0, 0.2, 0.9, -0.4, 0.5]])
    n = 20000
    out = sample_tokens(*_rows(logits.expand(n, 10).contiguous(), 1.0, seed=torch.arange(n), step=77), kind="sample")
    probs = torch.softmax(logits[0].double(), 0).numpy()
    assert _chi2(np.bincount(out.numpy(), minlength=10), probs) < CHI2_CRITICAL[9]


@pytest.mark.parametrize("top_k,top_p,kept,df", [(4, 1.0, [0, 8, 1, 2], 3), (0, 0.8, [0, 8, 1, 2, 7], 4)])
def test_filtered_frequencies_match_the_renormalized_kept_distribution(top_k, top_p, kept, df):
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.6, 1.75, -2.0]])
    n = 20000
    out = sample_tokens(*_rows(logits.expand(n, 10).contiguous(), 1.0, top_k, top_p, seed=99, step=torch.arange(n)))
    counts = np.bincount(out.numpy(), minlength=10)
    assert set(np.flatnonzero(counts)) == set(kept)
    probs = torch.softmax(logits[0, kept].double(), 0).numpy()
    assert _chi2(counts[kept], probs) < CHI2_CRITICAL[df]


def _random_filters(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    temperature = torch.rand(rows, generator=gen) * 1.5 + 0.1
    top_k = torch.randint(0, 12, (rows,), generator=gen)
    top_k[::3] = 0
    top_p = torch.rand(rows, generator=gen) * 0.9 + 0.05
    top_p[::4] = 1.0
    return temperature, top_k, top_p


def test_keep_mask_is_top_k_then_top_p_of_the_renormalized_distribution():
    rows, vocab = 300, 200
    z = _random_logits(rows, vocab, seed=5, scale=2.0)
    _, top_k, top_p = _random_filters(rows, 6)
    mask = keep_mask(z, top_k, top_p)
    for r in range(rows):
        expected = _kept_set(z[r].numpy(), int(top_k[r]), float(top_p[r]))
        assert np.array_equal(mask[r].numpy(), expected), f"row {r} (top_k {int(top_k[r])}, top_p {float(top_p[r])})"


def test_masks_never_pick_an_excluded_token():
    rows, vocab = 300, 200
    logits = _random_logits(rows, vocab, seed=5, scale=2.0)
    temperature, top_k, top_p = _random_filters(rows, 6)
    out = sample_tokens(logits, temperature, top_k, top_p, torch.arange(rows), torch.full((rows,), 3))
    for r in range(rows):
        z = (logits[r] / temperature[r]).numpy()
        assert _kept_set(z, int(top_k[r]), float(top_p[r]))[out[r]], f"row {r} drew an excluded token"


def test_top_k_one_and_a_tiny_top_p_are_greedy():
    logits = _random_logits(100, 500, seed=8)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_tokens(*_rows(logits, 1.3, 1, 1.0, seed=torch.arange(100), step=4)), greedy)
    assert torch.equal(sample_tokens(*_rows(logits, 1.3, 0, 1e-6, seed=torch.arange(100), step=4)), greedy)
    assert torch.equal(sample_tokens(*_rows(logits, 0.2, 50, 1e-6, seed=torch.arange(100), step=4)), greedy)


def test_top_p_one_keeps_the_whole_vocabulary_even_below_rounding():
    z = torch.tensor([[40.0, 0.0, -5.0, 1.0]])  # the tail's share is below fp32 rounding of the cumulative sum
    assert keep_mask(z, torch.tensor([0]), torch.tensor([1.0])).all()
    assert keep_mask(z, torch.tensor([0]), torch.tensor([0.9999])).tolist() == [[True, False, False, False]]


def test_rows_in_a_mixed_batch_equal_the_rows_sampled_alone():
    rows, vocab = 12, 700
    logits = _random_logits(rows, vocab, seed=2, scale=1.5)
    temperature = [0.0, 0.7, 1.0, 1.3, 0.0, 0.9, 1.0, 0.5, 2.0, 1.0, 0.0, 0.8]
    top_k = [0, 0, 5, 0, 3, 40, 0, 0, 1, 0, 0, 100]
    top_p = [1.0, 1.0, 1.0, 0.7, 0.5, 0.9, 0.3, 1.0, 1.0, 0.95, 0.2, 1.0]
    seeds = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, -12]
    steps = [0, 5, 9, 1, 1, 2, 3, 100, 7, 8, 2, 1 << 40]
    batch = sample_tokens(*_rows(logits, temperature, top_k, top_p, seeds, steps))
    for r in range(rows):
        row = _rows(logits[r:r + 1], temperature[r], top_k[r], top_p[r], seeds[r], steps[r])
        kind = sampler_kind([temperature[r]], [top_k[r]], [top_p[r]])
        assert sample_tokens(*row, kind=kind).item() == batch[r].item(), f"row {r} ({kind})"
        assert sample_tokens(*row).item() == batch[r].item()


def test_wrong_inputs_name_the_tensor():
    logits = torch.zeros(3, 10)
    args = list(_rows(logits))
    with pytest.raises(ValueError, match="logits must be fp32"):
        sample_tokens(logits.double(), *args[1:])
    with pytest.raises(ValueError, match="top_k must be torch.int64 \\[3\\]"):
        sample_tokens(*args[:2], args[2].int(), *args[3:])
    with pytest.raises(ValueError, match="seed must be"):
        sample_tokens(*args[:4], args[4][:2], args[5])
    with pytest.raises(ValueError, match="unknown kind"):
        sample_tokens(*args, kind="nucleus")


@pytest.mark.cuda
def test_cuda_gives_the_same_bits_and_tokens_as_cpu():
    rows, vocab = 64, 51200
    logits = _random_logits(rows, vocab, seed=4)
    gen = torch.Generator().manual_seed(1)
    args = (logits, torch.rand(rows, generator=gen) + 0.2, torch.randint(0, 50, (rows,), generator=gen),
            torch.rand(rows, generator=gen) * 0.5 + 0.5, torch.randint(-2**62, 2**62, (rows,), generator=gen),
            torch.randint(0, 4096, (rows,), generator=gen))
    args[1][::5] = 0.0
    assert torch.equal(random_bits(args[4], args[5], vocab), random_bits(args[4].cuda(), args[5].cuda(), vocab).cpu())
    for kind in SAMPLER_KINDS:
        cpu = sample_tokens(*args, kind=kind)
        cuda = sample_tokens(*(a.cuda() for a in args), kind=kind).cpu()
        assert torch.equal(cpu, cuda), f"{kind}: rows {torch.nonzero(cpu != cuda).flatten().tolist()} differ"


@pytest.mark.cuda
@pytest.mark.parametrize("kind", SAMPLER_KINDS)
def test_sampling_inside_a_cuda_graph_equals_eager(kind):
    rows, vocab = 8, 4096
    static = [a.cuda() for a in _rows(_random_logits(rows, vocab), 0.9, 20, 0.9, seed=torch.arange(rows), step=0)]
    static[1][0] = 0.0
    eager_inputs = [a.clone() for a in static]
    sample_tokens(*static, kind=kind)  # warm-up (vocab hash table cached outside the capture)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sample_tokens(*static, kind=kind)
    for step in range(3):
        static[5].fill_(step)
        eager_inputs[5].fill_(step)
        graph.replay()
        assert torch.equal(out, sample_tokens(*eager_inputs, kind=kind))


def test_token_logprobs_are_log_softmax_before_any_filter():
    from phi_fast.gpu_sampling import token_logprobs

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 4  # [S, V]
    tokens = torch.tensor([0, 17, 49])
    values, ids = token_logprobs(logits, tokens, 5)
    logp = torch.log_softmax(logits.double(), dim=-1)
    assert values.shape == (3, 6) and ids.shape == (3, 5) and ids.dtype == torch.int64
    torch.testing.assert_close(values[:, 0].double(), logp.gather(1, tokens[:, None])[:, 0], rtol=1e-5, atol=1e-5)
    top = torch.topk(logp, 5)
    assert torch.equal(ids, top.indices)
    torch.testing.assert_close(values[:, 1:].double(), top.values, rtol=1e-5, atol=1e-5)
