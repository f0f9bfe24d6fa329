"""What the server tests share: a real uvicorn on 127.0.0.1 (ephemeral port) in a thread, serving a tiny model
(the module-scoped fixtures `ckpt`, `model`, `server`: import them into the test module), and images as data: URLs."""

from __future__ import annotations

import base64
import io
import socket
import threading
from typing import Any

import httpx
import pytest
import uvicorn
from PIL import Image

import phi_fast
from phi_fast.serving import create_app

from engine_fixtures import tiny_llava_phi

API_KEY = "test-key"
MODEL_NAME = "tiny"
STARTUP_TIMEOUT_S = 60.0


class LiveServer:
    """uvicorn serving `app` on a socket bound here, so the port is known (and connections queue) at once."""

    def __init__(self, app: Any):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        # bounded wait until it answers (queued connections are served once uvicorn runs)
        response = httpx.get(f"{self.url}/health", timeout=STARTUP_TIMEOUT_S)
        assert response.status_code == 200, response.text
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive(), "uvicorn did not stop"


def serve(model: phi_fast.Model, **options: Any) -> LiveServer:
    """A LiveServer for create_app(model, api_key=API_KEY, served_model_name=MODEL_NAME, **options)."""
    options = {"api_key": API_KEY, "served_model_name": MODEL_NAME, **options}
    return LiveServer(create_app(model, **options))


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    """The image as a base64 data: URL (PNG is lossless: the server decodes the same pixels)."""
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def image_message(image: Image.Image | None, text: str) -> dict[str, Any]:
    """A user message with the image (if any) as an image_url part, then the text."""
    if image is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                        {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_llava_phi(tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module")
def model(ckpt):
    m = phi_fast.load(ckpt, progress=False)
    yield m
    m.close()


@pytest.fixture(scope="module")
def server(model):
    with serve(model, max_body_bytes=2**20) as live:
        yield live
