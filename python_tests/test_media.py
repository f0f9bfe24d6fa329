"""phi_fast.serving.media: images named by data:, http(s) and local URLs are read only under the MediaPolicy, and
every refusal is a MediaError naming the check (status 400, or 413 for a size limit)."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from phi_fast.serving.media import MediaError, MediaPolicy, fetch_image

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
SIZE = (23, 17)  # W, H


def _encode(fmt: str, size: tuple[int, int] = SIZE) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def fetch(url: str, policy: MediaPolicy = MediaPolicy()) -> Image.Image:
    return asyncio.run(fetch_image(url, policy))


def refused(url: str, policy: MediaPolicy = MediaPolicy(), status: int = 400) -> str:
    """The MediaError message of a fetch that must fail with `status`."""
    with pytest.raises(MediaError) as info:
        fetch(url, policy)
    assert info.value.status == status, str(info.value)
    return str(info.value)


# --- data: URLs -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_data_url_each_format(fmt):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("this Pillow has no WebP support")
    image = fetch(_data_url(_encode(fmt), MIME[fmt]))
    assert image.format == fmt and image.size == SIZE
    if fmt == "PNG":  # lossless: the very pixels
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(_encode(fmt)))))


def test_data_url_media_type_case_and_jpg_alias():
    assert fetch(_data_url(_encode("JPEG"), "IMAGE/JPG")).size == SIZE


@pytest.mark.parametrize("url, words", [
    ("data:image/png;base64,iVBORw0KGgo$$$", "not valid base64"),
    ("data:image/png;base64,iVBORw0KGgoAA", "not valid base64"),  # bad padding
    ("data:text/plain;base64,aGVsbG8=", "media type 'text/plain'"),
    ("data:image/bmp;base64,Qk0=", "media type 'image/bmp'"),
    ("data:;base64,aGVsbG8=", "media type"),
    ("data:image/png,rawbytes", "base64-encoded"),
    ("data:image/png;base64", "malformed data URL"),
    ("data:image/png;base64,", "no data"),
])
def test_data_url_refused(url, words):
    assert words in refused(url)


def test_data_url_content_must_be_an_allowed_format():
    assert "not a PNG, JPEG, WebP or GIF" in refused(_data_url(b"just some text", "image/png"))
    assert "not a PNG, JPEG, WebP or GIF" in refused(_data_url(_encode("BMP"), "image/png"))


def test_data_url_corrupt_image():
    message = refused(_data_url(_encode("PNG")[:60]))
    assert "cannot decode the PNG image" in message and "BytesIO" not in message


def test_data_url_over_size_encoded_and_decoded():
    data = _encode("PNG")
    assert "limit of 100 bytes" in refused(_data_url(data), MediaPolicy(max_bytes=100), status=413)
    # 12 bytes as 16 base64 characters passes the encoded-length bound of a 10-byte limit, not the decoded one
    assert "(12 bytes)" in refused(_data_url(data[:12]), MediaPolicy(max_bytes=10), status=413)
    assert fetch(_data_url(data), MediaPolicy(max_bytes=len(data))).size == SIZE  # exactly at the limit


def test_decompression_bomb_is_413(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 23 x 17 image is over twice this
    assert "too many pixels" in refused(_data_url(_encode("PNG")), status=413)


@pytest.mark.parametrize("url, words", [("", "empty"), ("ftp://127.0.0.1/a.png", "scheme 'ftp'"),
                                        ("http://[::1/a.png", "malformed image URL"),
                                        ("javascript:alert(1)", "scheme 'javascript'")])
def test_bad_urls(url, words):
    assert words in refused(url)


def test_non_string_url():
    with pytest.raises(MediaError, match="must be a string"):
        asyncio.run(fetch_image(None, MediaPolicy()))


# --- http(s) --------------------------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    """Routes: /img.png, /big (no Content-Length, 1 MiB), /big-declared, /redirect/N (N hops to /img.png),
    /to-localhost, /to-ftp, /to-data, /missing (404), /hang (answers only at teardown)."""

    png = _encode("PNG")

    def do_GET(self):  # noqa: N802 - http.server's name
        server = self.server
        try:
            if self.path == "/img.png":
                self._send(200, self.png, {"Content-Type": "image/png", "Content-Length": str(len(self.png))})
            elif self.path == "/big":
                self._send(200, b"", {"Content-Type": "image/png"})
                for _ in range(64):
                    self.wfile.write(self.png[:8] + b"\0" * (16384 - 8))
            elif self.path == "/big-declared":
                self._send(200, b"", {"Content-Length": str(2**30)})
            elif self.path.startswith("/redirect/"):
                left = int(self.path.rsplit("/", 1)[1])
                self._redirect("/img.png" if left <= 1 else f"/redirect/{left - 1}")
            elif self.path == "/to-localhost":
                self._redirect(f"http://localhost:{server.server_port}/img.png")
            elif self.path == "/to-ftp":
                self._redirect(f"ftp://127.0.0.1:{server.server_port}/img.png")
            elif self.path == "/to-data":
                self._redirect(_data_url(self.png))
            elif self.path == "/hang":
                server.release.wait(60)  # bounded: the fixture sets it at teardown
            else:
                self._send(404, b"not found", {})
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading: what /big tests
            pass

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self._send(302, b"", {"Location": location, "Content-Length": "0"})

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_base():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.release = threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.release.set()
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_http_image(http_base):
    image = fetch(f"{http_base}/img.png")
    assert image.format == "PNG" and image.size == SIZE


def test_http_over_size_body(http_base):
    policy = MediaPolicy(max_bytes=50_000)
    assert "limit of 50000 bytes" in refused(f"{http_base}/big", policy, status=413)
    assert "limit of 50000 bytes" in refused(f"{http_base}/big-declared", policy, status=413)


def test_http_redirects_up_to_the_limit(http_base):
    policy = MediaPolicy(max_redirects=3)
    assert fetch(f"{http_base}/redirect/3", policy).size == SIZE
    assert "more than 3 redirects" in refused(f"{http_base}/redirect/4", policy)
    assert "more than 0 redirects" in refused(f"{http_base}/redirect/1", MediaPolicy(max_redirects=0))


def test_http_redirect_scheme_checked(http_base):
    assert "scheme 'ftp'" in refused(f"{http_base}/to-ftp")
    assert "not a valid http(s) URL" in refused(f"{http_base}/to-data")


def test_http_error_status(http_base):
    assert "HTTP 404" in refused(f"{http_base}/missing")


def test_domain_allowlist(http_base):
    assert fetch(f"{http_base}/img.png", MediaPolicy(allowed_domains=("127.0.0.1",))).size == SIZE
    assert "domain '127.0.0.1'" in refused(f"{http_base}/img.png", MediaPolicy(allowed_domains=("example.com",)))
    message = refused(f"{http_base}/to-localhost", MediaPolicy(allowed_domains=("127.0.0.1",)))
    assert "redirects" in message and "domain 'localhost'" in message  # checked on every hop
    assert fetch(f"{http_base}/to-localhost", MediaPolicy(allowed_domains=("127.0.0.1", "LOCALHOST"))).size == SIZE


def test_no_remote_media(http_base):
    assert "remote image URLs are disabled" in refused(f"{http_base}/img.png", MediaPolicy(allow_remote=False))


def test_timeout_is_bounded(http_base):
    assert "timed out (limit 0.3 s)" in refused(f"{http_base}/hang", MediaPolicy(timeout_s=0.3))


def test_connection_refused():
    with socket.socket() as s:  # a loopback port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    message = refused(f"http://127.0.0.1:{port}/img.png")
    assert "cannot fetch the image from '127.0.0.1'" in message and "Traceback" not in message


# --- local paths ----------------------------------------------------------------------------------------------

@pytest.fixture()
def media_dir(tmp_path) -> Path:
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "img.png").write_bytes(_encode("PNG"))
    (tmp_path / "secret.png").write_bytes(_encode("PNG"))
    os.symlink(tmp_path / "secret.png", allowed / "escape.png")
    os.symlink(allowed / "sub" / "img.png", allowed / "inside.png")
    return allowed


def test_local_paths_allowed(media_dir):
    policy = MediaPolicy(allowed_local_path=media_dir)
    for url in (str(media_dir / "sub" / "img.png"), f"file://{media_dir}/sub/img.png", "sub/img.png",
                f"file://localhost{media_dir}/sub/%69mg.png", str(media_dir / "inside.png"),
                str(media_dir / "sub" / ".." / "sub" / "img.png")):
        assert fetch(url, policy).size == SIZE, url


def test_local_paths_refused(media_dir):
    policy = MediaPolicy(allowed_local_path=media_dir)
    outside = media_dir.parent / "secret.png"
    for url in (str(outside), f"file://{outside}", "../secret.png", str(media_dir / ".." / "secret.png"),
                str(media_dir / "escape.png"), "/etc/passwd"):
        message = refused(url, policy)
        assert "outside the folder" in message, url
        assert str(media_dir.parent) not in message.replace(url.removeprefix("file://"), ""), "reveals a resolved path"
    assert "no such file" in refused("sub/missing.png", policy)
    assert "cannot resolve" in refused("sub/a\0.png", policy)
    assert "is a folder" in refused("sub", policy)
    assert "only local files" in refused(f"file://otherhost{media_dir}/sub/img.png", policy)
    assert "limit of 10 bytes" in refused("sub/img.png", MediaPolicy(allowed_local_path=media_dir, max_bytes=10),
                                          status=413)


def test_local_paths_off_by_default(media_dir):
    assert "local image paths are not allowed" in refused(str(media_dir / "sub" / "img.png"))
    assert "local image paths are not allowed" in refused(f"file://{media_dir}/sub/img.png")


def test_without_httpx_remote_urls_are_refused_not_a_crash(monkeypatch):
    monkeypatch.setitem(sys.modules, "httpx", None)  # what `import httpx` meets where it is not installed
    assert "cannot fetch http(s) image URLs" in refused("http://127.0.0.1:9/img.png")
