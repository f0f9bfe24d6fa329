"""One request can never hurt another: checked parameters, request-local failures, lazy and abortable streams,
threads sharing a Model, batches with a failing request (issue 10, classes 1-4).

Every wait is bounded (timeout=, join(timeout=)) so that a regression fails instead of hanging.
"""

from __future__ import annotations

import gc
from concurrent.futures import Future
import itertools
import math
import threading

import numpy as np
import pytest
import torch

import phi_fast
from phi_fast.engine_loop import EngineLoopClosed
from phi_fast.image import preprocess
from phi_fast.kv_cache import CacheFullError, PagePool
from phi_fast.prompt import build_prompt, tokenize_prompt
from phi_fast.sampling import SamplingParams

from engine_fixtures import random_image, tiny_llava_phi

WAIT = 120  # seconds: generous bound for any single wait on this (shared, 2-core) machine
QUESTIONS = ["What is this?", "Describe the picture in detail.", "Which colour dominates?",
             "Is there any text in the image?"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_llava_phi(tmp_path_factory.mktemp("robust_engine"))


def _used(model: phi_fast.Model) -> int:
    """KV pages in use, read on the engine thread (after every command sent before it)."""
    return model.loop.call(lambda e: e.pool.num_pages - e.pool.num_free, timeout=WAIT)


def _clear_and_count(model: phi_fast.Model) -> int:
    """Drop the prefix cache, then the KV pages still in use (0 when nothing leaked)."""
    model.loop.call(lambda e: e.clear_prefix_cache(), timeout=WAIT)
    return _used(model)


def _request(model: phi_fast.Model, i: int, **params):
    ids = tokenize_prompt(model.tokenizer, build_prompt(QUESTIONS[i % len(QUESTIONS)], with_image=True))
    px = preprocess(random_image(i), image_size=model.config.vision.image_size)
    return model.engine.new_request(ids, [px], SamplingParams(**params))


@pytest.fixture(scope="module")
def alone(ckpt) -> list[str]:
    """Each question answered on its own, greedy, 16 new tokens."""
    model = phi_fast.load(ckpt, progress=False)
    answers = [model.generate(random_image(i), QUESTIONS[i], max_new_tokens=16, timeout=WAIT) for i in range(4)]
    model.close()
    return answers


# --- class 1: parameters are checked at the call; failures inside a step stay with their request ------------

BAD_PARAMS = [
    (dict(stop=[123]), "stop strings must be str, got int"),
    (dict(stop=b"\n"), "stop must be a str or a list of str, got bytes"),
    (dict(stop=[""]), "non-empty"),
    (dict(top_k=2**63), r"top_k must be in \[0, 2147483647\], got 9223372036854775808"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.0), "top_k must be an int, got float"),
    (dict(max_new_tokens=float("nan")), "max_new_tokens must be an int, got float nan"),
    (dict(max_new_tokens=True), "max_new_tokens must be an int, got bool"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
    (dict(temperature=float("nan")), "temperature must be finite, got nan"),
    (dict(temperature=math.inf), "temperature must be finite"),
    (dict(temperature="0.2"), "temperature must be a number, got str"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=float("nan")), "top_p must be finite"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(seed=1.5), "seed must be an int, got float"),
    (dict(timeout=-1), "timeout must be a positive number"),
    (dict(stream="yes"), "stream must be a bool"),
]


def test_bad_parameters_raise_at_the_call_and_the_model_stays_healthy(ckpt, alone):
    model = phi_fast.load(ckpt, progress=False, max_num_seqs=1)  # one stuck request would block every later one
    for kwargs, match in BAD_PARAMS:
        with pytest.raises(ValueError, match=match):
            model.generate(random_image(0), QUESTIONS[0], **{"max_new_tokens": 16, "timeout": WAIT, **kwargs})
    with pytest.raises(ValueError, match="prompt 1 must be a str, got int"):
        model.generate([random_image(0), random_image(1)], [QUESTIONS[0], 5], timeout=WAIT)
    assert model.loop.call(lambda e: e.has_work, timeout=WAIT) is False  # nothing was queued
    assert model.generate(random_image(0), QUESTIONS[0], max_new_tokens=16, timeout=WAIT) == alone[0]
    # numpy scalars are numbers too
    assert model.generate(random_image(1), QUESTIONS[1], max_new_tokens=np.int64(16), temperature=np.float32(0),
                          timeout=WAIT) == alone[1]
    model.close()


def _poison(req, after: int) -> None:
    """Make req's detokenizer raise at its `after`-th token: a failure inside a step that is req's alone."""
    push, count = req.decoder.push, itertools.count()

    def poisoned(token: int) -> str:
        if next(count) == after:
            raise RuntimeError("poisoned detokenizer")
        return push(token)

    req.decoder.push = poisoned


@pytest.mark.parametrize("max_num_seqs", [1, 8])
def test_poisoned_request_fails_alone_next_to_healthy_streams(ckpt, alone, max_num_seqs):
    model = phi_fast.load(ckpt, progress=False, max_num_seqs=max_num_seqs)
    healthy = [_request(model, i, max_new_tokens=16) for i in range(3)]
    bad = _request(model, 3, max_new_tokens=16)
    _poison(bad, after=2)
    handles = model.loop.submit_many([healthy[0], bad, healthy[1], healthy[2]])
    streamed: dict[int, str] = {}

    def consume(i: int) -> None:
        streamed[i] = "".join(handles[i].stream(timeout=WAIT))

    threads = [threading.Thread(target=consume, args=(i,)) for i in (0, 2, 3)]
    for t in threads:
        t.start()
    with pytest.raises(RuntimeError, match="poisoned detokenizer"):
        handles[1].result(timeout=WAIT)
    for t in threads:
        t.join(timeout=WAIT)
        assert not t.is_alive()
    assert bad.finish_reason == "error" and not bad.seq.pages  # its pages are back
    assert [streamed[i] for i in (0, 2, 3)] == alone[:3]  # the others are unchanged
    assert [h.result(timeout=WAIT) for h in (handles[0], handles[2], handles[3])] == alone[:3]
    assert model.generate(random_image(3), QUESTIONS[3], max_new_tokens=16, timeout=WAIT) == alone[3]
    assert _clear_and_count(model) == 0
    model.close()


def test_kernel_error_fails_the_steps_requests_and_the_engine_stays_usable(ckpt, alone):
    model = phi_fast.load(ckpt, progress=False)
    forward, calls = model.llava.forward, itertools.count()

    def failing_once(*args, **kwargs):
        if next(calls) == 3:  # a decode step of both requests
            raise RuntimeError("injected kernel error")
        return forward(*args, **kwargs)

    model.llava.forward = failing_once
    handles = model.loop.submit_many([_request(model, i, max_new_tokens=16) for i in range(2)])
    for h in handles:
        with pytest.raises(RuntimeError, match="injected kernel error"):
            h.result(timeout=WAIT)
        assert h.request.finish_reason == "error"
    assert _clear_and_count(model) == 0
    assert model.generate([random_image(i) for i in range(3)], QUESTIONS[:3], max_new_tokens=16, timeout=WAIT) == alone[:3]
    model.close()


def test_closed_loop_fails_waiting_requests_and_refuses_new_ones(ckpt):
    model = phi_fast.load(ckpt, progress=False)
    gate = threading.Event()
    model.loop.submit(_request(model, 0, max_new_tokens=16))  # queued behind the gate below, or running
    handle = model.loop.submit(_request(model, 1, max_new_tokens=200))
    model.loop._send("call", (lambda e: gate.wait(WAIT), Future()))  # holds the engine thread, asynchronously
    model.loop.close(timeout=0)
    gate.set()
    with pytest.raises(EngineLoopClosed):
        handle.result(timeout=WAIT)
    with pytest.raises(EngineLoopClosed):
        model.generate(None, "hello", timeout=WAIT)


# --- class 2: streams queue lazily and abort when dropped -------------------------------------------------------


def _count_forwards(model: phi_fast.Model, hold_at: int | None = None):
    """Count model.forward calls; at call `hold_at`, signal `reached` and wait for `release` (bounded)."""
    calls, reached, release = [], threading.Event(), threading.Event()
    forward = model.llava.forward

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == hold_at:
            reached.set()
            release.wait(WAIT)
        return forward(*args, **kwargs)

    model.llava.forward = counted
    return calls, reached, release


def test_stream_never_iterated_is_never_queued(ckpt):
    model = phi_fast.load(ckpt, progress=False)
    calls, _, _ = _count_forwards(model)
    stream = model.generate(random_image(0), QUESTIONS[0], max_new_tokens=16, stream=True)
    del stream
    gc.collect()
    assert model.loop.call(lambda e: (e.has_work, e.pool.num_free == e.pool.num_pages), timeout=WAIT) == (False, True)
    assert not calls  # no step was taken
    model.close()


@pytest.mark.parametrize("how", ["close", "garbage-collect"])
def test_stream_dropped_midway_is_aborted_and_frees_its_pages(ckpt, how):
    reference = phi_fast.load(ckpt, progress=False)
    req = _request(reference, 1, max_new_tokens=100)
    reference.loop.submit(req).result(timeout=WAIT)
    assert len(req.output_ids) >= 12, "the test needs an answer that outlasts the held step"
    reference.close()

    model = phi_fast.load(ckpt, progress=False, prefix_cache=0)
    calls, reached, release = _count_forwards(model, hold_at=8)
    stream = model.generate(random_image(1), QUESTIONS[1], max_new_tokens=100, stream=True)
    try:
        assert next(stream)  # the request is queued at the first next() and produces text
        assert reached.wait(WAIT)  # the engine is now inside step 8, held
        if how == "close":
            stream.close()
        else:
            del stream
            gc.collect()
    finally:
        release.set()
    assert model.loop.call(lambda e: (e.has_work, e.pool.num_free == e.pool.num_pages), timeout=WAIT) == (False, True)
    assert len(calls) == 8  # aborted right after the held step: no further decode steps
    model.close()


# --- class 3: threads sharing one Model ---------------------------------------------------------------------


def test_threads_sharing_a_model_each_get_their_single_threaded_answer(ckpt):
    model = phi_fast.load(ckpt, progress=False, max_num_seqs=8)
    jobs = [(i % 4, dict(max_new_tokens=12) if i % 2 == 0 else dict(max_new_tokens=12, temperature=0.8, top_p=0.9,
                                                                      top_k=40, seed=i)) for i in range(24)]
    expected = [model.generate(random_image(q), QUESTIONS[q], timeout=WAIT, **kw) for q, kw in jobs]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for j in range(t, len(jobs), 8):  # 3 calls per thread, some streamed
                q, kw = jobs[j]
                if j % 3 == 0:
                    results[j] = "".join(model.generate(random_image(q), QUESTIONS[q], stream=True, timeout=WAIT, **kw))
                else:
                    results[j] = model.generate(random_image(q), QUESTIONS[q], timeout=WAIT, **kw)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=WAIT)
        assert not t.is_alive()
    assert not errors, errors
    assert [results[j] for j in range(len(jobs))] == expected
    assert _clear_and_count(model) == 0
    model.close()


# --- class 4: a batch keeps the answers it computed ---------------------------------------------------------


def test_batch_with_an_unfittable_request_returns_the_others(ckpt, alone):
    probe = phi_fast.load(ckpt, progress=False)
    t = probe.config.text
    probe.close()
    page_bytes = PagePool.page_bytes(t.num_layers, t.num_heads, t.head_dim, 16, torch.float32)
    model = phi_fast.load(ckpt, progress=False, cache_memory=8 * page_bytes)
    huge = "word " * 1
    while len(tokenize_prompt(model.tokenizer, build_prompt(huge, with_image=False))) <= 9 * 16:
        huge += "word "
    with pytest.raises(phi_fast.BatchError) as info:
        model.generate([random_image(0), None, random_image(1)], [QUESTIONS[0], huge, QUESTIONS[1]], max_new_tokens=16,
                       timeout=WAIT)
    err = info.value
    assert err.answers == [alone[0], None, alone[1]]
    assert err.errors[0] is None and err.errors[2] is None
    assert isinstance(err.errors[1], CacheFullError) and "more than the whole cache" in str(err.errors[1])
    assert "1 of 3 requests failed (prompts [1])" in str(err)
    with pytest.raises(CacheFullError):  # one prompt alone: its own error
        model.generate(None, huge, timeout=WAIT)
    assert _clear_and_count(model) == 0
    model.close()


def test_timeout_aborts_the_request_and_frees_its_pages(ckpt, alone):
    model = phi_fast.load(ckpt, progress=False, prefix_cache=0)
    calls, reached, release = _count_forwards(model, hold_at=2)  # the engine is held until the caller gave up
    try:
        with pytest.raises(TimeoutError, match="no result within"):
            model.generate(random_image(0), QUESTIONS[0], max_new_tokens=16, timeout=0.5)
        assert reached.is_set()
    finally:
        release.set()
    assert model.loop.call(lambda e: (e.has_work, e.pool.num_free == e.pool.num_pages), timeout=WAIT) == (False, True)
    assert len(calls) == 2
    del model.llava.forward  # the class method again
    assert model.generate(random_image(0), QUESTIONS[0], max_new_tokens=16, timeout=WAIT) == alone[0]
    model.close()


def test_handles_serve_asyncio_through_on_update(ckpt, alone):
    import asyncio

    model = phi_fast.load(ckpt, progress=False)

    async def answer(i: int) -> str:
        aio = asyncio.get_running_loop()
        wake = asyncio.Event()
        handle = model.loop.submit(_request(model, i, max_new_tokens=16),
                                   on_update=lambda h: aio.call_soon_threadsafe(wake.set))
        text = ""
        while True:
            await asyncio.wait_for(wake.wait(), WAIT)
            wake.clear()
            for kind, piece, _ in handle.poll():
                if kind == "done":
                    assert text.strip() == handle.result(timeout=0) == alone[i]
                    return text
                text += piece

    async def main() -> list[str]:
        return await asyncio.gather(*(answer(i) for i in range(3)))

    assert [t.strip() for t in asyncio.run(main())] == alone[:3]
    model.close()
