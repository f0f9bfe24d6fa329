"""The OpenAI server on Ray Serve: replicas of `create_app`'s app behind one endpoint, on one machine or many.

    HTTP -> Ray Serve proxy -> Front (serve.ingress, one replica, no CPU) -> a PhiFastReplica (one Model each)

Why a front: Ray's proxy picks a replica before it has read the body, and the image a request is about is in
the body. The front reads the body, names the request's first image (a digest of its URL: a data: URL holds the
image bytes), and hands the raw request to a replica through a deployment handle whose router
(`ImageAffinityRouter`) sends one image to one replica: rendezvous hashing over the live replicas, so that a
replica's prefix cache keeps that image's pages and only the images of a replica that goes away move. Requests
without an image, and those whose replica is full (at max_ongoing_requests) or `imbalance` requests ahead of the
least loaded, go to the least loaded replica.

The front implements no route: it forwards the request's ASGI scope and body, and relays the ASGI messages the
replica's `create_app` app sends back (the same bytes, SSE streams included), adding one header,
`x-phi-fast-replica`, naming the replica that answered. A request that sends that header is routed to the named
replica (when it is alive), which is how each replica's /metrics and /health are read; each replica also copies
its /metrics figures into Ray's metrics export (`ray_phi_fast_*`, labelled with the replica).

A replica that dies is replaced by Ray; the requests it was answering get 503 (an OpenAI error object, code
`replica_died`; a stream that had started ends with that error event and `data: [DONE]`); others never notice.

Needs the `ray` extra: pip install 'phi_fast[ray]'.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import threading
from collections.abc import AsyncIterator
from typing import Any

try:
    import ray
    from ray import serve
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve import metrics as serve_metrics
    from ray.serve.config import RequestRouterConfig
    from ray.serve.handle import DeploymentHandle
    from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica
except ImportError as error:
    raise ImportError(f"phi_fast on Ray Serve needs the ray extra: pip install 'phi_fast[ray]' ({error})") from None

from starlette.types import Message, Receive, Scope, Send

from .app import MAX_BODY_BYTES, RETRY_AFTER_S, ClientGone, _error_response, _unless_disconnected
from .protocol import APIError

log = logging.getLogger(__name__)

APP_NAME = "phi_fast"
FRONT_NAME = "Front"
REPLICA_NAME = "PhiFastReplica"
REPLICA_HEADER = "x-phi-fast-replica"
FRONT_MAX_ONGOING = 10_000  # the front only relays bytes; the replicas' limits are what bound the work
HEALTH_TIMEOUT_S = 30.0
# After its client went away, how long a request's app task may take to notice (it does at once while it answers)
# before it is cancelled: a request still fetching its image only notices when it is cancelled.
DISCONNECT_GRACE_S = 5.0
METRICS_EXPORT_PERIOD_S = 5.0  # how often a replica copies its /metrics figures into Ray's metrics
LEAST_LOADED_SAMPLE = 8  # over this many replicas, the least loaded is sought among two random ones, not all
_SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string",
               "root_path", "headers", "client", "server")


class PhiFastReplica:
    """One replica: a phi_fast Model and the app `create_app` builds on it; `forward` runs one HTTP request."""

    def __init__(self, model_path: str, load_options: dict[str, Any], app_options: dict[str, Any],
                 threads: int | None = None):
        import torch

        from ..api import load
        from .app import create_app

        if threads is not None:
            torch.set_num_threads(threads)
        self.model = load(model_path, progress=False, **load_options)
        self.app = create_app(self.model, **app_options)
        self.name = serve.get_replica_context().replica_id.unique_id
        self.export = _MetricsExport(self.app.state.server.metrics.registry)
        log.info("replica %s serves %s", self.name, model_path)

    async def forward(self, scope: dict[str, Any], body: bytes, affinity: str | None = None,
                      replica: str | None = None) -> AsyncIterator[Message]:
        """The app's ASGI messages for one request, after a first {"type": "phi_fast.replica"} naming this
        replica. `affinity` and `replica` are read by the router (ImageAffinityRouter), not here. When the caller
        cancels (its client went away), the app is told the client disconnected, which aborts its requests."""
        yield {"type": "phi_fast.replica", "replica": self.name}
        messages: asyncio.Queue[Message | None] = asyncio.Queue()
        gone, body_sent = asyncio.Event(), False

        async def receive() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            messages.put_nowait(message)

        task = asyncio.ensure_future(self.app(scope, receive, send))
        task.add_done_callback(lambda _: messages.put_nowait(None))
        try:
            while (message := await messages.get()) is not None:
                yield message
        finally:
            gone.set()
            if not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_GRACE_S)
                task.cancel()
            if not task.cancelled() and task.done():
                task.exception()  # Starlette re-raises what the app already answered with 500 and logged

    async def check_health(self) -> None:
        """Ray's health check: the engine loop must answer (else Ray replaces this replica)."""
        await asyncio.to_thread(self.model.loop.call, lambda engine: None, HEALTH_TIMEOUT_S)

    def __del__(self) -> None:
        if hasattr(self, "export"):
            self.export.stop.set()
        model = getattr(self, "model", None)
        if model is not None:
            model.close(HEALTH_TIMEOUT_S)


class _MetricsExport:
    """A replica's /metrics figures copied into Ray's metrics (as gauges, every METRICS_EXPORT_PERIOD_S), which Ray
    Serve tags with the deployment and the replica: one scrape of each node's Ray metrics port then has the
    figures of every replica on that node."""

    def __init__(self, registry: Any):
        self.registry, self.gauges, self.stop = registry, {}, threading.Event()
        threading.Thread(target=self._run, name="phi_fast-metrics-export", daemon=True).start()

    def _run(self) -> None:
        while not self.stop.wait(METRICS_EXPORT_PERIOD_S):
            try:
                self.export()
            except Exception:  # noqa: BLE001 - a metric that cannot be copied must not stop the others
                log.warning("copying the metrics into Ray's failed", exc_info=True)

    def export(self) -> None:
        """Copy every sample once (the engine's figures are read through the engine loop, as at a scrape)."""
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):  # prometheus_client's creation times: no figure
                    continue
                keys = tuple(sorted(sample.labels))
                gauge = self.gauges.get((sample.name, keys))
                if gauge is None:
                    gauge = self.gauges[sample.name, keys] = serve_metrics.Gauge(
                        sample.name, description=family.documentation, tag_keys=keys)
                gauge.set(sample.value, tags=dict(sample.labels) or None)


class ImageAffinityRouter(RequestRouter):
    """Routes `PhiFastReplica.forward` calls: the replica a request names (`replica=`) when it is alive; else the
    replica its image (`affinity=`) hashes to, unless that one already has `imbalance` more requests than the
    least loaded (a hot image must not pile up on one replica); else, and after it, the least loaded."""

    def initialize_state(self, imbalance: int = 64) -> None:
        self.imbalance = imbalance

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        kwargs = pending_request.kwargs if pending_request is not None else {}
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = {i: self.replica_queue_len_cache.get(r.replica_id) for i, r in by_id.items()}
        ranks = rank_replicas(list(by_id), kwargs.get("affinity"), kwargs.get("replica"), loads,
                              getattr(self, "imbalance", 64))
        return [[by_id[i] for i in ids] for ids in ranks]


def rank_replicas(replicas: list[str], key: str | None, named: str | None, loads: dict[str, int | None],
                  imbalance: int) -> list[list[str]]:
    """The routing decision over replica ids, best rank first (Ray takes the least loaded of the first rank that
    has room). `loads`: each replica's queue length as last seen (None: not known, taken as no load)."""
    if named in replicas:
        return [[named]]
    pool = replicas if len(replicas) <= LEAST_LOADED_SAMPLE else random.sample(replicas, 2)
    if not key or len(replicas) < 2:
        return [pool]
    owner = max(replicas, key=lambda r: _score(key, r))
    least = min((loads.get(r) or 0) for r in replicas)
    if (loads.get(owner) or 0) - least > imbalance:
        return [pool]
    return [[owner], [r for r in pool if r != owner] or [r for r in replicas if r != owner]]


def _score(key: str, replica: str) -> int:
    """Rendezvous hashing: the replica with the highest score for a key owns it; when a replica goes, only the
    keys it owned move (each to its own next best)."""
    return int.from_bytes(hashlib.blake2b(f"{key}|{replica}".encode(), digest_size=8).digest(), "big")


def affinity_key(path: str, body: bytes) -> str | None:
    """The digest of a chat request's first image URL (None: no image, or not a chat request the app accepts)."""
    if path != "/v1/chat/completions":
        return None
    try:
        messages = json.loads(body).get("messages")
        for message in messages:
            for part in message.get("content") if isinstance(message.get("content"), list) else ():
                if isinstance(part, dict) and part.get("type") == "image_url":
                    url = part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"]
                    return hashlib.sha256(str(url).encode()).hexdigest()
    except (ValueError, AttributeError, TypeError, KeyError):
        pass  # the replica's app answers a malformed body with its own 400
    return None


class Front:
    """The ingress (serve.ingress, built at replica start): forwards each HTTP request to a PhiFastReplica."""

    def __init__(self, replicas: DeploymentHandle, max_body_bytes: int):
        self.replicas, self.max_body_bytes = replicas, max_body_bytes

    def __serve_build_asgi_app__(self) -> "_Relay":
        return _Relay(self.replicas.options(stream=True), self.max_body_bytes)


class _Relay:
    """The front's ASGI app: no routes, only the request's bytes out and the response's bytes back."""

    def __init__(self, replicas: DeploymentHandle, max_body_bytes: int):
        self.replicas, self.max_body_bytes = replicas, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await self._read_body(receive)
        headers = dict(scope["headers"])
        named = headers.get(REPLICA_HEADER.encode(), b"").decode("latin-1") or None
        stream = self.replicas.forward.remote({k: scope[k] for k in _SCOPE_KEYS if k in scope}, body,
                                              affinity=affinity_key(scope["path"], body), replica=named)
        answered = False
        try:
            await _unless_disconnected(receive, _relay(stream, send))
            answered = True
        except ClientGone:
            pass
        finally:
            if not answered:  # the client went away (or Serve cancelled us): the replica's app is told the
                stream.cancel()  # client disconnected, which aborts the request's engine work

    async def _read_body(self, receive: Receive) -> bytes:
        """The body, cut one byte past the app's limit (the app then answers 413 as it does alone)."""
        chunks, size, more = [], 0, True
        while more and size <= self.max_body_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
        return b"".join(chunks)


async def _relay(stream: Any, send: Send) -> None:
    """Send the replica's ASGI messages on, with the replica header; a replica that dies becomes a 503."""
    replica, started, sse = "", False, False
    try:
        async for message in stream:
            if message["type"] == "phi_fast.replica":
                replica = message["replica"]
                continue
            if message["type"] == "http.response.start":
                started = True
                sse = any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in message["headers"])
                message = {**message, "headers": [*message["headers"], (REPLICA_HEADER.encode(), replica.encode())]}
            await send(message)
    except (RayActorError, ActorUnavailableError) as error:
        log.warning("replica %s died answering a request: %s", replica or "(unknown)", type(error).__name__)
        await _fail(APIError(503, f"the replica {replica or '(unknown)'} answering this request died; retry it "
                             "(Ray replaces the replica)", code="replica_died",
                             headers={"Retry-After": str(RETRY_AFTER_S), REPLICA_HEADER: replica}), started, sse, send)
    except Exception:  # noqa: BLE001 - a bug here, not the client's: logged, answered 500 as the app would
        log.exception("relaying a request from replica %s failed", replica or "(unknown)")
        await _fail(APIError(500, "internal server error (the details are in the server's log)",
                             headers={REPLICA_HEADER: replica}), started, sse, send)


async def _fail(error: APIError, started: bool, sse: bool, send: Send) -> None:
    """Answer `error`; when the status is already sent, end the body instead (a stream with the error event and
    `data: [DONE]`, as the app ends a stream whose request failed)."""
    if not started:
        await _error_response(error)({"type": "http"}, _no_receive, send)
        return
    tail = (b"data: " + json.dumps(error.body()).encode() + b"\n\ndata: [DONE]\n\n") if sse else b""
    await send({"type": "http.response.body", "body": tail, "more_body": False})


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def build_app(model_path: str, *, load_options: dict[str, Any] | None = None,
              app_options: dict[str, Any] | None = None, replicas: int | None = None,
              min_replicas: int | None = None, max_replicas: int | None = None,
              target_ongoing_requests: float | None = None,
              replica_cpus: float = 1.0, num_gpus: float = 0.0, max_ongoing_requests: int = 320,
              imbalance: int = 64, shutdown_timeout_s: float = 30.0) -> Any:
    """The Serve application (front + replicas) serving the checkpoint folder `model_path` (which every node
    must see at that path).

    load_options: phi_fast.load keywords (device, dtype, quantize, token_budget, max_num_seqs, cache_memory).
    app_options: create_app keywords (api_key, served_model_name, max_waiting, media_policy, max_body_bytes).
    replicas: a fixed count (default 1); or min_replicas..max_replicas, autoscaled by Ray on ongoing requests per
    replica (target_ongoing_requests, default half of max_ongoing_requests). replica_cpus: CPUs each replica reserves
    (also its torch threads on CPU); num_gpus: GPUs each replica reserves (1 for a CUDA model: Ray gives each
    replica its own). max_ongoing_requests: what Ray sends one replica at most (more wait in the router);
    default: the app's batch (64) plus its waiting queue (256), so the app's own 503 applies first.
    imbalance: how many more requests than the least loaded replica an image's replica may have before that
    image's requests go elsewhere (default: a batch of 64).
    """
    load_options, app_options = dict(load_options or {}), dict(app_options or {})
    autoscale = min_replicas is not None or max_replicas is not None
    if autoscale and replicas is not None:
        raise ValueError("give either replicas or min_replicas/max_replicas, not both")
    if autoscale:
        lo, hi = (min_replicas if min_replicas is not None else 1), (max_replicas if max_replicas is not None else
                                                                    max(1, min_replicas or 1))
        if not 0 <= lo <= hi or hi < 1:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got {lo}..{hi}")
    elif replicas is None:
        replicas = 1
    elif replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas!r}")
    if replica_cpus <= 0:
        raise ValueError(f"replica_cpus must be > 0, got {replica_cpus!r}")
    if imbalance < 0:
        raise ValueError(f"imbalance must be >= 0, got {imbalance!r}")
    if target_ongoing_requests is not None and target_ongoing_requests <= 0:
        raise ValueError(f"target_ongoing_requests must be > 0, got {target_ongoing_requests!r}")
    device = str(load_options.get("device", "cpu"))
    if device.startswith("cuda"):
        load_options["device"] = "cuda"  # Ray makes the replica's own GPU the only one it sees: cuda:0
        num_gpus = num_gpus or 1.0
    scaling: dict[str, Any] = (
        {"autoscaling_config": {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                "target_ongoing_requests": target_ongoing_requests or max_ongoing_requests / 2}}
        if autoscale else {"num_replicas": replicas})
    threads = None if device.startswith("cuda") else max(1, round(replica_cpus))
    replica = serve.deployment(PhiFastReplica, name=REPLICA_NAME).options(
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": num_gpus}, max_ongoing_requests=max_ongoing_requests,
        graceful_shutdown_timeout_s=shutdown_timeout_s, health_check_timeout_s=HEALTH_TIMEOUT_S + 10,
        request_router_config=RequestRouterConfig(request_router_class=ImageAffinityRouter,
                                                  request_router_kwargs={"imbalance": imbalance}), **scaling)
    front = serve.deployment(serve.ingress()(Front), name=FRONT_NAME).options(
        num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=FRONT_MAX_ONGOING,
        graceful_shutdown_timeout_s=shutdown_timeout_s)
    return front.bind(replica.bind(str(model_path), load_options, app_options, threads),
                      app_options.get("max_body_bytes", MAX_BODY_BYTES))


def deploy(application: Any, *, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME) -> str:
    """Start Serve's HTTP proxies on host:port (unless Serve already runs on the cluster: then its own options
    stay) and run `application` at "/", waiting until every replica is up; returns the base URL (".../v1")."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(application, name=name, route_prefix="/")
    try:  # Serve keeps the HTTP options it first started with: the URL must name where it really listens
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        if (http.host, http.port) != (host, port):
            log.warning("Serve already ran on this cluster: it listens on %s:%s, not %s:%s", http.host, http.port,
                        host, port)
            host, port = http.host, http.port
    except Exception:  # noqa: BLE001 - a private Serve API; without it, the options asked for are shown
        log.debug("Serve's HTTP options unknown", exc_info=True)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/v1"


def replica_actor(replica: str, name: str = APP_NAME) -> Any:
    """The actor handle of the replica an `x-phi-fast-replica` header names (for tests and operators)."""
    return ray.get_actor(f"SERVE_REPLICA::{name}#{REPLICA_NAME}#{replica}", namespace="serve")
