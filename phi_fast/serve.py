"""`phi_fast serve`: the OpenAI-compatible server (phi_fast.serving.create_app) under uvicorn.

Loads the model once, binds the socket (a port in use fails before the model loads), prints the URL and serves.
SIGTERM or SIGINT: uvicorn stops accepting connections and lets the requests in flight finish for up to
--shutdown-timeout seconds (then cancels them, which aborts their engine requests); the engine loop is then
closed and the command exits with status 0. Nothing here routes requests: that is all in the app.

--ray serves the same app from Ray Serve replicas instead (phi_fast.serving.ray): it starts a local Ray instance,
or joins the cluster at --ray-address, deploys, prints the URL and waits; SIGTERM or SIGINT then deletes the
deployment (replicas finish their requests for up to --shutdown-timeout seconds) and, when this command started
Ray, shuts Serve and Ray down.
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
    scale = p.add_argument_group("Ray Serve (--ray; needs the ray extra: pip install 'phi_fast[ray]')")
    scale.add_argument("--ray", action="store_true", help="serve from Ray Serve replicas behind one endpoint")
    scale.add_argument("--replicas", type=_int_at_least(1), default=None, metavar="N",
                       help="a fixed number of replicas (default 1, unless --min/--max-replicas autoscale)")
    scale.add_argument("--min-replicas", type=_int_at_least(0), default=None, metavar="A",
                       help="autoscale on ongoing requests per replica, from A ...")
    scale.add_argument("--max-replicas", type=_int_at_least(1), default=None, metavar="B", help="... to B replicas")
    scale.add_argument("--target-ongoing-requests", type=_finite_float(0.0), default=None, metavar="N",
                       help="autoscaling aims at this many ongoing requests per replica (default: half of "
                            "--max-num-seqs + --max-waiting)")
    scale.add_argument("--replica-cpus", type=_finite_float(0.0), default=1.0, metavar="N",
                       help="CPUs Ray reserves for each replica (its torch threads on cpu); a cuda model also "
                            "reserves one GPU per replica")
    scale.add_argument("--affinity-imbalance", type=_int_at_least(0), default=None, metavar="N",
                       help="an image's requests leave its replica once that has N more requests than the least "
                            "loaded one (default: --max-num-seqs; on cpu, where every request costs compute, a "
                            "small N balances better)")
    scale.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="join this Ray cluster (HOST:6379, or 'auto' for the one `ray start` runs here) "
                            "instead of starting a local one")
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

    _check_ray_options(args)
    api_key = args.api_key if args.api_key is not None else os.environ.get("PHI_FAST_API_KEY") or None
    if args.allowed_local_media_path is not None and not args.allowed_local_media_path.is_dir():
        raise ValueError(f"--allowed-local-media-path {args.allowed_local_media_path}: no such folder")
    policy = MediaPolicy(allow_remote=not args.no_remote_media, allowed_domains=args.allowed_media_domains,
                         allowed_local_path=args.allowed_local_media_path)
    if args.ray:
        return _run_ray(args, api_key, policy)
    sock = socket.create_server((args.host, args.port), family=_family(args.host))
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


def _check_ray_options(args: argparse.Namespace) -> None:
    given = [f"--{name.replace('_', '-')}" for name in ("replicas", "min_replicas", "max_replicas",
                                                       "target_ongoing_requests", "affinity_imbalance",
                                                       "ray_address")
             if getattr(args, name) is not None]
    if not args.ray and given:
        raise ValueError(f"{given[0]} needs --ray")
    autoscale = args.min_replicas is not None or args.max_replicas is not None
    if args.replicas is not None and autoscale:
        raise ValueError("--replicas is a fixed count: give it or --min-replicas/--max-replicas, not both")
    if args.target_ongoing_requests is not None and not autoscale:
        raise ValueError("--target-ongoing-requests needs --min-replicas/--max-replicas")
    if args.min_replicas is not None and args.max_replicas is not None and args.min_replicas > args.max_replicas:
        raise ValueError(f"--min-replicas {args.min_replicas} is more than --max-replicas {args.max_replicas}")
    if args.ray and args.replica_cpus <= 0:
        raise ValueError(f"--replica-cpus must be > 0, got {args.replica_cpus:g}")


def _run_ray(args: argparse.Namespace, api_key: str | None, policy: Any) -> int:
    """Start or join Ray, deploy, wait for SIGTERM/SIGINT, then delete the deployment (and stop what we
    started). A cluster we joined keeps running, with its other applications."""
    import logging
    import threading

    try:
        import ray
        from ray import serve

        from .serving import ray as ray_serving
    except ImportError as error:
        raise ImportError(f"phi_fast serve --ray needs the ray extra: pip install 'phi_fast[ray]' ({error})") \
            from None
    from .config import load_config

    if not args.model.is_dir():
        raise ValueError(f"--model {args.model}: no such folder")
    load_config(args.model)  # a folder that is no checkpoint fails here, not in every replica Ray starts
    load_options = {"device": args.device, "dtype": args.dtype, "quantize": args.quantize,
                    "token_budget": args.token_budget, "max_num_seqs": args.max_num_seqs,
                    "cache_memory": args.cache_memory}
    app_options = {"api_key": api_key, "served_model_name": args.served_model_name,
                   "max_waiting": args.max_waiting, "media_policy": policy}
    application = ray_serving.build_app(
        str(args.model.resolve()), load_options=load_options, app_options=app_options,
        replicas=args.replicas, min_replicas=args.min_replicas,
        max_replicas=args.max_replicas, target_ongoing_requests=args.target_ongoing_requests,
        replica_cpus=args.replica_cpus, max_ongoing_requests=args.max_num_seqs + args.max_waiting,
        imbalance=args.max_num_seqs if args.affinity_imbalance is None else args.affinity_imbalance,
        shutdown_timeout_s=args.shutdown_timeout)
    port = args.port or _free_port(args.host)
    verbose = getattr(args, "verbose", False)
    stop = threading.Event()
    joined = args.ray_address is not None
    ray.init(address=args.ray_address, logging_level=logging.INFO if verbose else logging.WARNING,
             log_to_driver=verbose)
    # after ray.init, which installs a SIGTERM handler of its own that exits at once
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        url = ray_serving.deploy(application, host=args.host, port=port)
        name = args.served_model_name or args.model.resolve().name
        print(f"phi_fast serve: {name} at {url} on Ray Serve (SIGTERM or Ctrl-C stops it)", file=sys.stderr,
              flush=True)
        while not stop.wait(1.0):  # a timed wait: signal handlers run between its waits
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            serve.delete(ray_serving.APP_NAME)  # waits for the replicas to finish their requests
            if not joined:
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _free_port(host: str) -> int:
    with socket.create_server((host, 0), family=_family(host)) as s:
        return s.getsockname()[1]


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
