"""phi_fast.cuda_graphs: buckets, staging rows, bounds checks and token feedback (CPU: the runner's eager path),
and on a GPU graph replay == eager decoding token for token, bucket padding, seeded sampling, lazy capture."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import phi_fast
from phi_fast.cuda_graphs import PADDING, DecodeGraphRunner, bucket_for, decode_buckets
from phi_fast.image import preprocess
from phi_fast.prompt import build_prompt, tokenize_prompt
from phi_fast.sampling import SamplingParams

from checkpoints import make_tiny_checkpoints
from tokenizer_fixture import write_tokenizer

QUESTIONS = ["What is this?", "Describe the picture in detail.", "Which colour dominates?",
             "Is there any text in the image?", "How many objects can you see here?"]
GREEDY = SamplingParams(max_new_tokens=64, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tiny = make_tiny_checkpoints(tmp_path_factory.mktemp("graphs"), variants=("llava_phi",))
    path = tiny.paths["llava_phi"]
    write_tokenizer(path)
    return path


def _add(model: phi_fast.Model, i: int, params: SamplingParams):
    ids = tokenize_prompt(model.tokenizer, build_prompt(QUESTIONS[i % len(QUESTIONS)], with_image=True))
    rng = np.random.default_rng(i)
    image = Image.fromarray(rng.integers(0, 256, (40 + i, 60, 3), dtype=np.uint8), "RGB")
    return model.engine.add(ids, [preprocess(image, image_size=model.config.vision.image_size)], params)


def _prefilled(model: phi_fast.Model, n: int, params: SamplingParams = GREEDY, first: int = 0):
    """n requests admitted and prefilled by the engine (each holds its first token)."""
    reqs = [_add(model, first + i, params) for i in range(n)]
    while model.engine.waiting:
        model.engine.step()
    return reqs


def _decode(model: phi_fast.Model, runner: DecodeGraphRunner, reqs, steps: int, *, fed_back: bool = False):
    """Decode `steps` tokens for every request with the runner -> all tokens of each (the prefill's first).

    fed_back: each step takes its input tokens from the previous launch on the device and the host reads them
    one step late (the engine's pipelined loop); else every input token comes from the host.
    """
    pool = model.engine.pool
    out = [list(r.output_ids) for r in reqs]
    pending = None
    for _ in range(steps):
        step = runner.new_step(len(reqs))
        for i, r in enumerate(reqs):
            slot = r.seq.reserve(pool, 1)[0]
            p = r.params
            source = {"prev_row": i} if fed_back and pending is not None else {"token": out[i][-1]}
            step.set_row(i, position=r.seq.length - 1, slot=slot, pages=r.seq.pages, temperature=p.temperature,
                         top_k=p.top_k, top_p=p.top_p, seed=p.seed or 0, **source)
        launched = runner.launch(step)
        if pending is not None or not fed_back:
            for tokens, t in zip(out, (pending if fed_back else launched).result()):
                tokens.append(t)
        pending = launched
    if fed_back:
        for tokens, t in zip(out, pending.result()):
            tokens.append(t)
    for r in reqs:
        model.engine.abort(r)
    return out


def _engine_alone(ckpt, n: int, steps: int, device: str = "cpu") -> list[list[int]]:
    model = phi_fast.load(ckpt, device=device, dtype="float32", progress=False)
    params = SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)
    outs = []
    for i in range(n):
        req = _add(model, i, params)
        model.engine.run()
        outs.append(req.output_ids)
    return outs


def _one_launch(model: phi_fast.Model, runner: DecodeGraphRunner, reqs, logprobs: bool):
    """One decode launch for every request (inputs from the host) -> its PendingTokens; the requests aborted."""
    step = runner.new_step(len(reqs))
    for i, r in enumerate(reqs):
        slot = r.seq.reserve(model.engine.pool, 1)[0]
        p = r.params
        step.set_row(i, position=r.seq.length - 1, slot=slot, pages=r.seq.pages, token=r.output_ids[-1],
                     temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed or 0)
    pending = runner.launch(step, logprobs=logprobs)
    pending.result()
    for r in reqs:
        model.engine.abort(r)
    return pending


def _check_logprobs(pending, k: int) -> None:
    """Each row's logprobs are log_softmax of its logits: the sampled token's, then the k largest."""
    logp = torch.log_softmax(pending.logits.float().cpu(), dim=-1)
    for row, (token, (value, top)) in enumerate(zip(pending.result(), pending.logprobs())):
        assert value == pytest.approx(logp[row, token].item(), abs=1e-5)
        expected = torch.topk(logp[row], k)
        assert [i for i, _ in top] == expected.indices.tolist()
        assert [v for _, v in top] == pytest.approx(expected.values.tolist(), abs=1e-5)


SAMPLED = [SamplingParams(max_new_tokens=64, temperature=0.9, seed=s, ignore_eos=True) for s in (3, 4)] + [GREEDY]


# --- CPU: everything but the capture --------------------------------------------------------------------------

def test_buckets_are_powers_of_two_up_to_the_first_holding_max_num_seqs():
    assert decode_buckets(1) == (1,)
    assert decode_buckets(3) == (1, 2, 4)
    assert decode_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert decode_buckets(48) == (1, 2, 4, 8, 16, 32, 64)
    assert decode_buckets(500) == (1, 2, 4, 8, 16, 32, 64, 128)
    assert [bucket_for((1, 2, 4, 8), n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]
    with pytest.raises(ValueError, match="max_num_seqs"):
        decode_buckets(0)


def test_runner_sizes_and_eager_mode_on_cpu(ckpt):
    model = phi_fast.load(ckpt, progress=False)
    runner = DecodeGraphRunner(model.llava, model.engine.pool, max_num_seqs=48, max_context=100)
    assert runner.buckets[-1] == 64 and runner.capacity == 64
    assert runner.max_pages == 7  # ceil(100 / 16)
    assert not runner.graphed(1) and not runner.use_graphs
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA model"):
        DecodeGraphRunner(model.llava, model.engine.pool, max_num_seqs=4, use_graphs=True)


def test_new_rows_are_padding_rows_whatever_the_staging_held(ckpt):
    model = phi_fast.load(ckpt, progress=False)
    runner = DecodeGraphRunner(model.llava, model.engine.pool, max_num_seqs=8)
    step = runner.new_step(6)
    for i in range(6):
        step.set_row(i, position=40, slot=123, pages=[4, 5, 6], prev_row=i, temperature=0.5, top_k=3, top_p=0.9,
                     seed=-8)
    step = runner.new_step(5)  # nothing launched: the same staging buffer again
    for name, value in PADDING.items():
        assert (getattr(step, name) == value).all(), name
    assert (step.block_table[:, 0] == 0).all()
    step.set_row(1, position=40, slot=123, pages=[4, 5, 6], token=17, temperature=0.5, top_k=3, top_p=0.9, seed=-8)
    assert (step.token_ids[1], step.prev_row[1], step.positions[1], step.slot_mapping[1]) == (17, -1, 40, 123)
    assert (step.seq_lens[1], step.step[1], step.seed[1], step.top_k[1]) == (41, 41, -8, 3)
    assert step.block_table[1, :3].tolist() == [4, 5, 6]
    assert np.isclose(step.temperature[1], 0.5) and np.isclose(step.top_p[1], 0.9)
    assert step.seq_lens[0] == 1 and step.slot_mapping[0] == -1  # untouched rows stay padding


def test_runner_decoding_equals_the_engine_decoding(ckpt):
    steps = 12
    model = phi_fast.load(ckpt, progress=False)
    runner = DecodeGraphRunner(model.llava, model.engine.pool, max_num_seqs=4)
    assert _decode(model, runner, _prefilled(model, 3), steps) == _engine_alone(ckpt, 3, steps)


def test_tokens_fed_back_on_the_device_equal_tokens_from_the_host(ckpt):
    model = phi_fast.load(ckpt, progress=False)
    runner = DecodeGraphRunner(model.llava, model.engine.pool, max_num_seqs=4)
    host = _decode(model, runner, _prefilled(model, 3), 10)
    assert _decode(model, runner, _prefilled(model, 3), 10, fed_back=True) == host


def test_seeded_sampling_is_reproducible_and_rows_equal_rows_alone(ckpt):
    model = phi_fast.load(ckpt, progress=False)
    runner = DecodeGraphRunner(model.llava, model.engine.pool, max_num_seqs=4)
    params = [SamplingParams(max_new_tokens=64, temperature=t, top_p=p, top_k=k, seed=s, ignore_eos=True)
              for t, p, k, s in ((1.0, 1.0, 0, 3), (0.0, 1.0, 0, 0), (1.5, 0.9, 20, 4))]

    def run(indices: list[int]) -> list[list[int]]:
        reqs = [_add(model, i, params[i]) for i in indices]
        while model.engine.waiting:
            model.engine.step()
        return _decode(model, runner, reqs, 16)

    together = run([0, 1, 2])
    assert run([0, 1, 2]) == together
    assert [run([i])[0] for i in range(3)] == together
    params[0] = dataclasses.replace(params[0], seed=5)
    assert run([0])[0][1:] != together[0][1:]  # another seed, other draws (first token: the engine's sampler)


def test_bad_steps_are_refused_with_the_row_named(ckpt):
    model = phi_fast.load(ckpt, progress=False)
    pool = model.engine.pool
    runner = DecodeGraphRunner(model.llava, pool, max_num_seqs=4)
    with pytest.raises(ValueError, match="1..4 sequences"):
        runner.new_step(5)
    step = runner.new_step(2)
    with pytest.raises(ValueError, match="exactly one of token"):
        step.set_row(0, position=3, slot=3, pages=[0], token=5, prev_row=0)
    with pytest.raises(ValueError, match="more than max_pages"):
        step.set_row(0, position=3, slot=3, pages=list(range(runner.max_pages + 1)), token=5)

    def refused(match: str, **row) -> None:
        step = runner.new_step(2)
        step.set_row(0, **{"position": 3, "slot": 3, "pages": [0], "token": 5, **row})
        step.set_row(1, position=0, slot=16, pages=[1], token=5)
        with pytest.raises(ValueError, match=match):
            runner.launch(step)

    refused("row 0: prev_row 0 but the previous launch had 0 rows", prev_row=0, token=None)
    refused("row 0: slot .* outside the cache", slot=pool.num_pages * pool.page_size)
    refused("row 0: block_table row .* outside the cache", pages=[pool.num_pages])
    refused("row 0: position .* outside", position=runner.max_context, pages=list(range(runner.max_pages)))


# --- CUDA: graphs ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_model(ckpt):
    return phi_fast.load(ckpt, device="cuda", dtype="float32", progress=False)


@pytest.mark.cuda
@pytest.mark.parametrize("n", [1, 3, 4, 6])
def test_graph_replay_equals_eager_decoding(cuda_model, ckpt, n):
    model = cuda_model
    steps = 10
    graphs = DecodeGraphRunner(model.llava, model.engine.pool, max_num_seqs=8, keep_logits=True)
    eager = DecodeGraphRunner(model.llava, model.engine.pool, max_num_seqs=8, keep_logits=True, use_graphs=False)
    assert graphs.graphed(n) and not eager.graphed(n)
    replayed = _decode(model, graphs, _prefilled(model, n), steps)
    assert replayed == _decode(model, eager, _prefilled(model, n), steps)
    assert replayed == _engine_alone(ckpt, n, steps, device="cuda")
    assert graphs.captured == [(graphs.bucket_for(n), "greedy")]  # lazily, only the bucket used


@pytest.mark.cuda
def test_graph_logits_equal_eager_logits_with_padding_rows(cuda_model):
    model = cuda_model
    logits = []
    for use_graphs in (True, False):
        runner = DecodeGraphRunner(model.llava, model.engine.pool, max_num_seqs=4, keep_logits=True,
                                   use_graphs=use_graphs)
        reqs = _prefilled(model, 3)  # bucket 4: one padding row
        step = runner.new_step(3)
        for i, r in enumerate(reqs):
            slot = r.seq.reserve(model.engine.pool, 1)[0]
            step.set_row(i, position=r.seq.length - 1, slot=slot, pages=r.seq.pages, token=r.output_ids[-1])
        logits.append(runner.launch(step).logits.clone())
        for r in reqs:
            model.engine.abort(r)
    assert logits[0].shape == (3, model.config.text.vocab_size)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_graphs_with_fed_back_tokens_and_seeded_sampling_equal_eager(cuda_model):
    model = cuda_model
    params = [SamplingParams(max_new_tokens=64, temperature=0.9, top_p=0.95, seed=s, ignore_eos=True) for s in (1, 2)]
    params.append(GREEDY)

    def run(runner: DecodeGraphRunner) -> list[list[int]]:
        reqs = [_add(model, i, p) for i, p in enumerate(params)]
        while model.engine.waiting:
            model.engine.step()
        return _decode(model, runner, reqs, 12, fed_back=True)

    graphs = DecodeGraphRunner(model.llava, model.engine.pool, max_num_seqs=4)
    first = run(graphs)
    assert run(graphs) == first
    assert run(DecodeGraphRunner(model.llava, model.engine.pool, max_num_seqs=4, use_graphs=False)) == first
    assert graphs.captured == [(4, "filtered")]


@pytest.mark.cuda
def test_eager_capture_takes_every_bucket_and_kind_and_does_not_touch_the_cache(cuda_model):
    model = cuda_model
    pool = model.engine.pool
    before = [k.clone() for k in pool.key_caches]
    runner = DecodeGraphRunner(model.llava, pool, max_num_seqs=3, eager_capture=True)
    assert runner.captured == [(b, k) for b in (1, 2, 4) for k in ("filtered", "greedy", "sample")]
    assert runner.graph_memory > 0
    assert all(torch.equal(a, b) for a, b in zip(before, pool.key_caches))


def test_logprob_launches_report_log_softmax_and_draw_the_same_tokens(ckpt):
    model = phi_fast.load(ckpt, progress=False)
    runner = DecodeGraphRunner(model.llava, model.engine.pool, max_num_seqs=4, keep_logits=True)

    def prefilled():
        reqs = [_add(model, i, p) for i, p in enumerate(SAMPLED)]
        while model.engine.waiting:
            model.engine.step()
        return reqs

    with_logprobs = _one_launch(model, runner, prefilled(), logprobs=True)
    without = _one_launch(model, runner, prefilled(), logprobs=False)
    assert without.logprobs() is None
    assert with_logprobs.result() == without.result()
    assert runner.logprob_k == 20
    _check_logprobs(with_logprobs, runner.logprob_k)


@pytest.mark.cuda
def test_graph_logprobs_equal_eager_logprobs(cuda_model):
    model = cuda_model
    results = []
    for use_graphs in (True, False):
        runner = DecodeGraphRunner(model.llava, model.engine.pool, max_num_seqs=4, keep_logits=True,
                                   use_graphs=use_graphs)
        reqs = [_add(model, i, p) for i, p in enumerate(SAMPLED)]
        while model.engine.waiting:
            model.engine.step()
        pending = _one_launch(model, runner, reqs, logprobs=True)
        _check_logprobs(pending, runner.logprob_k)
        results.append((pending.result(), pending.logprobs()))
        if use_graphs:
            assert runner.captured == [(4, "filtered+logprobs")]
    assert results[0][0] == results[1][0]
    for (v0, top0), (v1, top1) in zip(results[0][1], results[1][1]):
        assert v0 == pytest.approx(v1, abs=1e-4) and [i for i, _ in top0] == [i for i, _ in top1]
