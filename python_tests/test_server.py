"""The OpenAI-compatible server, as clients meet it: a real uvicorn on 127.0.0.1 and the official `openai` client.

Every answer is compared with the Python API on the same inputs (greedy unless said): Model.generate, or
Model.submit with the prompt the template should produce.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch

from phi_fast.kv_cache import PagePool, SequencePages
from phi_fast.model import StepBatch
from phi_fast.prompt import build_prompt, tokenize_prompt
from phi_fast.sampling import SamplingParams

from engine_fixtures import random_image
from server_fixtures import API_KEY, MODEL_NAME, ckpt, image_message, model, server  # noqa: F401 (fixtures)

QUESTION = "What is the cat doing?"


@pytest.fixture()
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


def _chat(client, messages, **kwargs):
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 16)
    return client.chat.completions.create(model=MODEL_NAME, messages=messages, **kwargs)


def _submit_one(model, prompt, images=(), **params):
    handle = model.submit(prompt, list(images), SamplingParams(**params))[0]
    return handle.result(60), handle.request


def _prompt_tokens(model, text: str, n_images: int) -> int:
    return len(tokenize_prompt(model.tokenizer, text)) + n_images * (model.llava.image_tokens - 1)


@pytest.mark.parametrize("with_image", [True, False])
def test_chat_equals_generate(client, model, with_image):
    image = random_image(3) if with_image else None
    out = _chat(client, [image_message(image, QUESTION)])
    expected = model.generate(image, QUESTION, max_new_tokens=16)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-") and out.model == MODEL_NAME
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected
    _, req = _submit_one(model, build_prompt(QUESTION, with_image=with_image), [image] if image else [],
                         max_new_tokens=16)
    assert out.usage.prompt_tokens == _prompt_tokens(model, build_prompt(QUESTION, with_image=with_image),
                                                     int(with_image)) == len(req.keys)
    assert out.usage.completion_tokens == len(req.output_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.choices[0].finish_reason == ("length" if req.finish_reason == "length" else "stop")


def test_multi_turn_with_system_and_assistant_turns(client, model):
    image = random_image(5)
    messages = [{"role": "system", "content": "You answer briefly."}, image_message(image, "Describe it."),
                {"role": "assistant", "content": "A red bus."}, {"role": "user", "content": "Where is it?"}]
    out = _chat(client, messages)
    text = build_prompt([("Describe it.", "A red bus."), ("Where is it?", None)], with_image=True,
                        system="You answer briefly.")
    expected, req = _submit_one(model, text, [image], max_new_tokens=16)
    assert out.choices[0].message.content == expected
    assert out.usage.prompt_tokens == len(req.keys)


def test_completions_use_the_raw_prompt(client, model):
    prompt = "USER: What is the cat doing? ASSISTANT:"
    out = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0)
    expected, req = _submit_one(model, prompt, max_new_tokens=12)
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.choices[0].text == expected
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(req.keys), len(req.output_ids))


def test_streaming_equals_non_streaming(client):
    messages = [image_message(random_image(2), QUESTION)]
    whole = _chat(client, messages, max_tokens=20)
    chunks = list(_chat(client, messages, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])

    prompt = "USER: Hello there ASSISTANT:"
    whole = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=20, temperature=0)
    pieces = list(client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=20, temperature=0,
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text
    assert pieces[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_raw_stream_ends_with_done(server):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["object"] == "chat.completion.chunk" for line in lines[:-1])


def test_n_with_a_seed(client, model):
    messages = [image_message(random_image(1), QUESTION)]
    kwargs = dict(n=3, seed=1234, temperature=0.9, max_tokens=12)
    first, again = _chat(client, messages, **kwargs), _chat(client, messages, **kwargs)
    answers = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert answers == [c.message.content for c in again.choices]  # reproducible
    for i, answer in enumerate(answers):  # choice i is the answer with seed + i
        assert answer == model.generate(random_image(1), QUESTION, max_new_tokens=12, temperature=0.9,
                                        seed=1234 + i)
    assert len(set(answers)) > 1
    assert first.usage.completion_tokens == sum(
        len(_submit_one(model, build_prompt(QUESTION), [random_image(1)], max_new_tokens=12, temperature=0.9,
                        seed=1234 + i)[1].output_ids) for i in range(3))


def _all_logits(model, ids: list[int], image) -> torch.Tensor:
    """[T, V] logits of every position of ids (image markers expanded), by one prefill through a fresh cache."""
    from phi_fast.image import preprocess

    llava, t = model.llava, model.config.text
    px = None if image is None else preprocess(image, image_size=model.config.vision.image_size,
                                               pad_to_square=model.config.pad_to_square)[None]
    embeds = llava.embed_prompt(ids, px)
    n = embeds.shape[0]
    pool = PagePool(num_layers=t.num_layers, num_heads=t.num_heads, head_dim=t.head_dim, num_pages=n // 16 + 1)
    seq = SequencePages()
    slots = seq.reserve(pool, n)
    batch = StepBatch(positions=torch.arange(n), slot_mapping=torch.tensor(slots),
                      block_table=torch.tensor([seq.pages], dtype=torch.int32),
                      seq_lens=torch.tensor([n], dtype=torch.int32),
                      cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32), no_prefix=True)
    with torch.inference_mode():
        return llava.forward(embeds, batch, pool, all_logits=True)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_are_log_softmax_of_the_logits(client, model, temperature):
    image = random_image(4)
    out = _chat(client, [image_message(image, QUESTION)], logprobs=True, top_logprobs=5, max_tokens=10,
                temperature=temperature, seed=7, extra_body={"ignore_eos": True})
    _, req = _submit_one(model, build_prompt(QUESTION), [image], max_new_tokens=10, temperature=temperature, seed=7,
                         ignore_eos=True)
    content = out.choices[0].logprobs.content
    assert len(content) == len(req.output_ids) == 10  # the first from the prefill step, the rest from decode
    prompt_ids = tokenize_prompt(model.tokenizer, build_prompt(QUESTION))
    logp = torch.log_softmax(_all_logits(model, prompt_ids + req.output_ids[:-1], image).float(), dim=-1)
    rows = logp[len(req.keys) - 1:]  # the row that predicts each generated token
    for k, (entry, token) in enumerate(zip(content, req.output_ids)):
        assert bytes(entry.bytes) == model.tokenizer.token_bytes(token)
        assert entry.logprob == pytest.approx(rows[k, token].item(), abs=1e-4)
        top = torch.topk(rows[k], 5)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [bytes(t.bytes) for t in entry.top_logprobs] == [model.tokenizer.token_bytes(i)
                                                                for i in top.indices.tolist()]
    streamed = _chat(client, [image_message(image, QUESTION)], logprobs=True, top_logprobs=5, max_tokens=10,
                     temperature=temperature, seed=7, extra_body={"ignore_eos": True}, stream=True)
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in entries] == [e.token for e in content]
    # the same up to rounding: this prefill starts from the first request's cached prefix pages
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in content], abs=1e-4)


def test_completion_logprobs(client, model):
    prompt = "USER: Hello there ASSISTANT:"
    out = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(value)  # greedy: the sampled one is the top
    without = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0)
    assert without.choices[0].logprobs is None


def test_stop_strings_and_max_tokens(client, model):
    messages = [image_message(random_image(6), QUESTION)]
    full = _chat(client, messages, max_tokens=40, extra_body={"ignore_eos": True}).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip() == stop and stop  # a stop string inside the answer
    cut = _chat(client, messages, max_tokens=40, stop=[stop, "never appears"], extra_body={"ignore_eos": True})
    assert cut.choices[0].message.content == full[: full.index(stop)].strip()
    assert cut.choices[0].finish_reason == "stop"
    short = _chat(client, messages, max_tokens=3, extra_body={"ignore_eos": True})
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    newer = _chat(client, messages, max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert newer.choices[0].message.content == short.choices[0].message.content


def test_32_concurrent_streaming_clients(server, model):
    cases = [(random_image(i % 4) if i % 3 else None, f"Question {i}: what do you see?", 4 + (i * 5) % 21)
             for i in range(32)]
    expected = [model.generate(image, q, max_new_tokens=n) for image, q, n in cases]

    async def one(client: openai.AsyncOpenAI, image, question: str, n: int) -> str:
        stream = await client.chat.completions.create(model=MODEL_NAME, messages=[image_message(image, question)],
                                                      max_tokens=n, temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def run_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(one(client, *case) for case in cases))

    model.loop.call(lambda e: setattr(e, "peak_batch", 0))  # what earlier tests batched does not count
    answers = asyncio.run(run_all())
    assert answers == expected  # each its own answer: nothing lost, duplicated or mixed up
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    peak = float(next(line.split()[-1] for line in metrics.splitlines()
                      if line.startswith("phi_fast_peak_batch_size ")))
    assert peak > 1  # the engine batched them


def test_models_health_and_metrics(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    _chat(client, [{"role": "user", "content": "Hi"}], max_tokens=2)
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    for name in ("phi_fast_requests_total", "phi_fast_prompt_tokens_total", "phi_fast_generation_tokens_total",
                 "phi_fast_time_to_first_token_seconds_bucket", "phi_fast_inter_token_latency_seconds_bucket",
                 "phi_fast_num_requests_running", "phi_fast_num_requests_waiting", "phi_fast_kv_cache_pages_used",
                 "phi_fast_prefix_cache_hits_total", "phi_fast_preemptions_total"):
        assert name in text, name
    assert 'phi_fast_requests_total{route="/v1/chat/completions",status="200"}' in text
