"""`phi_fast serve`: the OpenAI-compatible server (phi_fast.serving.create_app) under uvicorn.

Loads the model once, binds the socket (a port in use fails before the model loads), prints the URL and serves.
SIGTERM or SIGINT: uvicorn stops accepting connections and lets the requests in flight finish for up to
--shutdown-timeout seconds (then cancels them, which aborts their engine requests); the engine loop is then
closed and the command exits with status 0. Nothing here routes requests: that is all in the app.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

DEFAULT_PORT = 8000


def add_serve_parser(sub: Any, **kwargs: Any) -> None:
    """The `serve` subcommand (kwargs: parents, formatter_class, as every subcommand gets them)."""
    from .cli import _finite_float, _int_at_least, add_load_options

    p = sub.add_parser("serve", help="serve a checkpoint over HTTP (OpenAI's chat/completions API)",
                       description="Serve the checkpoint in --model over HTTP in OpenAI's wire format "
                                   "(/v1/chat/completions with image_url parts, /v1/completions, /v1/models, "
                                   "/health, /metrics). Needs the serve extra: pip install 'phi_fast[serve]'.",
                       **kwargs)
    add_load_options(p)
    engine = p.add_argument_group("engine")
    engine.add_argument("--max-num-seqs", type=_int_at_least(1), default=64, metavar="N",
                        help="most requests decoded together")
    engine.add_argument("--cache-memory", type=_cache_memory, default=None, metavar="BYTES|FRACTION",
                        help="KV cache size: bytes (suffix K/M/G allowed) or a fraction of free GPU memory "
                             "(default: 0.9 on cuda, two full contexts on cpu)")
    server = p.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on")
    server.add_argument("--port", type=_int_at_least(0), default=DEFAULT_PORT, help="port (0: any free one)")
    server.add_argument("--api-key", default=None, metavar="KEY",
                        help="clients must send 'Authorization: Bearer KEY' (default: $PHI_FAST_API_KEY; none: open)")
    server.add_argument("--served-model-name", default=None, metavar="NAME",
                        help="the model id clients use (default: the checkpoint folder's name)")
    server.add_argument("--max-waiting", type=_int_at_least(0), default=256, metavar="N",
                        help="requests that may wait for a batch slot; more get 503 with Retry-After")
    server.add_argument("--shutdown-timeout", type=_finite_float(0.0), default=30.0, metavar="SECONDS",
                        help="on SIGTERM/SIGINT, how long running requests may take to finish")
    media = p.add_argument_group("images in requests")
    media.add_argument("--no-remote-media", action="store_true", help="refuse http(s) image URLs")
    media.add_argument("--allowed-media-domains", type=_domains, default=None, metavar="A,B",
                       help="fetch http(s) images only from these hosts")
    media.add_argument("--allowed-local-media-path", type=Path, default=None, metavar="DIR",
                       help="allow image paths (file: URLs or plain paths) under DIR")
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """Load, bind, serve until SIGTERM/SIGINT, close the engine loop."""
    try:
        import uvicorn

        from .serving import create_app
        from .serving.media import MediaPolicy
    except ImportError as error:
        raise ImportError(f"phi_fast serve needs the serve extra: pip install 'phi_fast[serve]' ({error})") from None
    from .cli import load_model

    api_key = args.api_key if args.api_key is not None else os.environ.get("PHI_FAST_API_KEY") or None
    if args.allowed_local_media_path is not None and not args.allowed_local_media_path.is_dir():
        raise ValueError(f"--allowed-local-media-path {args.allowed_local_media_path}: no such folder")
    policy = MediaPolicy(allow_remote=not args.no_remote_media, allowed_domains=args.allowed_media_domains,
                         allowed_local_path=args.allowed_local_media_path)
    sock = socket.create_server((args.host, args.port), family=socket.AF_INET6 if ":" in args.host
                                else socket.AF_INET)
    try:
        model = load_model(args, max_num_seqs=args.max_num_seqs, cache_memory=args.cache_memory)
        try:
            app = create_app(model, api_key=api_key, served_model_name=args.served_model_name,
                             max_waiting=args.max_waiting, media_policy=policy)
            verbose = getattr(args, "verbose", False)
            config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose,
                                    lifespan="off", timeout_graceful_shutdown=args.shutdown_timeout)
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            name = args.served_model_name or model.path.name
            print(f"phi_fast serve: {name} at http://{shown}:{port}/v1 (SIGTERM or Ctrl-C stops it)",
                  file=sys.stderr, flush=True)
            _serve(uvicorn.Server(config), sock)
        finally:
            model.close(args.shutdown_timeout + 30.0)
    finally:
        sock.close()
    return 0


def _serve(server: Any, sock: socket.socket) -> None:
    """server.run, with SIGTERM/SIGINT ending it gracefully: uvicorn re-raises the signal it caught once it has
    shut down; handlers of our own receive it instead of the default ones (which would kill the process before
    the engine loop is closed)."""
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _cache_memory(text: str) -> int | float:
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    try:
        if text[-1:].lower() in units:
            value = int(float(text[:-1]) * units[text[-1].lower()])
        elif "." in text:
            value = float(text)
            if not 0.0 < value <= 1.0:
                raise argparse.ArgumentTypeError(f"a fraction must be in (0, 1], got {text!r}")
            return value
        else:
            value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2G, 512M, 0.5)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def _domains(text: str) -> tuple[str, ...]:
    domains = tuple(d.strip().lower() for d in text.split(",") if d.strip())
    if not domains:
        raise argparse.ArgumentTypeError(f"no domain in {text!r}")
    return domains
