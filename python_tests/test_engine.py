"""The engine: batching equals running alone, prefix sharing, preemption, failures that stay local, chat."""

from __future__ import annotations

import pytest
import torch

import phi_fast
from phi_fast.image import preprocess
from phi_fast.kv_cache import CacheFullError, PagePool, SequencePages
from phi_fast.prompt import build_prompt, tokenize_prompt
from phi_fast.sampling import SamplingParams

from engine_fixtures import random_image, tiny_llava_phi

QUESTIONS = ["What is this?", "Describe the picture in detail.", "Which colour dominates?",
             "Is there any text in the image?", "How many objects can you see here?"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_llava_phi(tmp_path_factory.mktemp("engine"))


def _request(model: phi_fast.Model, i: int, image_seed: int | None = None):
    ids = tokenize_prompt(model.tokenizer, build_prompt(QUESTIONS[i % len(QUESTIONS)], with_image=True))
    px = preprocess(random_image(i if image_seed is None else image_seed), image_size=model.config.vision.image_size)
    return ids, [px]


def _alone(ckpt, n: int, max_new: int = 24) -> list[list[int]]:
    model = phi_fast.load(ckpt, progress=False)
    outs = []
    for i in range(n):
        req = model.engine.add(*_request(model, i), SamplingParams(max_new_tokens=max_new))
        model.engine.run()
        outs.append(req.output_ids)
    return outs


@pytest.fixture(scope="module")
def alone(ckpt):
    return _alone(ckpt, 5)


def _used(model: phi_fast.Model) -> int:
    pool = model.engine.pool
    return pool.num_pages - pool.num_free


def test_batch_with_requests_joining_midway_equals_each_alone(ckpt, alone):
    model = phi_fast.load(ckpt, progress=False)
    params = SamplingParams(max_new_tokens=24)
    reqs = [model.engine.add(*_request(model, i), params) for i in range(2)]
    for _ in range(5):
        model.engine.step()
    reqs += [model.engine.add(*_request(model, i), params) for i in range(2, 5)]
    model.engine.run()
    assert [r.output_ids for r in reqs] == alone
    assert len(model.engine.cached) == 5  # finished requests stay as a prefix cache ...
    model.engine.clear_prefix_cache()
    assert _used(model) == 0  # ... and every page goes back to the pool when it is dropped


def test_list_api_keeps_order(ckpt, alone):
    model = phi_fast.load(ckpt, progress=False)
    images = [random_image(i) for i in range(5)]
    answers = model.generate(images, QUESTIONS, max_new_tokens=24)
    assert answers == [model.tokenizer.decode(ids).strip() for ids in alone]


def test_same_image_requests_share_pages(ckpt):
    def peak_pages(same_image: bool) -> tuple[int, list[list[int]]]:
        model = phi_fast.load(ckpt, progress=False)
        params = SamplingParams(max_new_tokens=8)
        reqs = [model.engine.add(*_request(model, i, image_seed=7 if same_image else 7 + i), params)
                for i in range(2)]
        peak = 0
        while model.engine.has_work:
            model.engine.step()
            peak = max(peak, _used(model))
        return peak, [r.output_ids for r in reqs]

    shared_peak, shared_out = peak_pages(True)
    separate_peak, _ = peak_pages(False)
    assert shared_peak < separate_peak
    model = phi_fast.load(ckpt, progress=False)
    for i in range(2):  # sharing changes nothing in the output
        req = model.engine.add(*_request(model, i, image_seed=7), SamplingParams(max_new_tokens=8))
        model.engine.run()
        assert req.output_ids == shared_out[i]


def test_small_pool_completes_everything_through_preemption(ckpt, alone):
    model = phi_fast.load(ckpt, progress=False)
    t = model.config.text
    # room for about two requests at a time: the others wait or get preempted and recomputed
    page_bytes = PagePool.page_bytes(t.num_layers, t.num_heads, t.head_dim, 16, torch.float32)
    model = phi_fast.load(ckpt, progress=False, cache_memory=12 * page_bytes)
    assert model.engine.pool.num_pages == 12
    params = SamplingParams(max_new_tokens=24)
    reqs = [model.engine.add(*_request(model, i), params) for i in range(5)]
    streamed = {r.id: "" for r in reqs}
    preempted = 0
    while model.engine.has_work:
        before = len(model.engine.waiting)
        model.engine.step()
        preempted += max(0, len(model.engine.waiting) - before)
        for r in reqs:
            streamed[r.id] += r.take_new_text()
    assert preempted > 0, "the pool was meant to be too small for all requests at once"
    assert model.engine.stats()["preemptions"] == preempted
    assert [r.output_ids for r in reqs] == alone
    for r in reqs:  # streamed text: nothing lost, nothing repeated
        assert streamed[r.id] == model.tokenizer.decode(r.output_ids).strip()


def test_request_that_can_never_fit_fails_alone(ckpt, alone):
    model = phi_fast.load(ckpt, progress=False)
    t = model.config.text
    page_bytes = PagePool.page_bytes(t.num_layers, t.num_heads, t.head_dim, 16, torch.float32)
    model = phi_fast.load(ckpt, progress=False, cache_memory=8 * page_bytes)
    params = SamplingParams(max_new_tokens=24)
    ok = [model.engine.add(*_request(model, i), params) for i in range(2)]
    words = 1
    while len(huge_ids := tokenize_prompt(model.tokenizer, build_prompt("word " * words, with_image=False))) <= 9 * 16:
        words += 1
    assert len(huge_ids) < model.config.text.max_position_embeddings  # it fits the context, not the cache
    huge = model.engine.add(huge_ids, [], params)
    model.engine.run()
    assert isinstance(huge.error, CacheFullError) and "more than the whole cache" in str(huge.error)
    assert [r.output_ids for r in ok] == alone[:2]
    model.engine.clear_prefix_cache()
    assert _used(model) == 0


def test_chat_equals_rerunning_the_conversation(ckpt):
    model = phi_fast.load(ckpt, progress=False)
    image = random_image(11)
    chat = model.chat(image)
    answers = [chat.ask(q, max_new_tokens=12) for q in QUESTIONS[:3]]
    cached_after_chat = _used(model)
    assert cached_after_chat > 0  # the conversation stays in the cache
    fresh = phi_fast.load(ckpt, progress=False)
    turns: list[tuple[str, str | None]] = []
    for q, a in zip(QUESTIONS[:3], answers):
        ids = tokenize_prompt(fresh.tokenizer, build_prompt(turns + [(q, None)], with_image=True))
        px = preprocess(image, image_size=fresh.config.vision.image_size)
        req = fresh.engine.add(ids, [px], SamplingParams(max_new_tokens=12))
        fresh.engine.run()
        assert req.visible_text() == a
        turns.append((q, a))
    chat.close()
    assert _used(model) == 0


def test_later_question_about_the_same_image_reuses_its_cached_pages(ckpt, alone):
    model = phi_fast.load(ckpt, progress=False)
    params = SamplingParams(max_new_tokens=24)
    first = model.engine.add(*_request(model, 0, image_seed=3), params)
    model.engine.run()
    assert first in model.engine.cached
    image_pages = set(first.seq.pages[: first.seq.length // 16])  # full pages: system prompt + image rows
    encodes = []
    vision = model.llava.vision
    model.llava.vision = lambda pixels: encodes.append(pixels) or vision(pixels)
    second = model.engine.add(*_request(model, 1, image_seed=3), params)
    model.engine.step()  # prefill
    assert image_pages & set(second.seq.pages), "the second question should start from the cached pages"
    assert not encodes, "the image's rows are all cached: CLIP must not run again"
    stats = model.engine.stats()  # one hit: the common prefix (system prompt, image rows), not the last token
    common = next(i for i, (a, b) in enumerate(zip(second.keys, first.keys)) if a != b)
    assert (stats["prefix_cache_hits"], stats["prefix_cache_hit_tokens"]) == (1, common)
    third = model.engine.add(*_request(model, 1, image_seed=4), params)  # another image: encoded
    model.engine.run()
    assert len(encodes) == 1 and third.finished and third.error is None
    model.engine.run()
    fresh = phi_fast.load(ckpt, progress=False, prefix_cache=0)
    again = fresh.engine.add(*_request(fresh, 1, image_seed=3), params)
    fresh.engine.run()
    assert second.output_ids == again.output_ids
    assert not fresh.engine.cached and _used(fresh) == 0  # prefix_cache=0: pages go back at once


def test_prefix_cache_keeps_the_newest_and_yields_to_running_requests(ckpt, alone):
    model = phi_fast.load(ckpt, progress=False, prefix_cache=2)
    params = SamplingParams(max_new_tokens=24)
    reqs = []
    for i in range(4):
        reqs.append(model.engine.add(*_request(model, i), params))
        model.engine.run()
    assert model.engine.cached == reqs[2:]
    t = model.config.text
    page_bytes = PagePool.page_bytes(t.num_layers, t.num_heads, t.head_dim, 16, torch.float32)
    small = phi_fast.load(ckpt, progress=False, cache_memory=12 * page_bytes)
    for i in range(5):  # each request alone fits; the cached ones must make room
        req = small.engine.add(*_request(small, i), params)
        small.engine.run()
        assert req.output_ids == alone[i]


def test_pool_refcounts_and_copy_on_write():
    pool = PagePool(num_layers=2, num_heads=1, head_dim=4, num_pages=4, page_size=4)
    a = SequencePages()
    slots = a.reserve(pool, 6)  # 2 pages, the second half full
    assert slots == [a.pages[0] * 4 + i for i in range(4)] + [a.pages[1] * 4 + i for i in range(2)]
    for layer in pool.key_caches:
        layer.view(-1, 1, 4)[torch.tensor(slots)] = torch.arange(6.0)[:, None, None]
    b = SequencePages()
    b.share_from(pool, a, 6)
    assert b.pages == a.pages and pool.refcount(a.pages[1]) == 2 and pool.num_free == 2
    new_slot = b.reserve(pool, 1)[0]  # b writes into the shared half-full page: it gets a copy first
    assert b.pages[0] == a.pages[0] and b.pages[1] != a.pages[1]
    assert new_slot == b.pages[1] * 4 + 2
    assert torch.equal(pool.key_caches[1][b.pages[1], :2], pool.key_caches[1][a.pages[1], :2])
    assert pool.refcount(a.pages[1]) == 1 and pool.refcount(a.pages[0]) == 2
    with pytest.raises(CacheFullError, match="need 2 pages, 1 of 4 free"):
        b.reserve(pool, 8)
    assert pool.num_free == 1  # a failed reservation takes nothing
    a.free(pool)
    b.free(pool)
    assert pool.num_free == 4


def test_submit_takes_raw_text_or_messages_and_n_seeds(ckpt):
    model = phi_fast.load(ckpt, progress=False)
    image = random_image(2)
    params = SamplingParams(max_new_tokens=12, temperature=0.9, seed=5)
    messages = [{"role": "user", "content": "<image>\n" + QUESTIONS[0]}]
    handles = model.submit(messages, [image], params, n=3)
    answers = [h.result(60) for h in handles]
    for i, answer in enumerate(answers):  # choice i: seed + i, as generate draws it
        assert answer == model.generate(image, QUESTIONS[0], max_new_tokens=12, temperature=0.9, seed=5 + i)
    raw = model.submit(build_prompt(QUESTIONS[0], with_image=True), [image], params)[0]
    assert raw.result(60) == answers[0]  # the template applied by hand: the same prompt
    assert model.engine.stats()["prefix_cache_hits"] >= 2  # the n answers share the prompt's pages
    with pytest.raises(ValueError, match="n must be"):
        model.submit(messages, [image], params, n=0)
    with pytest.raises(ValueError, match="1 <image> markers but 0 images"):
        model.submit(messages, [], params)
    with pytest.raises(ValueError, match="last message must be a user message"):
        model.submit([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    model.close()


def test_logprobs_follow_the_output_through_preemption(ckpt):
    model = phi_fast.load(ckpt, progress=False)
    t = model.config.text
    page_bytes = PagePool.page_bytes(t.num_layers, t.num_heads, t.head_dim, 16, torch.float32)
    model = phi_fast.load(ckpt, progress=False, cache_memory=12 * page_bytes)
    params = SamplingParams(max_new_tokens=24, logprobs=2, ignore_eos=True)
    reqs = [model.engine.add(*_request(model, i), params) for i in range(5)]
    model.engine.run()
    assert model.engine.stats()["preemptions"] > 0
    for r in reqs:  # one entry per output token, the sampled token at most as likely as the top one
        assert len(r.logprobs) == len(r.output_ids) == 24
        assert all(len(top) == 2 and value <= top[0][1] + 1e-5 for value, top in r.logprobs)


@pytest.mark.parametrize("bad", [-1, 21, 1.5, True, "3"])
def test_logprobs_parameter_is_checked(bad):
    with pytest.raises(ValueError, match="logprobs must be"):
        SamplingParams(logprobs=bad)
    assert SamplingParams(logprobs=0).logprobs == 0 and SamplingParams().logprobs is None
