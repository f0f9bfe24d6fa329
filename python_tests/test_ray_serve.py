"""phi_fast on Ray Serve (phi_fast.serving.ray), as clients meet it: a local Ray instance started once for the
session, the tiny checkpoint on CPU replicas, the official `openai` client (and httpx for headers and raw bytes).

Every answer is compared with the single server's (create_app under uvicorn, server_fixtures.py) on the same
request, greedy. The Ray tests skip when ray is not installed; the option checks run everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import io
import json
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest

from phi_fast.cli import main
from phi_fast.serving.media import MediaPolicy

from engine_fixtures import random_image
from package_under_test import child_env, run_python
from server_fixtures import API_KEY, MODEL_NAME, ckpt, data_url, model, server  # noqa: F401 (fixtures)

try:
    import ray
    from ray import serve
except ImportError:
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="needs ray: pip install 'phi_fast[ray]'")
AUTH = {"Authorization": f"Bearer {API_KEY}"}
HEADER = "x-phi-fast-replica"
DEADLINE_S = 180.0  # a bound for conditions polled on a loaded 2-core machine, never a measured time
POLL_S = 0.2


def _wait_until(condition, what: str, timeout: float = DEADLINE_S):
    """Poll `condition` until it returns a true value (returned) or the deadline passes (the test fails)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(POLL_S)
    pytest.fail(f"timed out waiting for {what}")


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


# --- the command line, with and without Ray --------------------------------------------------------------------


def test_serve_ray_without_ray_is_a_clear_error(ckpt):
    code = ("import sys; sys.modules['ray'] = None; from phi_fast.cli import main; "
            f"sys.exit(main(['serve', '--ray', '--model', {str(ckpt)!r}]))")
    result = run_python(["-c", code], timeout=120)
    assert result.returncode == 1, result.stderr
    assert "pip install 'phi_fast[ray]'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("argv, names", [
    (["--replicas", "2"], "--replicas needs --ray"),
    (["--ray-address", "auto"], "--ray-address needs --ray"),
    (["--affinity-imbalance", "2"], "--affinity-imbalance needs --ray"),
    (["--ray", "--replicas", "2", "--max-replicas", "3"], "not both"),
    (["--ray", "--min-replicas", "3", "--max-replicas", "2"], "--min-replicas 3 is more than --max-replicas 2"),
    (["--ray", "--replicas", "2", "--target-ongoing-requests", "4"], "--target-ongoing-requests needs"),
    (["--ray", "--replica-cpus", "0"], "--replica-cpus must be > 0"),
])
def test_ray_options_are_checked_before_anything_starts(ckpt, capsys, argv, names):
    assert main(["serve", "--model", str(ckpt), *argv]) == 1
    err = capsys.readouterr().err
    assert names in err and "Traceback" not in err


# --- the routing decision ----------------------------------------------------------------------------------------


@needs_ray
def test_rank_replicas_keeps_an_image_on_its_replica_and_moves_only_a_gone_replicas_images():
    from phi_fast.serving.ray import rank_replicas

    replicas, keys, idle = ["a", "b", "c", "d"], [f"image{k}" for k in range(200)], {}
    owner = {k: rank_replicas(replicas, k, None, idle, 64)[0] for k in keys}
    assert all(len(o) == 1 for o in owner.values()) and {o[0] for o in owner.values()} == set(replicas)
    assert all(rank_replicas(replicas, k, None, idle, 64) == [owner[k], [r for r in replicas if r not in owner[k]]]
               for k in keys)
    without_c = {k: rank_replicas(["a", "b", "d"], k, None, idle, 64)[0] for k in keys}
    assert all(without_c[k] == owner[k] for k in keys if owner[k] != ["c"])
    assert all(without_c[k] != ["c"] for k in keys)
    key = keys[0]
    busy = {owner[key][0]: 70}  # a batch (64) more than the others: the image's requests go to the least loaded
    assert rank_replicas(replicas, key, None, busy, 64) == [replicas]
    assert rank_replicas(replicas, key, None, {owner[key][0]: 64}, 64)[0] == owner[key]
    assert rank_replicas(replicas, None, None, idle, 64) == [replicas]  # no image: the least loaded of all
    assert rank_replicas(replicas, key, "b", idle, 64) == [["b"]]  # a named replica, while it is alive
    assert rank_replicas(replicas, key, "gone", idle, 64)[0] == owner[key]


# --- fixtures: one Ray instance, the deployment, images served over HTTP -----------------------------------------


@pytest.fixture(scope="session")
def cluster():
    """A local Ray instance for the session (2 logical CPUs: one per replica; no dashboard): its address, Serve's
    port, and the port of Ray's Prometheus metrics export (`ray start --metrics-export-port`)."""
    if ray is None:
        pytest.skip("needs ray")
    metrics_port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port,
             runtime_env={"env_vars": {"PYTHONPATH": child_env()["PYTHONPATH"]}})
    try:
        yield SimpleNamespace(address=ray.get_runtime_context().gcs_address, port=_free_port(),
                              metrics_port=metrics_port)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_url(cluster, ckpt):
    """Two CPU replicas of the tiny checkpoint behind one endpoint (the base URL, .../v1)."""
    from phi_fast.serving.ray import APP_NAME, build_app, deploy

    app_options = {"api_key": API_KEY, "served_model_name": MODEL_NAME, "max_body_bytes": 2**20,
                   "media_policy": MediaPolicy(timeout_s=DEADLINE_S)}  # the gated images below wait this long
    url = deploy(build_app(str(ckpt), app_options=app_options, replicas=2, replica_cpus=1), port=cluster.port)
    yield url
    serve.delete(APP_NAME)


class GatedImages:
    """PNG images over HTTP (/N.png: random_image(N)); while the gate is closed each fetch waits for it, so the
    requests that name them are held mid-run inside their replica. `abandoned` counts the fetches whose
    connection was closed while they waited (their replica died, or gave up on the request)."""

    def __init__(self):
        self.gate, self.lock, self.waiting, self.abandoned = threading.Event(), threading.Lock(), 0, 0
        self.gate.set()
        images = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server name
                with images.lock:
                    images.waiting += 1
                try:
                    deadline = time.monotonic() + DEADLINE_S
                    while not images.gate.wait(POLL_S) and time.monotonic() < deadline:
                        if _closed(self.connection):
                            with images.lock:
                                images.abandoned += 1
                            return
                finally:
                    with images.lock:
                        images.waiting -= 1
                buf = io.BytesIO()
                random_image(int(self.path.strip("/").split(".")[0])).save(buf, "PNG")
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(buf.getvalue())))
                self.end_headers()
                with contextlib.suppress(OSError):  # the replica that asked may be dead
                    self.wfile.write(buf.getvalue())

            def log_message(self, *args):
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.gate.set()
        self.http.shutdown()
        self.http.server_close()


def _closed(sock: socket.socket) -> bool:
    """The peer closed the connection (a GET sends nothing more, so readable means closed)."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


@pytest.fixture(scope="module")
def gated_images():
    images = GatedImages()
    yield images
    images.close()


def _chat_body(url: str | None, question: str = "What is the cat doing?", **kwargs):
    content = question if url is None else [{"type": "image_url", "image_url": {"url": url}},
                                            {"type": "text", "text": question}]
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 16,
            "temperature": 0, **kwargs}


def _image_of(body) -> str:
    return body["messages"][0]["content"][0]["image_url"]["url"]


def _post(base: str, body, headers=None, path="/chat/completions", **kwargs) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, headers={**AUTH, **(headers or {})}, timeout=DEADLINE_S,
                      **kwargs)


def _answer(response: httpx.Response) -> tuple:
    """What must not depend on the server: text, finish reason, token counts (ids and times do)."""
    assert response.status_code == 200, response.text
    body = response.json()
    return ([(c["message"]["content"], c["finish_reason"]) for c in body["choices"]], body["usage"])


def _owners(ray_url: str, urls: list[str]) -> dict[str, str]:
    """The replica that answers a request about each image URL."""
    return {url: _post(ray_url, _chat_body(url, max_tokens=1)).headers[HEADER] for url in urls}


def _images_per_replica(ray_url: str, make_url, per_replica: int) -> dict[str, list[str]]:
    """`per_replica` image URLs (make_url(seed)) that each of the two replicas owns, found by asking."""
    found: dict[str, list[str]] = {}
    for seed in range(64):  # two replicas each own about half of the images: 64 leave nothing to chance
        url = make_url(seed)
        found.setdefault(_owners(ray_url, [url])[url], []).append(url)
        if len(found) == 2 and all(len(v) >= per_replica for v in found.values()):
            return {r: v[:per_replica] for r, v in found.items()}
    pytest.fail(f"the images did not spread over two replicas: {found}")


# --- the deployment -----------------------------------------------------------------------------------------------


@needs_ray
def test_serve_command_deploys_on_ray_and_stops_on_sigterm(cluster, ckpt, server):
    """`phi_fast serve --ray` joins the session's cluster (autoscaled: 1 to 2 replicas, it starts with 1), answers
    like the single server, and on SIGTERM lets a running stream finish before it deletes its deployment and exits
    0."""
    proc = subprocess.Popen([sys.executable, "-m", "phi_fast", "serve", "--ray", "--ray-address", cluster.address,
                             "--min-replicas", "1", "--max-replicas", "2", "--model", str(ckpt),
                             "--port", str(cluster.port), "--served-model-name", MODEL_NAME, "--api-key", API_KEY,
                             "--shutdown-timeout", "60"],
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [stderr.put(x) for x in proc.stderr], daemon=True).start()
    try:
        seen: list[str] = []
        while not seen or not seen[-1].startswith("phi_fast serve: "):  # after Ray's own lines
            try:
                seen.append(stderr.get(timeout=DEADLINE_S))
            except queue.Empty:
                pytest.fail(f"no URL line from the serve command; its stderr: {seen}")
        line = seen[-1]
        url = line.split(" at ")[1].split()[0]
        body = _chat_body(None, max_tokens=8)
        assert _answer(_post(url, body)) == _answer(_post(server.url + "/v1", body))
        stream_body = {**body, "stream": True, "max_tokens": 24, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/chat/completions", json=stream_body, headers=AUTH, timeout=60) as r:
            assert r.headers[HEADER]
            lines = r.iter_lines()
            next(lines)  # the request is in flight ...
            proc.send_signal(signal.SIGTERM)  # ... when the command is told to stop: the answer still ends
            rest = [x for x in lines if x]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(120) == 0
        assert "phi_fast" not in serve.status().applications
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stderr.close()


@needs_ray
def test_sixteen_concurrent_requests_equal_the_single_server(ray_url, server):
    """4 images x 3 requests (two images owned by each replica) and 4 streamed text-only requests, all at once
    through the openai client: each equals the single server's answer; each image stays on its replica."""
    owned = _images_per_replica(ray_url, lambda seed: data_url(random_image(seed)), per_replica=2)
    images = [url for urls in owned.values() for url in urls]
    bodies = [_chat_body(url, f"Question {k} about it?") for url in images for k in range(3)]
    streamed = [_chat_body(None, f"Text question {k}?") for k in range(4)]

    async def run():
        async with openai.AsyncOpenAI(base_url=ray_url, api_key=API_KEY, max_retries=0, timeout=DEADLINE_S) as c:
            async def one(body):
                raw = await c.chat.completions.with_raw_response.create(**body)
                return raw.headers[HEADER], raw.parse()

            async def one_streamed(body):
                raw = await c.chat.completions.with_raw_response.create(**body, stream=True)
                chunks = [chunk async for chunk in raw.parse()]
                text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
                return raw.headers[HEADER], text, chunks[-1].choices[0].finish_reason

            return await asyncio.gather(asyncio.gather(*map(one, bodies)), asyncio.gather(*map(one_streamed,
                                                                                              streamed)))

    answers, stream_answers = asyncio.run(run())
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as single:
        for body, (_, out) in zip(bodies, answers):
            alone = single.chat.completions.create(**body)
            assert out.choices[0].message.content == alone.choices[0].message.content
            assert out.choices[0].finish_reason == alone.choices[0].finish_reason and out.usage == alone.usage
        for body, (_, text, finish) in zip(streamed, stream_answers):
            alone = single.chat.completions.create(**body)
            assert (text, finish) == (alone.choices[0].message.content, alone.choices[0].finish_reason)
    for replica, urls in owned.items():
        for url in urls:
            landed = {r for body, (r, _) in zip(bodies, answers) if _image_of(body) == url}
            assert landed == {replica}, "requests about one image went to several replicas"
    assert {r for r, _ in answers} == set(owned), "both replicas answer"


@needs_ray
def test_errors_and_raw_streams_are_the_single_servers(ray_url, server):
    single = server.url + "/v1"
    for path, body, headers in [("/chat/completions", _chat_body(None), {"Authorization": "Bearer wrong"}),
                                ("/chat/completions", _chat_body(None, temperature=-1), {}),
                                ("/chat/completions", {"model": "nope", "messages": []}, {}),
                                ("/nowhere", {}, {})]:
        via_ray, alone = _post(ray_url, body, headers, path), _post(single, body, headers, path)
        assert via_ray.status_code == alone.status_code and via_ray.json() == alone.json()
        assert via_ray.headers[HEADER]
    too_big = b'{"x": "' + b"a" * 2**20 + b'"}'
    via_ray = httpx.post(f"{ray_url}/chat/completions", content=too_big, headers=AUTH, timeout=60)
    assert via_ray.status_code == 413 and via_ray.json()["error"]["message"] == \
        httpx.post(f"{single}/chat/completions", content=too_big, headers=AUTH, timeout=60).json()["error"]["message"]

    def raw_stream(base):  # the SSE bytes, less the ids and timestamps that differ by request
        body = _chat_body(None, "Hi", stream=True, max_tokens=6, stream_options={"include_usage": True})
        with httpx.stream("POST", f"{base}/chat/completions", json=body, headers=AUTH, timeout=60) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [line for line in r.iter_lines() if line]
        return [{k: v for k, v in json.loads(e[6:]).items() if k not in ("id", "created")} if e != "data: [DONE]"
                else e for e in events]

    assert raw_stream(ray_url) == raw_stream(single)


def _chat_200s(lines: list[str], prefix: str) -> float | None:
    """The value of the chat route's status-200 request counter among Prometheus text lines (None: absent)."""
    for line in lines:
        if line.startswith(prefix) and 'route="/v1/chat/completions"' in line and 'status="200"' in line:
            return float(line.split()[-1])
    return None


@needs_ray
def test_each_replica_answers_its_metrics_and_health_and_exports_them_to_ray(cluster, ray_url):
    owned = _images_per_replica(ray_url, lambda seed: data_url(random_image(seed)), per_replica=1)
    root = ray_url.removesuffix("/v1")
    counts = {}
    for replica in owned:
        assert _post(ray_url, _chat_body(None, max_tokens=2), {HEADER: replica}).headers[HEADER] == replica
        metrics = httpx.get(f"{root}/metrics", headers={HEADER: replica}, timeout=60)
        assert metrics.status_code == 200 and metrics.headers[HEADER] == replica
        counts[replica] = _chat_200s(metrics.text.splitlines(), "phi_fast_requests_total{")
        assert counts[replica] >= 1
        health = httpx.get(f"{root}/health", headers={HEADER: replica}, timeout=60)
        assert (health.status_code, health.json(), health.headers[HEADER]) == (200, {"status": "ok"}, replica)

    def exported():  # Ray's export, tagged by replica, once it has caught up with the counts read above
        text = httpx.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=60).text
        mine = {r: [line for line in text.splitlines() if f'replica="{r}"' in line] for r in owned}
        return all((_chat_200s(lines, "ray_phi_fast_requests_total{") or 0) >= counts[r] for r, lines in mine.items())

    _wait_until(exported, "each replica's request counts in Ray's metrics export")


@needs_ray
def test_a_client_that_goes_away_lets_go_of_its_request_on_the_replica(ray_url, gated_images):
    """A client disconnects while its request waits inside a replica (for its image): the proxy, the relay and
    the replica let go of it (the replica abandons the image fetch) and the replica goes on answering."""
    owned = _images_per_replica(ray_url, lambda seed: f"{gated_images.url}/{seed}.png", per_replica=1)
    replica, [url] = next(iter(owned.items()))
    body = json.dumps(_chat_body(url, max_tokens=200, ignore_eos=True)).encode()
    address = httpx.URL(ray_url)
    before = gated_images.abandoned
    gated_images.gate.clear()
    try:
        with socket.create_connection((address.host, address.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            _wait_until(lambda: gated_images.waiting == 1, "the request to fetch its image")
        _wait_until(lambda: gated_images.abandoned == before + 1, "the replica to let go of the request")
    finally:
        gated_images.gate.set()
    response = _post(ray_url, _chat_body(None), {HEADER: replica})
    assert response.status_code == 200 and response.headers[HEADER] == replica


@needs_ray
def test_a_killed_replica_fails_its_requests_with_503_and_is_replaced(ray_url, server, gated_images):
    """4 requests held mid-run on each replica (their images wait behind a closed gate); one replica's actor is
    killed: its requests get 503, the other's finish with the single server's answers, Ray starts a new one."""
    from phi_fast.serving.ray import REPLICA_NAME, replica_actor

    owned = _images_per_replica(ray_url, lambda seed: f"{gated_images.url}/{seed}.png", per_replica=1)
    (doomed, [doomed_url]), (survivor, [survivor_url]) = owned.items()
    bodies = [_chat_body(url, f"Question {k}?") for url in (doomed_url, survivor_url) for k in range(4)]
    results: list[httpx.Response | None] = [None] * len(bodies)

    def send(i):
        results[i] = _post(ray_url, bodies[i])

    gated_images.gate.clear()
    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    _wait_until(lambda: gated_images.waiting == len(bodies), "every request to be fetching its image")
    ray.kill(replica_actor(doomed), no_restart=True)
    _wait_until(lambda: all(results[i] is not None for i in range(4)), "the dead replica's requests to fail")
    gated_images.gate.set()  # only now can the survivor's requests go on
    for t in threads:
        t.join(DEADLINE_S)
    for body, response in zip(bodies, results):
        url = _image_of(body)
        if url == doomed_url:
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "replica_died" and response.headers[HEADER] == doomed
            assert response.headers["retry-after"]
        else:
            assert response.headers[HEADER] == survivor
            seed = int(url.rsplit("/", 1)[1].split(".")[0])  # the same pixels as a data: URL, for the single server
            alone = _chat_body(data_url(random_image(seed)), body["messages"][0]["content"][1]["text"])
            assert _answer(response) == _answer(_post(f"{server.url}/v1", alone))

    def replacement():
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if f"#{REPLICA_NAME}#" in a["name"]]
        new = [n.rsplit("#", 1)[1] for n in names if not n.endswith((doomed, survivor))]
        status = serve.status().applications["phi_fast"].deployments[REPLICA_NAME].replica_states
        return new[0] if new and status.get("RUNNING") == 2 else None

    new = _wait_until(replacement, "a replacement replica")
    response = _post(ray_url, _chat_body(None), {HEADER: new})
    assert response.headers[HEADER] == new
    assert _answer(response) == _answer(_post(f"{server.url}/v1", _chat_body(None)))
