"""The server's refusals and failures as OpenAI error objects, client disconnects, the busy queue, shutdown."""

from __future__ import annotations

import base64
import json
import select
import signal
import socket
import subprocess
import sys
import threading

import httpx
import openai
import pytest

import phi_fast

from engine_fixtures import random_image
from package_under_test import child_env
from server_fixtures import API_KEY, MODEL_NAME, ckpt, image_message, model, serve, server  # noqa: F401 (fixtures)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LONG = {"max_tokens": 200, "ignore_eos": True, "temperature": 0}  # still running when the test acts on it


def _post(server, body, path="/v1/chat/completions", headers=AUTH, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", headers=headers, timeout=60, **kwargs,
                      **({"json": body} if isinstance(body, (dict, list)) else {"content": body}))


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def _chat_body(**kwargs):
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **kwargs}


@pytest.mark.parametrize("body, names", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b"\xff\xfe not utf-8", "not valid JSON"),
    ({"model": MODEL_NAME}, "messages"),
    (_chat_body(messages=[{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]), "messages[0].content[0].type"),
    (_chat_body(messages=[{"role": "robot", "content": "Hi"}]), "messages[0].role"),
    (_chat_body(messages=[{"role": "assistant", "content": "Hi"}]), "user message"),
    (_chat_body(temperature=-1), "temperature"),
    (_chat_body(top_p=2), "top_p"),
    (_chat_body(max_tokens=0), "max_tokens"),
    (_chat_body(n=0), "n must be"),
    (_chat_body(stop=[""]), "stop"),
    (_chat_body(top_logprobs=30, logprobs=True), "top_logprobs"),
    (_chat_body(tools=[{"type": "function"}]), "tools"),
    (_chat_body(messages=[{"role": "user", "content": "Hi " * 400}]), "context"),
    (_chat_body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"no image").decode()}},
        {"type": "text", "text": "What?"}]}]), "messages[0].content[0].image_url.url"),
])
def test_bad_requests_are_400_naming_the_problem(server, body, names):
    assert names in _error(_post(server, body), 400)["message"]


def test_openai_client_sees_400_as_bad_request(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError, match="temperature"):
            client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                           temperature=-1)
        with pytest.raises(openai.BadRequestError, match="prompt"):
            client.completions.create(model=MODEL_NAME, prompt=["ok", 3])


def test_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        assert _error(_post(server, _chat_body(), headers=headers), 401)["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200  # monitoring stays open
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


def test_unknown_model_and_route_are_404(server):
    assert _error(_post(server, _chat_body(model="gpt-4")), 404)["code"] == "model_not_found"
    assert "no route" in _error(httpx.get(f"{server.url}/v1/nothing", headers=AUTH, timeout=30), 404)["message"]
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as client:
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="other", prompt="Hi", max_tokens=2)


def test_body_over_the_limit_is_413(server):
    big = json.dumps(_chat_body(messages=[{"role": "user", "content": "x" * (2**20)}]))
    assert "larger than" in _error(_post(server, big), 413)["message"]

    def chunked():  # no Content-Length: counted while it is read
        yield big.encode()

    assert _error(_post(server, chunked()), 413)


def test_media_policy_limits_images(model):
    from phi_fast.serving.media import MediaPolicy

    with serve(model, media_policy=MediaPolicy(allow_remote=False, max_bytes=2000)) as live:
        big = _chat_body(messages=[image_message(random_image(9), "What?")])  # a PNG of about 7 kB
        assert "messages[0].content[0].image_url.url" in _error(_post(live, big), 413)["message"]
        remote = _chat_body(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}]}])
        assert _error(_post(live, remote), 400)["param"] == "messages[0].content[0].image_url.url"


def test_internal_error_is_500_without_details(server, model, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(model, "submit", broken)
    response = _post(server, _chat_body())
    error = _error(response, 500)
    assert "secret" not in response.text and "Traceback" not in response.text
    assert error["type"] == "internal_error"


class _Aborts:
    """Counts Engine.abort calls of finished-by-abort requests: an event per abort, waited on with a bound."""

    def __init__(self, model, monkeypatch):
        self.event = threading.Event()
        real = model.engine.abort

        def abort(req):
            was_running = not req.finished
            real(req)
            if was_running:
                self.event.set()

        monkeypatch.setattr(model.engine, "abort", abort)


def _pages_used(model) -> int:
    return model.loop.call(lambda e: e.stats()["kv_pages_used"])


def test_disconnect_mid_stream_aborts_and_frees_pages(server, model, monkeypatch):
    baseline = _pages_used(model)
    aborts = _Aborts(model, monkeypatch)
    body = _chat_body(messages=[image_message(random_image(0), "Describe it.")], stream=True, **LONG)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        lines = r.iter_lines()
        contents = 0
        while contents < 3:  # the request is running: tokens arrive
            line = next(lines)
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                contents += 1
        assert _pages_used(model) > baseline
    assert aborts.event.wait(30), "the server did not abort the request of a client that went away"
    assert _pages_used(model) == baseline


def test_disconnect_while_waiting_for_a_whole_answer(server, model, monkeypatch):
    baseline = _pages_used(model)
    aborts = _Aborts(model, monkeypatch)
    submitted = threading.Event()
    real_submit = model.submit

    def submit(*args, **kwargs):
        handles = real_submit(*args, **kwargs)
        submitted.set()
        return handles

    monkeypatch.setattr(model, "submit", submit)
    body = json.dumps(_chat_body(**LONG)).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: " +
                     str(len(body)).encode() + b"\r\n\r\n" + body)
        assert submitted.wait(30)
    assert aborts.event.wait(30), "the server did not abort the request of a client that went away"
    assert _pages_used(model) == baseline


def test_busy_queue_is_503_with_retry_after(ckpt, monkeypatch):
    busy = phi_fast.load(ckpt, progress=False, max_num_seqs=1)
    aborts = _Aborts(busy, monkeypatch)
    hold, release = threading.Event(), threading.Event()
    real_step = busy.engine.step

    def step():  # once `hold` is set the engine stops between two steps until `release`: the running request stays
        if hold.is_set():
            release.wait(60)
        real_step()

    monkeypatch.setattr(busy.engine, "step", step)
    try:
        with serve(busy, max_waiting=0) as live:
            body = _chat_body(stream=True, **LONG)
            with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, headers=AUTH,
                              timeout=60) as running:
                lines = running.iter_lines()
                while not (line := next(lines)).startswith("data: ") or \
                        not json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    pass  # until its first token: it holds the only batch slot
                hold.set()
                response = _post(live, _chat_body())
                assert _error(response, 503)["code"] == "queue_full"
                assert response.headers["Retry-After"].isdigit()
                release.set()
            assert aborts.event.wait(30)
            with openai.OpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0) as client:
                # once the stream is gone its slot is free again
                out = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=2)
                assert out.choices[0].finish_reason in ("stop", "length")
            busy.close()
            assert httpx.get(f"{live.url}/health", timeout=30).status_code == 503  # the engine loop is gone
            assert _error(_post(live, _chat_body()), 503)["code"] == "engine_closed"
    finally:
        release.set()
        busy.close()


def _read_line(stream, timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "no output from the server process"
    return stream.readline()


def test_serve_command_shuts_down_gracefully_on_sigterm(ckpt):
    proc = subprocess.Popen([sys.executable, "-m", "phi_fast", "serve", "--model", str(ckpt), "--port", "0",
                             "--served-model-name", MODEL_NAME, "--api-key", API_KEY, "--shutdown-timeout", "60"],
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = _read_line(proc.stderr, 120)
        assert f"{MODEL_NAME} at http://127.0.0.1:" in line, line
        url = line.split(" at ")[1].split()[0]  # http://127.0.0.1:PORT/v1
        body = _chat_body(stream=True, max_tokens=24, ignore_eos=True)
        with httpx.stream("POST", f"{url}/chat/completions", json=body, headers=AUTH, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)  # the request is in flight ...
            proc.send_signal(signal.SIGTERM)  # ... when the server is told to stop: it finishes the answer
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        finishes = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in rest[:-1]]
        assert finishes[-1] == "length"
        assert proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url.replace("/v1", "/health"), timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stdout.close()
        proc.stderr.close()
