"""`sqllava-edge serve BUNDLE`: a local HTTP server, OpenAI-compatible, with continuous batching and a web page.

    sqllava-edge serve BUNDLE [--host 127.0.0.1] [--port 8080] [--parallel 4] [--api-key KEY] [--max-image-mb 20]
                              [--queue 64] [--allow-local-files] [--vision-backend ...] [--llm-backend ...]
                              [--n-ctx ...] [--threads ...]
    python -m sqllava_edge.serve BUNDLE ...

Endpoints: POST /v1/chat/completions (OpenAI's shape, streamed or not), POST /v1/self-questions (the model's own
questions about an image, optionally answered), GET /v1/models, GET /v1/info, GET /health, GET /metrics (Prometheus),
GET / (the web page). The app is `sqllava_edge.serve.app.create_app`; this module is its command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Sequence

DEFAULT_PORT = 8080
SEQUENCES_PER_SLOT = 2  # a running request's sequence + one kept for its follow-up's prefix


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from runtimes.scheduler import PREFILL_CHUNK
    from sqllava_edge.options import add_backend_arguments

    parser.add_argument("model", help="bundle folder (python -m export) or training checkpoint folder")
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default 127.0.0.1; 0.0.0.0 for other devices, with --api-key)")
    net.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    net.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' (default: $SQLLAVA_EDGE_API_KEY, else no key)")
    net.add_argument("--max-image-mb", type=float, default=20.0, help="largest image accepted, in MiB (default 20)")
    net.add_argument("--allow-local-files", action="store_true",
                     help="accept file:// URLs and paths on this machine as images (off: data URIs only)")
    sched = parser.add_argument_group("scheduling")
    sched.add_argument("--parallel", type=int, default=4, help="requests decoded at once in one batch (default 4)")
    sched.add_argument("--queue", type=int, default=64, help="requests waiting beyond those; more get 503 (default 64)")
    sched.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK,
                       help="prompt positions prefilled between two decode steps of the requests already running, so "
                            f"a new image prompt does not stall their streams (default {PREFILL_CHUNK}; 0: the "
                            "whole prompt at once)")
    sched.add_argument("--timeout", type=float, default=600.0, help="seconds per request before it is stopped (600)")
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
    from sqllava_edge.serve.app import Settings, create_app

    if args.parallel < 1 or args.queue < 0 or args.prefill_chunk < 0 or args.max_image_mb <= 0 or args.timeout <= 0:
        raise ValueError("--parallel must be >= 1, --queue >= 0, --prefill-chunk >= 0, --max-image-mb and --timeout > 0")
    if not os.path.exists(args.model):
        raise FileNotFoundError(f"{args.model} does not exist; pass a bundle folder (python -m export) or a checkpoint")
    api_key = args.api_key or os.environ.get("SQLLAVA_EDGE_API_KEY") or None
    settings = Settings(api_key=api_key, max_image_bytes=int(args.max_image_mb * 2**20),
                        allow_local_files=args.allow_local_files, parallel=args.parallel, queue=args.queue,
                        prefill_chunk=args.prefill_chunk,
                        timeout=args.timeout, model_id=args.model_name or os.path.basename(os.path.abspath(args.model)))
    settings = dataclasses.replace(settings, live_sources=tuple(args.live_source))
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
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30,
                            access_log=False)
    server = _server_class()(config)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print("warning: listening beyond this machine without --api-key: anyone on the network can use the model",
              file=sys.stderr)
    print(f"sqllava-edge serve: http://{_display_host(args.host)}:{args.port}/ (loading {args.model} ...)",
          file=sys.stderr, flush=True)
    server.run()
    return 1 if failure else 0


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
