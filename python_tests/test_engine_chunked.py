"""The engine under a token budget: chunked prompts and mixed steps give every request the tokens it gets alone
(greedy and seeded sampling, images, prefix hits, preemption, chat turns), and mixed steps really happen."""

from __future__ import annotations

import pytest
import torch

import phi_fast
from phi_fast.image import preprocess
from phi_fast.kv_cache import PagePool
from phi_fast.prompt import build_prompt, tokenize_prompt
from phi_fast.sampling import SamplingParams

from engine_fixtures import random_image, tiny_llava_phi

QUESTIONS = ["What is this?", "Describe the picture in detail.", "Which colour dominates?",
             "Is there any text in the image?", "How many objects can you see here?"]
BUDGETS = [1, 7, 16, 37]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_llava_phi(tmp_path_factory.mktemp("engine_chunked"))


def _params(i: int, sampled: bool) -> SamplingParams:
    if sampled:
        return SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.9, top_k=40, seed=100 + i)
    return SamplingParams(max_new_tokens=16)


def _add(model: phi_fast.Model, i: int, sampled: bool, image_seed: int | None = None):
    ids = tokenize_prompt(model.tokenizer, build_prompt(QUESTIONS[i % len(QUESTIONS)], with_image=True))
    px = preprocess(random_image(i if image_seed is None else image_seed), image_size=model.config.vision.image_size)
    return model.engine.add(ids, [px], _params(i, sampled))


@pytest.fixture(scope="module")
def alone(ckpt) -> dict[bool, list[list[int]]]:
    """Each request run alone (default budget), greedy and sampled."""
    out = {}
    for sampled in (False, True):
        model = phi_fast.load(ckpt, progress=False, prefix_cache=0)
        outs = []
        for i in range(4):
            req = _add(model, i, sampled)
            model.engine.run()
            outs.append(req.output_ids)
        out[sampled] = outs
    return out


def _page_bytes(model: phi_fast.Model) -> int:
    t = model.config.text
    return PagePool.page_bytes(t.num_layers, t.num_heads, t.head_dim, 16, torch.float32)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
@pytest.mark.parametrize("budget", BUDGETS)
def test_any_budget_gives_each_request_its_tokens_alone(ckpt, alone, budget, sampled):
    model = phi_fast.load(ckpt, progress=False, token_budget=budget)
    assert model.engine.token_budget == budget
    reqs = [_add(model, i, sampled) for i in range(2)]
    for _ in range(60 if budget < 16 else 6):  # the first two are decoding (or still chunking) ...
        model.engine.step()
    reqs += [_add(model, i, sampled) for i in range(2, 4)]  # ... when two more arrive
    model.engine.run()
    assert [r.output_ids for r in reqs] == alone[sampled]
    if budget > 1:  # (a budget of 1 token holds a decode or a prompt token, never both)
        assert model.engine.steps["mixed"] > 0, "the newcomers' chunks were meant to share steps with decodes"
    model.engine.clear_prefix_cache()
    assert model.engine.pool.num_free == model.engine.pool.num_pages


def test_newcomer_during_decoding_takes_mixed_steps_and_the_streams_never_pause(ckpt, alone):
    model = phi_fast.load(ckpt, progress=False, token_budget=16, prefix_cache=0)
    first = _add(model, 0, False)
    while len(first.output_ids) < 2:
        model.engine.step()
    second = _add(model, 1, False, image_seed=1)
    prompt_len = len(second.keys)
    assert prompt_len > 2 * 16, "the test needs a prompt of several chunks"
    kinds = []
    while not second.output_ids:
        model.engine.step()
        plan = model.engine.last_plan
        kinds.append(plan.kind)
        assert [c.req for c in plan.decodes] == [first]  # the running stream gets its token every step
    assert kinds and all(k == "mixed" for k in kinds)
    shared = model.engine.prefix_hit_tokens  # the system prompt's pages, if a whole one is shared
    assert len(kinds) == -(-(prompt_len - shared) // 15)  # 15 prompt tokens a step next to the one decode
    model.engine.run()
    assert [first.output_ids, second.output_ids] == alone[False][:2]


def test_only_a_prompts_last_chunk_reaches_lm_head(ckpt):
    model = phi_fast.load(ckpt, progress=False, token_budget=16)
    rows_seen = []
    logits = model.llava.decoder.logits
    model.llava.decoder.logits = lambda h: rows_seen.append(h.shape[0]) or logits(h)
    req = _add(model, 0, False)
    steps = 0
    while not req.output_ids:
        model.engine.step()
        steps += 1
    assert steps > 1 and rows_seen == [1]  # the earlier chunks computed no logits at all
    assert model.engine.steps["prefill"] == steps


def test_prefix_hits_under_a_small_budget_change_nothing(ckpt):
    fresh = phi_fast.load(ckpt, progress=False, prefix_cache=0)
    expected = []
    for i in range(3):
        req = _add(fresh, i, False, image_seed=5)
        fresh.engine.run()
        expected.append(req.output_ids)
    model = phi_fast.load(ckpt, progress=False, token_budget=16)
    first = _add(model, 0, False, image_seed=5)
    model.engine.run()
    later = [_add(model, i, False, image_seed=5) for i in (1, 2)]  # same image: its rows come from the cache
    model.engine.run()
    assert [first.output_ids] + [r.output_ids for r in later] == expected
    assert model.engine.prefix_hits == 2
    assert model.engine.prefix_hit_tokens >= 2 * model.llava.image_tokens  # the image's rows, at least


def test_tiny_cache_preempts_in_mixed_steps_and_everything_completes(ckpt, alone):
    probe = phi_fast.load(ckpt, progress=False)
    model = phi_fast.load(ckpt, progress=False, cache_memory=12 * _page_bytes(probe), token_budget=24)
    reqs = [_add(model, i, True) for i in range(2)]
    for _ in range(4):
        model.engine.step()
    reqs += [_add(model, i, True) for i in range(2, 4)]
    streamed = {r.id: "" for r in reqs}
    while model.engine.has_work:
        model.engine.step()
        for r in reqs:
            streamed[r.id] += r.take_new_text()
    assert model.engine.preemptions > 0, "the pool was meant to be too small for all requests at once"
    assert [r.output_ids for r in reqs] == alone[True]
    for r in reqs:  # streamed text: nothing lost, nothing repeated
        assert streamed[r.id] == model.tokenizer.decode(r.output_ids).strip()


def test_chat_under_budget_one_equals_rerunning_the_conversation(ckpt):
    image = random_image(11)
    answers = {}
    for budget in (None, 1):
        model = phi_fast.load(ckpt, progress=False, token_budget=budget)
        chat = model.chat(image)
        answers[budget] = [chat.ask(q, max_new_tokens=8) for q in QUESTIONS[:2]]
        chat.close()
        model.close()
    assert answers[1] == answers[None]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "512"])
def test_bad_token_budget_is_refused_at_load(ckpt, bad):
    with pytest.raises(ValueError, match=r"token_budget must be an int >= 1"):
        phi_fast.load(ckpt, progress=False, token_budget=bad)


def test_failed_chunk_takes_back_the_request_that_shared_its_pages_in_the_same_step(ckpt, alone):
    model = phi_fast.load(ckpt, progress=False)
    bad = _add(model, 0, False)
    good = _add(model, 1, False)  # another image: it shares only the system prompt's pages, which bad fills
    embed_prompt = model.llava.embed_prompt

    def failing_for_bad(ids, pixels):
        if pixels is bad.pixels:
            raise RuntimeError("broken image")
        return embed_prompt(ids, pixels)

    model.llava.embed_prompt = failing_for_bad
    model.engine.step()
    plan = model.engine.last_plan
    assert [c.req for c in plan.chunks] == [bad, good] and good.seq.length == 0  # planned together, taken back
    assert bad.finish_reason == "error" and "broken image" in str(bad.error)
    assert model.engine.waiting == [good]
    model.engine.run()
    assert good.output_ids == alone[False][1]
    model.engine.clear_prefix_cache()
    assert model.engine.pool.num_free == model.engine.pool.num_pages
