"""The engine loop: one thread owns the engine; callers in any thread submit requests and read their results.

    loop = EngineLoop(engine)
    req = engine.new_request(ids, pixels, params)   # checked in the caller's thread (raises ValueError there)
    handle = loop.submit(req)                        # queued on the engine thread; returns at once
    for piece in handle.stream(timeout=60): ...      # text deltas as the engine produces them
    text = handle.result(timeout=60)                 # or the final answer (raises the request's own error)
    handle.abort()                                   # finish it as "aborted", pages freed
    loop.call(lambda engine: engine.pool.num_free)   # run a function on the engine thread, get its result

Everything that touches the engine (queueing, aborting, stepping, reading pages) happens on the loop's thread, in
the order the commands arrive, so concurrent callers are batched together by continuous batching and each gets
exactly the tokens it would get alone (sampling is keyed by each request's seed and positions). Each request has
its own event queue; `on_update(handle)`, if given, is called on the engine thread whenever new events are queued
(an asyncio server passes `lambda h: aio_loop.call_soon_threadsafe(wake, h)` and then drains `handle.poll()`).

The loop survives every exception: a step never raises for a request's sake (Engine.step), and anything else that
escapes fails the requests the engine holds, which their callers then see. The thread starts at the first command
and stops at `close()`, which must run before the interpreter exits: a daemon thread left inside torch while C++
statics are destroyed aborts the process ("terminate called without an active exception"). The Model that owns
the loop closes it, waiting for the thread, when it is garbage-collected or at exit.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Iterator, NamedTuple

import torch

from .engine import Engine, Request

log = logging.getLogger(__name__)

TEXT, DONE = "text", "done"  # event kinds: a text delta; the request finished (see handle.request.finish_reason)


class Event(NamedTuple):
    """What a handle's queue holds. num_tokens: len(request.output_ids) when it was published; output_ids and
    request.logprobs are append-only, so their first num_tokens entries may be read from any thread."""

    kind: str  # TEXT or DONE
    text: str  # the text delta ("" for DONE)
    num_tokens: int


class EngineLoopClosed(RuntimeError):
    """The engine loop was closed (its Model was closed or garbage-collected)."""


class RequestHandle:
    """One submitted request: its events, its final answer, and a way to abort it. Safe to use from any thread."""

    def __init__(self, loop: "EngineLoop", request: Request, on_update: Callable[["RequestHandle"], Any] | None):
        self.request = request  # read its fields only once done() is True (the engine thread owns it until then)
        self._loop = loop
        self._on_update = on_update
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._done = threading.Event()
        self._text = ""  # the final answer, set on the engine thread before the DONE event

    def done(self) -> bool:
        """Whether the request has finished (any reason)."""
        return self._done.is_set()

    def abort(self) -> None:
        """Stop the request and free its pages (asynchronous; a no-op once finished or after close)."""
        if not self._done.is_set():
            self._loop._send("abort", self, strict=False)

    def get(self, timeout: float | None = None) -> Event:
        """The next event, waiting at most `timeout` seconds: (TEXT, piece, n) or (DONE, "", n) (TimeoutError)."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"request {self.request.id}: no result within {timeout} s") from None

    def poll(self) -> list[Event]:
        """Every event queued so far, without waiting."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def stream(self, timeout: float | None = None) -> Iterator[str]:
        """Text pieces until the request finishes; then raises its error if it failed. `timeout`: seconds for
        the whole request (TimeoutError, and the request is aborted)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                kind, piece, _ = self.get(None if deadline is None else max(0.0, deadline - time.monotonic()))
                if kind == DONE:
                    self._raise_error()
                    return
                yield piece
        finally:
            self.abort()

    def result(self, timeout: float | None = None) -> str:
        """The final answer (stripped), waiting at most `timeout` seconds; raises the request's error if it
        failed, TimeoutError (the request keeps running) if it has not finished in time."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request.id}: no result within {timeout} s")
        self._raise_error()
        return self._text

    def _raise_error(self) -> None:
        if self.request.error is not None:
            raise self.request.error

    # engine thread
    def _publish(self) -> bool:
        """Queue the request's new text (and DONE once it finished); True when it has finished."""
        req = self.request
        piece = req.take_new_text()
        if piece:
            self._events.put(Event(TEXT, piece, len(req.output_ids)))
        if req.finished:
            self._text = req.visible_text()
            self._events.put(Event(DONE, "", len(req.output_ids)))
            self._done.set()
        if piece or req.finished:
            self._notify()
        return req.finished

    def _notify(self) -> None:
        if self._on_update is not None:
            try:
                self._on_update(self)
            except Exception:  # noqa: BLE001 - a caller's callback must not stop the engine
                log.exception("on_update callback of request %d failed", self.request.id)


class EngineLoop:
    """The thread that owns `engine`, fed by a queue of commands (see module docs)."""

    def __init__(self, engine: Engine, name: str = "phi_fast-engine"):
        self.engine = engine
        self._name = name
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._handles: dict[int, RequestHandle] = {}  # engine thread only
        self._lock = threading.Lock()  # orders _send against close
        self._thread: threading.Thread | None = None
        self._closed = False
        self._queued = 0  # requests submitted whose command the engine thread has not applied yet

    # --- any thread ---------------------------------------------------------------------------------------

    def submit(self, request: Request, on_update: Callable[[RequestHandle], Any] | None = None) -> RequestHandle:
        """Queue a request made by `engine.new_request`; returns its handle at once."""
        return self.submit_many([request], on_update)[0]

    def submit_many(self, requests: list[Request],
                    on_update: Callable[[RequestHandle], Any] | None = None) -> list[RequestHandle]:
        """Queue several requests in one command, so that they are admitted together."""
        handles = [RequestHandle(self, r, on_update) for r in requests]
        self._send("submit", handles)
        return handles

    def call(self, fn: Callable[[Engine], Any], timeout: float | None = None) -> Any:
        """Run fn(engine) on the engine thread between steps and return its result (or raise its exception)."""
        future: Future = Future()
        self._send("call", (fn, future))
        return future.result(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Fail every request still queued or running (EngineLoopClosed), stop the thread and wait for it (at most
        timeout s)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._commands.put(("stop", None))
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def load(self) -> tuple[int, int]:
        """(requests not running yet: submitted or waiting, requests running), read at once from any thread without
        waiting for the engine thread (a snapshot, for admission control; exact between steps)."""
        engine = self.engine
        return self._queued + len(engine.waiting), len(engine.running)

    def _send(self, kind: str, payload: Any, strict: bool = True) -> None:
        with self._lock:
            if self._closed:
                if strict:
                    raise EngineLoopClosed("the engine loop is closed: load the model again")
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            if kind == "submit":
                self._queued += len(payload)
            self._commands.put((kind, payload))

    # --- engine thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        if hasattr(signal, "pthread_sigmask"):  # Ctrl-C is the main thread's (and so its workers'): a SIGINT taken
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # here would not wake a main thread in input()
        try:
            device = self.engine.model.device
            if device.type == "cuda":  # the current device is per thread: graphs and streams need the model's
                torch.cuda.set_device(device)
            with torch.inference_mode():
                while self._iteration():
                    pass
        finally:  # whatever ended the thread, nobody is left waiting
            self._shut_down(EngineLoopClosed("the engine loop stopped"))

    def _iteration(self) -> bool:
        """Apply the queued commands, take one engine step if there is work, publish results; False to stop."""
        try:
            commands = [self._commands.get()] if not self.engine.has_work else []
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for kind, payload in commands:
                if kind == "stop":
                    return False
                self._apply(kind, payload)
            if self.engine.has_work:
                self.engine.step()
        except Exception as error:  # noqa: BLE001 - Engine.step does not raise; this is the last line of defence
            log.exception("engine loop: unexpected error; failing every request the engine holds")
            for req in self.engine.waiting + self.engine.running:
                self.engine.fail(req, error)
        self._publish()
        return True

    def _apply(self, kind: str, payload: Any) -> None:
        if kind == "submit":
            with self._lock:
                self._queued -= len(payload)
            for handle in payload:
                self._handles[handle.request.id] = handle
                try:
                    self.engine.enqueue(handle.request)
                except Exception as error:  # noqa: BLE001
                    self.engine.fail(handle.request, error)
        elif kind == "abort":
            self.engine.abort(payload.request)
        elif kind == "call":
            fn, future = payload
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except Exception as error:  # noqa: BLE001 - handed to the caller
                    future.set_exception(error)
        else:
            raise ValueError(f"unknown engine loop command {kind!r}")

    def _publish(self) -> None:
        for rid, handle in list(self._handles.items()):
            try:
                finished = handle._publish()
            except Exception as error:  # noqa: BLE001 - e.g. detokenizing its text: that request's failure
                self.engine.fail(handle.request, error)
                finished = handle._publish()
            if finished:
                del self._handles[rid]

    def _shut_down(self, error: Exception) -> None:
        with self._lock:
            self._closed = True
        for req in self.engine.waiting + self.engine.running:
            self.engine.fail(req, error)
        while True:  # commands that arrived before close: fail what waits on them
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                for handle in payload:
                    self._handles[handle.request.id] = handle
                    self.engine.fail(handle.request, error)
            elif kind == "call":
                payload[1].set_exception(error)
        try:
            self._publish()
        except Exception:  # noqa: BLE001
            log.exception("engine loop: publishing the last results failed")
