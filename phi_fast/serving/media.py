"""Images named by URL in a request (`image_url.url`), fetched under a MediaPolicy and decoded with phi_fast.image.

Three kinds of source, each bounded by `policy.max_bytes` before anything is decoded:
- `data:image/<png|jpeg|webp|gif>;base64,<data>`: the encoded length is checked before decoding, the decoded
  bytes after; the base64 must be valid.
- `http(s)://`: fetched with httpx under one overall deadline (`timeout_s`, connect to last byte), the body read
  as a stream and abandoned past the byte limit; redirects are followed by hand, at most `max_redirects`, with
  the scheme and domain checks applied to every hop. Proxies from the environment are not used.
- a local path (`file:///abs/path` or a plain path; a relative one is taken under the allowed folder): only when
  it resolves, symlinks resolved, inside `allowed_local_path`.

The bytes must start like a PNG, JPEG, WebP or GIF file (no other Pillow decoder is ever reached), then decode
through `phi_fast.image.load_image`, whose decompression-bomb limit bounds the pixels.

Every failure is a MediaError whose message is safe to show the client: it names the check and the limit that
failed, never a traceback, a resolved path or an address the client did not send. Details go to the log.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import math
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from PIL import Image

from ..image import load_image

log = logging.getLogger(__name__)

DATA_URL_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif")  # image/jpg: a common alias
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_DATA_URL = re.compile(r"data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*),", re.IGNORECASE)


@dataclass(frozen=True)
class MediaPolicy:
    """What a server lets `fetch_image` read."""

    allow_remote: bool = True  # --no-remote-media sets False
    allowed_domains: tuple[str, ...] | None = None  # exact host names (case-insensitive); None: any host
    allowed_local_path: Path | None = None  # local paths only under this folder; None: refused
    timeout_s: float = 10.0  # one remote fetch, redirects included
    max_bytes: int = 20 * 2**20  # encoded image bytes, from any source
    max_redirects: int = 3


class MediaError(ValueError):
    """An image that cannot be used; the message is safe to show the client, `status` is 400 or 413."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


async def fetch_image(url: str, policy: MediaPolicy) -> Image.Image:
    """The image `url` names (data:, http(s): or a local path), read under `policy` and decoded (pixels loaded).

    Raises MediaError: status 413 for an image over policy.max_bytes (or the pixel limit), 400 for the rest.
    """
    if not isinstance(url, str):
        raise MediaError(f"image URL must be a string, got {type(url).__name__}")
    url = url.strip()
    if not url:
        raise MediaError("image URL is empty")
    if url[:5].lower() == "data:":
        data = _decode_data_url(url, policy.max_bytes)
    else:
        try:
            scheme = urlsplit(url).scheme.lower()
        except ValueError:  # e.g. an unbalanced IPv6 bracket
            raise MediaError(f"malformed image URL {url!r:.100}") from None
        if scheme in ("http", "https"):
            data = await _fetch_remote(url, policy)
        elif scheme in ("file", ""):
            data = await asyncio.to_thread(_read_local, url, policy)
        else:
            raise MediaError(f"unsupported image URL scheme {scheme!r:.40} (use data:, http:, https: or a local path)")
    return await asyncio.to_thread(_decode, data)


# --- data: URLs -----------------------------------------------------------------------------------------------

def _decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a base64 data URL with an image media type."""
    header = _DATA_URL.match(url)
    if header is None:
        raise MediaError("malformed data URL: expected data:<media type>;base64,<data>")
    media_type = header["type"].strip().lower()
    if media_type not in DATA_URL_TYPES:
        raise MediaError(f"data URL media type {media_type or '(none)'!r:.60} is not supported (use image/png, "
                         f"image/jpeg, image/webp or image/gif)")
    if "base64" not in (p.strip().lower() for p in header["params"].split(";")):
        raise MediaError("data URL must be base64-encoded (data:<media type>;base64,<data>)")
    payload = url[header.end():]
    if len(payload) > 4 * math.ceil(max_bytes / 3):  # over the limit before decoding: do not decode
        raise MediaError(f"image is larger than the limit of {max_bytes} bytes "
                         f"({len(payload)} base64 characters)", 413)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("data URL is not valid base64") from None
    if len(data) > max_bytes:
        raise MediaError(f"image is larger than the limit of {max_bytes} bytes ({len(data)} bytes)", 413)
    if not data:
        raise MediaError("data URL holds no data")
    return data


# --- http(s) --------------------------------------------------------------------------------------------------

async def _fetch_remote(url: str, policy: MediaPolicy) -> bytes:
    """The body at `url`, redirects followed by hand, all under one deadline."""
    if not policy.allow_remote:
        raise MediaError("remote image URLs are disabled on this server; send the image as a data: URL")
    try:
        import httpx  # the `serve` extra; only remote fetches need it
    except ImportError:
        log.error("an http(s) image URL needs httpx: pip install 'phi_fast[serve]'")
        raise MediaError("this server cannot fetch http(s) image URLs; send the image as a data: URL") from None

    try:
        async with httpx.AsyncClient(follow_redirects=False, timeout=policy.timeout_s, trust_env=False,
                                     verify=_tls_context()) as client:
            return await asyncio.wait_for(_follow(client, url, policy), policy.timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise MediaError(f"fetching the image timed out (limit {policy.timeout_s:g} s)") from None
    except httpx.InvalidURL:  # httpx parses a redirect's Location even when it does not follow it
        raise MediaError("the image URL, or a URL it redirects to, is not a valid http(s) URL") from None
    except httpx.HTTPError as error:
        log.info("fetching image %s failed", url, exc_info=True)
        raise MediaError(f"cannot fetch the image from {_host(url)!r}: {type(error).__name__}") from None


async def _follow(client, url: str, policy: MediaPolicy) -> bytes:
    for hop in range(policy.max_redirects + 1):
        _check_remote_url(url, policy, first=hop == 0)
        async with client.stream("GET", url) as response:
            if response.status_code in REDIRECT_STATUSES and "location" in response.headers:
                url = urljoin(url, response.headers["location"])
                continue
            if response.status_code != 200:
                raise MediaError(f"fetching the image from {_host(url)!r} failed: HTTP {response.status_code}")
            return await _read_body(response, policy.max_bytes)
    raise MediaError(f"fetching the image took more than {policy.max_redirects} redirects")


@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    """The system's default certificate checks, built once (building one takes a good part of a second)."""
    return ssl.create_default_context()


def _check_remote_url(url: str, policy: MediaPolicy, first: bool) -> None:
    """The scheme and domain checks, on the first URL and on every redirect target."""
    what = "image URL" if first else "image URL redirects to a URL that"
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise MediaError(f"{what} has scheme {parts.scheme!r:.40}; only http and https are fetched")
    host = _host(url)
    if not host:
        raise MediaError(f"{what} has no host")
    if policy.allowed_domains is not None and host not in {d.lower().rstrip(".") for d in policy.allowed_domains}:
        raise MediaError(f"{what} is on domain {host!r:.100}, which this server does not fetch from")


async def _read_body(response, max_bytes: int) -> bytes:
    """The response body, abandoned as soon as it passes max_bytes (a Content-Length above it: before reading)."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise MediaError(f"image is larger than the limit of {max_bytes} bytes ({declared} bytes)", 413)
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise MediaError(f"image is larger than the limit of {max_bytes} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _host(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").rstrip(".")
    except ValueError:  # e.g. a malformed IPv6 literal
        return ""


# --- local paths ----------------------------------------------------------------------------------------------

def _read_local(url: str, policy: MediaPolicy) -> bytes:
    """The bytes of a local file that resolves inside policy.allowed_local_path."""
    if policy.allowed_local_path is None:
        raise MediaError("local image paths are not allowed on this server; send the image as a data: URL")
    if url[:5].lower() == "file:":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise MediaError(f"file: URL names host {parts.netloc!r:.100}; only local files can be read")
        given = unquote(parts.path)
    else:
        given = url
    root = Path(policy.allowed_local_path).resolve()
    try:
        path = (root / given).resolve()  # an absolute `given` replaces root; symlinks and .. resolved
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        raise MediaError(f"cannot resolve image path {given!r:.200}") from None
    if not path.is_relative_to(root):
        raise MediaError(f"image path {given!r:.200} is outside the folder this server reads images from")
    try:
        with open(path, "rb") as f:
            data = f.read(policy.max_bytes + 1)
    except IsADirectoryError:
        raise MediaError(f"image path {given!r:.200} is a folder") from None
    except FileNotFoundError:
        raise MediaError(f"image path {given!r:.200}: no such file") from None
    except OSError as error:
        log.info("reading image %s failed", path, exc_info=True)
        raise MediaError(f"cannot read image path {given!r:.200}: {error.strerror or type(error).__name__}") from None
    if len(data) > policy.max_bytes:
        raise MediaError(f"image is larger than the limit of {policy.max_bytes} bytes", 413)
    return data


# --- decoding -------------------------------------------------------------------------------------------------

def _sniff(data: bytes) -> str | None:
    """PNG, JPEG, GIF or WEBP from the file's first bytes; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _decode(data: bytes) -> Image.Image:
    kind = _sniff(data)
    if kind is None:
        raise MediaError("image data is not a PNG, JPEG, WebP or GIF file")
    try:
        return load_image(data)
    except ValueError as error:
        log.info("decoding a %s image failed", kind, exc_info=True)
        if isinstance(error.__cause__, Image.DecompressionBombError):
            raise MediaError(f"{kind} image has too many pixels (limit {2 * (Image.MAX_IMAGE_PIXELS or 0)})",
                             413) from None
        raise MediaError(f"cannot decode the {kind} image (corrupt or truncated)") from None
