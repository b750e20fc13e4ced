"""What every route of the server shares: its settings and state, the checks a request passes before any work
(API key, readiness, JSON Content-Type and size from the headers, the bounded body, JSON parsing), and `Call`, one
submitted request seen from its handler (events from the scheduler thread, the connection watched, metrics, errors).

`app.py` (the OpenAI-compatible routes, the page) and `live.py` (POST /v1/live) both build on it.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from runtimes.scheduler import (PREFILL_CHUNK, Event, QueueFullError, Request as EngineRequest, Scheduler,
                                ShuttingDownError)
from sqllava_edge.errors import ImageError, ImageTooLargeError, PromptTooLongError
from sqllava_edge.serve.metrics import Metrics
from sqllava_edge.serve.protocol import APIError, ChatRequest, Limits, bad_request

log = logging.getLogger("sqllava_edge.serve")
TEXT_LIMIT = 1 << 20  # bytes of JSON besides the image


@dataclass(frozen=True)
class Settings:
    api_key: str | None = None
    max_image_bytes: int = 20 << 20
    max_image_pixels: int = 50_000_000  # decoded size limit (--max-image-mpix), checked from the header
    max_aspect_ratio: float = 20.0  # long side / short side (--max-aspect-ratio)
    media_paths: tuple[str, ...] = ()  # directories local images may come from (--allowed-local-media-path)
    limits: Limits = field(default_factory=Limits)  # text, messages, stop strings (protocol.Limits)
    parallel: int = 4
    queue: int = 64
    prefill_chunk: int = PREFILL_CHUNK  # positions prefilled between decode steps of running requests (0: all)
    timeout: float = 600.0  # seconds per request
    model_id: str = "sqllava-edge"
    live_sources: tuple[str, ...] = ()  # cameras / URL prefixes POST /v1/live may watch (serve/live.py)
    workers: int = 2  # threads parsing, decoding images and tokenizing requests (--workers)
    host: str = "127.0.0.1"  # the address listened on: allowed in Host headers (security.HostCheck)
    allowed_hosts: tuple[str, ...] = ()  # more names allowed in Host headers (--allowed-hosts)
    cors_origins: tuple[str, ...] = ()  # web origins allowed to call the API (--cors-origin); none: same origin only

    @property
    def body_limit(self) -> int:
        return self.max_image_bytes * 4 // 3 + TEXT_LIMIT  # base64 grows 4/3


class State:
    """What the app holds: filled in by the loader thread; `ready` once the model is loaded."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.assistant = None
        self.scheduler: Scheduler | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.loaded_at = 0
        self.metrics = Metrics(self.live)
        self.workers = concurrent.futures.ThreadPoolExecutor(settings.workers, thread_name_prefix="sqllava-edge-prep")
        self.preparing = 0  # POSTs between the room check and their submit (on the event loop: no lock)

    def has_room(self) -> bool:
        """Could one more request be queued, counting those still being prepared? (the scheduler's own rule)"""
        scheduler = self.scheduler
        waiting = scheduler.queue_depth + self.preparing
        return waiting < scheduler.queue_limit + max(0, scheduler.parallel - scheduler.running)

    async def work(self, fn, *args):
        """fn(*args) on the bounded worker pool (CPU work that must not hold the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self.workers, fn, *args)

    def live(self) -> dict[str, float]:
        if not self.ready.is_set():
            return {"loaded": 0}
        scheduler, engine = self.scheduler, self.assistant.engine
        counters = engine.counters
        return {"loaded": 1, "queue_depth": scheduler.queue_depth, "running_requests": scheduler.running,
                "busy_slots": scheduler.busy_slots, "vision_encodes": counters.vision_encodes,
                "image_cache_hits": engine.image_hits,
                "prefix_cache_hit_tokens": scheduler.stats["cached_positions"],
                "prefill_positions": counters.prefill_tokens + counters.prefill_embeds,
                "decode_steps": counters.decode_steps, "decode_tokens": counters.decode_tokens,
                "decode_seconds": scheduler.stats["decode_seconds"], "prefill_seconds": scheduler.stats["prefill_seconds"],
                "cancelled_requests": scheduler.stats["cancelled"], "timed_out_requests": scheduler.stats["timeout"]}


def internal_error(exc: BaseException, where: str) -> APIError:
    """A failure of ours: logged with its traceback under a request id; the client gets only the id."""
    request_id = f"req-{uuid.uuid4().hex[:16]}"
    log.error("internal error %s on %s: %r", request_id, where, exc, exc_info=exc)
    return APIError(500, f"internal error (request id {request_id}); the server keeps running, and its log has the "
                         "details under that id", type="server_error", code="internal_error")


def endpoint_of(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", "other")


def authorize(state: State, request: Request) -> None:
    key = state.settings.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                       type="authentication_error", code="invalid_api_key")


def ready(state: State):
    if state.error is not None:
        raise APIError(503, "the model failed to load; the server's log says why", type="server_error",
                       code="load_failed")
    if not state.ready.is_set():
        raise APIError(503, "the model is still loading; retry in a few seconds", type="server_error",
                       code="loading", headers={"Retry-After": "2"})
    return state.assistant, state.scheduler


def check_headers(request: Request, limit: int) -> None:
    """Refuse from the headers alone: (415) a body not declared JSON (a browser sends text/plain or form bodies to any
    site without asking it first, no CORS preflight; JSON needs the preflight), (413) a declared size past `limit`."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise APIError(415, f"send the body as JSON with the header 'Content-Type: application/json' (got "
                            f"{media or 'none'!r})", code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {int(declared) / 2**20:.1f} MiB, over this server's limit of "
                            f"{limit / 2**20:.1f} MiB (--max-image-mb); send a smaller image", code="body_too_large")


async def read_body(request: Request, limit: int) -> bytearray:
    """The body as bytes, refused (413) as soon as it passes `limit`."""
    from starlette.requests import ClientDisconnect

    body = bytearray()
    try:
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:
                raise APIError(413, f"the request body is over this server's limit of {limit / 2**20:.1f} MiB "
                                    "(--max-image-mb); send a smaller image", code="body_too_large")
            body += chunk
    except ClientDisconnect:  # left while sending: nobody to answer, nothing to log but the metric
        raise APIError(499, "client closed the request while sending its body", code="client_closed") from None
    return body


async def json_body(request: Request, limit: int) -> Any:
    """A small JSON body (headers checked first, size bounded, parsed here): for routes whose bodies need no pool."""
    check_headers(request, limit)
    return parse_json(await read_body(request, limit))


def parse_json(body: bytes | bytearray) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise bad_request("the body nests arrays or objects too deeply to parse; send a flat JSON object") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON ({exc}); send a JSON object") from None


class ClientGone(Exception):
    """The client closed the connection."""


class EventStream(StreamingResponse):
    """A server-sent-event response that ends quietly when the client goes away (the call is cancelled by then)."""

    async def __call__(self, scope, receive, send):
        from starlette.requests import ClientDisconnect

        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass


class Call:
    def __init__(self, state: State, request: Request, arrived: float, endpoint: str):
        self.state, self.request, self.arrived, self.endpoint = state, request, arrived, endpoint
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()  # None: the client went away
        self.handle = None
        self.first_token = False
        self._watcher: asyncio.Task | None = None
        self.logprobs: dict[int, list[dict]] = {}  # choice -> OpenAI logprob entries (collect)

    def submit(self, scheduler: Scheduler, engine_request: EngineRequest) -> None:
        loop = asyncio.get_running_loop()
        engine_request.on_event = lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, event)
        try:
            self.handle = scheduler.submit(engine_request)
        except QueueFullError as exc:
            raise APIError(503, str(exc), type="server_error", code="queue_full", headers={"Retry-After": "1"})
        except ShuttingDownError as exc:
            raise APIError(503, str(exc), type="server_error", code="shutting_down")
        except ValueError as exc:
            raise bad_request(str(exc))
        self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        """Wait for the connection's http.disconnect (the body is read, so nothing else comes): cancel the request."""
        try:
            while (await self.request.receive())["type"] != "http.disconnect":
                pass
        except Exception:  # the server is closing the connection itself: nothing to watch
            return
        self.handle.cancel()
        self.queue.put_nowait(None)

    def close(self) -> None:
        """Stop watching the connection (before the response is sent, which also ends it)."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    async def next(self) -> Event:
        """The next event; ClientGone when the client went away (the request is cancelled by then)."""
        event = await self.queue.get()
        if event is None:
            raise ClientGone()
        if event.kind == "token" and not self.first_token:
            self.first_token = True
            self.state.metrics.ttft.observe(time.monotonic() - self.arrived)
        if event.kind == "done":
            self.state.metrics.prompt_tokens.inc(event.usage.get("prompt_tokens", 0))
            self.state.metrics.completion_tokens.inc(event.usage.get("completion_tokens", 0))
        return event

    async def started(self) -> None:
        """Wait until the scheduler admitted the request; errors at admission become HTTP errors."""
        try:
            event = await self.next()
        except ClientGone:
            raise APIError(499, "client closed the request", code="client_closed") from None
        if event.kind == "error":
            raise engine_error(event.error)
        if event.kind == "finish":  # cancelled or timed out while queued
            raise ended_error(event.reason)

    async def collect(self, n: int) -> tuple[list[str], list[str], dict[str, int]]:
        texts, reasons = [""] * n, ["stop"] * n
        try:
            while True:
                event = await self.next()
                if event.kind == "token":
                    texts[event.choice] += event.text
                    if event.logprobs is not None:
                        self.logprobs.setdefault(event.choice, []).append(self.logprob_entry(event))
                elif event.kind == "finish":
                    if event.reason in ("cancelled", "timeout"):
                        raise ended_error(event.reason)
                    reasons[event.choice] = event.reason
                elif event.kind == "error":
                    raise engine_error(event.error)
                elif event.kind == "done":
                    return texts, reasons, event.usage
        except ClientGone:
            raise APIError(499, "client closed the request", code="client_closed") from None
        except asyncio.CancelledError:
            self.handle.cancel()
            raise

    async def run(self, n: int) -> tuple[list[str], list[str], dict[str, int]]:
        """started() then collect(n), the connection watched throughout."""
        try:
            await self.started()
            return await self.collect(n)
        finally:
            self.close()
    def logprob_entry(self, event: Event) -> dict[str, Any]:
        """OpenAI's entry for one token: token, logprob, bytes, top_logprobs (the model's distribution)."""
        from sqllava_edge.structured import token_bytes

        tokenizer = self.state.assistant.tokenizer
        chosen, top = event.logprobs

        def entry(token: int, logprob: float) -> dict[str, Any]:
            data = token_bytes(tokenizer, token)
            return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

        return {**entry(event.token, chosen), "top_logprobs": [entry(t, lp) for t, lp in top]}

    def respond(self, body: dict) -> JSONResponse:
        self.state.metrics.requests.labels(self.endpoint, "200").inc()
        self.state.metrics.latency.labels(self.endpoint).observe(time.monotonic() - self.arrived)
        return JSONResponse(body)

    async def sse(self, chat: ChatRequest) -> AsyncIterator[bytes]:
        model, status = self.state.settings.model_id, None

        def chunk(choices: list, usage: dict | None = None) -> bytes:
            body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": model,
                    "choices": choices}
            if chat.include_usage:
                body["usage"] = usage
            return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"

        def error(exc: APIError) -> bytes:
            nonlocal status
            status = exc.status
            return b"data: " + json.dumps(exc.body()).encode() + b"\n\n"

        try:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for i in range(chat.n)])
            while True:
                event = await self.next()
                if event.kind == "token" and event.logprobs is not None:
                    yield chunk([{"index": event.choice, "delta": {"content": event.text}, "finish_reason": None,
                                  "logprobs": {"content": [self.logprob_entry(event)], "refusal": None}}])
                elif event.kind == "token" and event.text:
                    yield chunk([{"index": event.choice, "delta": {"content": event.text}, "finish_reason": None}])
                elif event.kind == "finish":
                    if event.reason in ("cancelled", "timeout"):
                        yield error(ended_error(event.reason))
                        break
                    yield chunk([{"index": event.choice, "delta": {}, "finish_reason": event.reason}])
                elif event.kind == "error":
                    yield error(engine_error(event.error))
                    break
                elif event.kind == "done":
                    if chat.include_usage:
                        yield chunk([], usage_body(event.usage))
                    break
            yield b"data: [DONE]\n\n"
            status = status or 200
        except ClientGone:
            status = 499
        finally:
            self.close()
            if status is None or status == 499:
                status = 499
                if self.handle is not None:
                    self.handle.cancel()  # the client went away mid-stream: free its sequences
            self.state.metrics.requests.labels(self.endpoint, str(status)).inc()
            self.state.metrics.latency.labels(self.endpoint).observe(time.monotonic() - self.arrived)


def usage_body(usage: dict[str, int]) -> dict[str, Any]:
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def engine_error(exc: BaseException | None) -> APIError:
    if isinstance(exc, PromptTooLongError):
        return bad_request(str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, ImageTooLargeError):
        return APIError(413, str(exc), code="image_too_large")
    if isinstance(exc, ImageError):
        return bad_request(str(exc), code="invalid_image")
    if isinstance(exc, ShuttingDownError):
        return APIError(503, str(exc), type="server_error", code="shutting_down")
    return internal_error(exc, "the engine")


def ended_error(reason: str) -> APIError:
    if reason == "timeout":
        return APIError(504, "the request ran over the server's per-request timeout (--timeout)", type="server_error",
                        code="timeout")
    return APIError(503, "the request was cancelled (the server is shutting down)", type="server_error",
                    code="cancelled")
