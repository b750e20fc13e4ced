"""`sqllava-edge serve BUNDLE`: a local HTTP server, OpenAI-compatible, with continuous batching and a web page.

    sqllava-edge serve BUNDLE [--host 127.0.0.1] [--port 8080] [--parallel 4] [--api-key KEY] [--max-image-mb 20]
                              [--queue 64] [--allowed-local-media-path DIR] [--allowed-hosts NAME]
                              [--cors-origin ORIGIN] [--vision-backend ...] [--llm-backend ...] [--n-ctx ...]
                              [--threads ...] (limits: see `--help`)
    python -m sqllava_edge.serve BUNDLE ...

Endpoints: POST /v1/chat/completions (OpenAI's shape, streamed or not), POST /v1/self-questions (the model's own
questions about an image, optionally answered), GET /v1/models, GET /v1/info, GET /health, GET /metrics (Prometheus),
GET / (the web page). The app is `sqllava_edge.serve.app.create_app`; this module is its command line.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

DEFAULT_PORT = 8080
SEQUENCES_PER_SLOT = 2  # a running request's sequence + one kept for its follow-up's prefix


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from runtimes.scheduler import PREFILL_CHUNK
    from sqllava_edge.options import add_backend_arguments
    from sqllava_edge.serve.protocol import Limits

    parser.add_argument("model", help="bundle folder (python -m export) or training checkpoint folder")
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default 127.0.0.1; 0.0.0.0 for other devices, with --api-key)")
    net.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    net.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' (default: $SQLLAVA_EDGE_API_KEY, else no key)")
    net.add_argument("--allowed-local-media-path", action="append", default=[], metavar="DIR",
                     help="accept file:// URLs and paths of images inside DIR (symlinks resolved; repeatable; "
                          "default: none, data URIs only)")
    net.add_argument("--allow-local-files", action="store_true", help=argparse.SUPPRESS)  # replaced, says so
    net.add_argument("--allowed-hosts", action="append", default=[], metavar="NAME",
                     help="also answer requests whose Host header is NAME (repeatable; '*' for any). By default only "
                          "loopback names and the --host value are served (a guard against DNS rebinding)")
    net.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                     help="let web pages from ORIGIN (e.g. http://localhost:3000) call the API (CORS, preflight "
                          "answered; repeatable). Default: none, only the server's own page")
    net.add_argument("--max-connections", type=int, default=256,
                     help="open connections and requests in progress; more get 503 from uvicorn (default 256)")
    limits = parser.add_argument_group("request limits (each named in the error that enforces it)")
    defaults = Limits()
    limits.add_argument("--max-image-mb", type=float, default=20.0, help="largest image accepted, in MiB (default 20)")
    limits.add_argument("--max-image-mpix", type=float, default=50.0,
                        help="largest image in decoded megapixels, read from its header (default 50)")
    limits.add_argument("--max-aspect-ratio", type=float, default=20.0,
                        help="largest ratio of an image's long side to its short side (default 20)")
    limits.add_argument("--max-text-chars", type=int, default=defaults.max_text_chars,
                        help=f"characters of message text per request (default {defaults.max_text_chars})")
    limits.add_argument("--max-messages", type=int, default=defaults.max_messages,
                        help=f"messages per request (default {defaults.max_messages})")
    limits.add_argument("--max-stop", type=int, default=defaults.max_stop,
                        help=f"stop strings per request (default {defaults.max_stop})")
    limits.add_argument("--max-stop-chars", type=int, default=defaults.max_stop_chars,
                        help=f"characters per stop string (default {defaults.max_stop_chars})")
    sched = parser.add_argument_group("scheduling")
    sched.add_argument("--parallel", type=int, default=4, help="requests decoded at once in one batch (default 4)")
    sched.add_argument("--queue", type=int, default=64, help="requests waiting beyond those; more get 503 (default 64)")
    sched.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK,
                       help="prompt positions prefilled between two decode steps of the requests already running, so "
                            f"a new image prompt does not stall their streams (default {PREFILL_CHUNK}; 0: the "
                            "whole prompt at once)")
    sched.add_argument("--timeout", type=float, default=600.0, help="seconds per request before it is stopped (600)")
    sched.add_argument("--workers", type=int, default=2,
                       help="threads that parse requests, decode images and tokenize, off the event loop (default 2)")
    sched.add_argument("--model-name", default=None, help="model id reported by /v1/models (default: the folder name)")
    net.add_argument("--live-source", action="append", default=[], metavar="SPEC",
                     help="a video source POST /v1/live may watch (serve/live.py): a camera (/dev/video0, camera:0) "
                          "or a URL prefix (rtsp://cams.local/); repeatable. Without it clients push their own frames")
    add_backend_arguments(parser.add_argument_group("backends (as for sqllava-edge ask)"),
                          n_ctx_help="KV positions shared by all requests (default: 2048, or 1024 per slot above 2)")


def register_serve(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="run the OpenAI-compatible HTTP server and web page",
                                   description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    """Load in the background, serve until SIGINT / SIGTERM, finish in-flight requests, exit 0."""
    import uvicorn

    from sqllava_edge.assistant import Assistant
    from sqllava_edge.options import load_options
    from sqllava_edge.serve.app import create_app

    settings = settings_from(args)
    sequences = max(4, args.parallel * SEQUENCES_PER_SLOT + 8)  # + room for n > 1 choices (protocol.MAX_N)
    server: uvicorn.Server | None = None

    def load():
        options = {**load_options(args), "n_ctx": args.n_ctx or _default_n_ctx(args)}
        return Assistant.load(args.model, sequences=sequences, **options)

    def loaded(assistant) -> None:
        print(f"model loaded: {assistant!r}\n{assistant.backends}", file=sys.stderr, flush=True)
        print(f"ready: http://{_display_host(args.host)}:{args.port}/", file=sys.stderr, flush=True)

    failure: list[BaseException] = []

    def failed(exc: BaseException) -> None:
        failure.append(exc)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        if server is not None:
            server.should_exit = True

    app = create_app(load, settings, on_loaded=loaded, on_failed=failed)
    server = _server_class()(uvicorn_config(app, args))
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print("warning: listening beyond this machine without --api-key: anyone on the network can use the model",
              file=sys.stderr)
    print(f"sqllava-edge serve: http://{_display_host(args.host)}:{args.port}/ (loading {args.model} ...)",
          file=sys.stderr, flush=True)
    server.run()
    return 1 if failure else 0


def settings_from(args):
    """The app's Settings from the command line; ValueError / FileNotFoundError saying what to fix."""
    from sqllava_edge.serve.app import Settings
    from sqllava_edge.serve.protocol import Limits

    if args.allow_local_files:
        raise ValueError("--allow-local-files is replaced by --allowed-local-media-path DIR: name the folder(s) "
                         "images may be read from")
    numbers = {"--parallel": args.parallel, "--prefill-chunk": args.prefill_chunk + 1, "--queue": args.queue + 1,
               "--max-image-mb": args.max_image_mb, "--timeout": args.timeout, "--max-image-mpix": args.max_image_mpix,
               "--max-aspect-ratio": args.max_aspect_ratio, "--max-text-chars": args.max_text_chars,
               "--max-messages": args.max_messages, "--max-stop": args.max_stop + 1,
               "--max-stop-chars": args.max_stop_chars, "--workers": args.workers,
               "--max-connections": args.max_connections}
    bad = [name for name, value in numbers.items() if not value > 0]
    if bad or args.max_aspect_ratio < 1:
        raise ValueError(f"{', '.join(bad) or '--max-aspect-ratio'}: out of range (--queue, --prefill-chunk and "
                         "--max-stop may be 0, --max-aspect-ratio is >= 1, the others must be > 0)")
    if not os.path.exists(args.model):
        raise FileNotFoundError(f"{args.model} does not exist; pass a bundle folder (python -m export) or a checkpoint")
    for folder in args.allowed_local_media_path:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--allowed-local-media-path {folder}: no such folder")
    limits = Limits(max_text_chars=args.max_text_chars, max_messages=args.max_messages, max_stop=args.max_stop,
                    max_stop_chars=args.max_stop_chars)
    return Settings(api_key=args.api_key or os.environ.get("SQLLAVA_EDGE_API_KEY") or None,
                    max_image_bytes=int(args.max_image_mb * 2**20), max_image_pixels=int(args.max_image_mpix * 1e6),
                    max_aspect_ratio=args.max_aspect_ratio,
                    media_paths=tuple(os.path.realpath(d) for d in args.allowed_local_media_path), limits=limits,
                    parallel=args.parallel, queue=args.queue, prefill_chunk=args.prefill_chunk, timeout=args.timeout,
                    model_id=args.model_name or os.path.basename(os.path.abspath(args.model)), workers=args.workers,
                    host=args.host, allowed_hosts=tuple(args.allowed_hosts), cors_origins=tuple(args.cors_origin),
                    live_sources=tuple(args.live_source))


H11_MAX_EVENT = 16 * 1024  # bytes of request line + headers (uvicorn's h11 default, set explicitly)


def uvicorn_config(app, args):
    """uvicorn's own limits: connections + requests in progress (503 above), header size, idle keep-alive."""
    import uvicorn

    return uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30,
                          access_log=False, limit_concurrency=args.max_connections,
                          h11_max_incomplete_event_size=H11_MAX_EVENT, timeout_keep_alive=5)


def _server_class():
    import contextlib
    import signal
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that a SIGINT / SIGTERM that stopped it gracefully is not re-raised afterwards
        (uvicorn does, so the process would die by the signal): a clean stop exits 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            signals = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def _default_n_ctx(args) -> int | None:
    """2048 KV positions per two parallel requests (an image + question + answer of a 7B model's usual size each);
    the loader's default (2048) up to two."""
    return None if args.parallel <= 2 else 1024 * args.parallel


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host


def main(argv: Sequence[str] | None = None) -> int:
    from sqllava_edge.errors import SQLLaVAError

    parser = argparse.ArgumentParser(prog="python -m sqllava_edge.serve", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (SQLLaVAError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
