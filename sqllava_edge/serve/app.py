"""The HTTP application: OpenAI-compatible chat completions, the self-questions extension, health, models, metrics
and the web page, all on one `Assistant`'s engine driven by a `runtimes.scheduler.Scheduler` (continuous batching).

Handlers never touch the backends. A POST first checks that the scheduler has room (503 otherwise, before reading
anything), reads the body up to its limit, then hands the CPU work (JSON parsing, the request checks of
sqllava_edge.serve.protocol, image decoding and resizing, tokenization) to a small bounded worker pool, so the event
loop keeps answering; the scheduler thread does the vision encode, the prefill and the batched decode, and sends events
back to the handler's event loop. A watcher on the connection cancels the request when the client goes away.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import json
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtimes.scheduler import (PREFILL_CHUNK, Event, QueueFullError, Request as EngineRequest, Scheduler,
                                ShuttingDownError)
from sqllava_edge.errors import ImageError, ImageTooLargeError, PromptTooLongError
from sqllava_edge.generation import TASK_DEFAULTS
from sqllava_edge.serve.metrics import CONTENT_TYPE, Metrics
from sqllava_edge.serve.protocol import (APIError, ChatRequest, Limits, bad_request, image_source, parse_chat,
                                         parse_self_questions)
from sqllava_edge.serve.security import HostCheck

log = logging.getLogger("sqllava_edge.serve")
TEXT_LIMIT = 1 << 20  # bytes of JSON besides the image
COMPILE_TIMEOUT = 10.0  # seconds a response_format schema may take to compile (a worker thread; then 400)


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
        self.descriptions: dict[str, str] = {}  # image key -> greedy description, for self-questions
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


def create_app(load: Callable[[], Any], settings: Settings = Settings(),
               on_loaded: Callable[[Any], None] | None = None, on_failed: Callable[[BaseException], None] | None = None
               ) -> FastAPI:
    """The app. `load()` returns an Assistant; it runs on a thread at startup (/health answers 503 until it is done)."""
    state = State(settings)

    def loader() -> None:
        try:
            assistant = load()
            state.scheduler = Scheduler(assistant.engine, settings.parallel, settings.queue,
                                        settings.prefill_chunk)
            state.assistant, state.loaded_at = assistant, int(time.time())
            state.ready.set()
            if on_loaded:
                on_loaded(assistant)
        except BaseException as exc:  # noqa: BLE001 - reported, and the server stops
            state.error = exc
            log.error("loading the model failed: %s", exc)
            if on_failed:
                on_failed(exc)

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        thread = threading.Thread(target=loader, name="sqllava-edge-loader", daemon=True)
        thread.start()
        yield
        if state.scheduler is not None:
            await run_in_threadpool(state.scheduler.shutdown, 30.0)
        if state.assistant is not None:
            state.assistant.close()
        state.workers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="sqllava-edge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sqllava = state
    _errors(app, state)
    _routes(app, state)
    if settings.cors_origins:  # FastAPI's CORS middleware answers the preflight for these origins only
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.add_middleware(HostCheck, bind_host=settings.host, extra=settings.allowed_hosts)  # outermost
    from sqllava_edge.serve.live import live_router  # here, not at the top: live.py imports this module

    app.include_router(live_router(state))
    return app


# --------------------------------------------------------------------------------------------------------------------
# Errors, auth, body


def _errors(app: FastAPI, state: State) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        state.metrics.requests.labels(_endpoint(request), str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        error = APIError(exc.status_code, str(exc.detail), type="invalid_request_error",
                         code="not_found" if exc.status_code == 404 else None)
        return await api_error(request, error)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        return await api_error(request, _internal_error(exc, f"{request.method} {request.url.path}"))


def _internal_error(exc: BaseException, where: str) -> APIError:
    """A failure of ours: logged with its traceback under a request id; the client gets only the id."""
    request_id = f"req-{uuid.uuid4().hex[:16]}"
    log.error("internal error %s on %s: %r", request_id, where, exc, exc_info=exc)
    return APIError(500, f"internal error (request id {request_id}); the server keeps running, and its log has the "
                         "details under that id", type="server_error", code="internal_error")


def _endpoint(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", "other")


def _authorize(state: State, request: Request) -> None:
    key = state.settings.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                       type="authentication_error", code="invalid_api_key")


def _ready(state: State):
    if state.error is not None:
        raise APIError(503, "the model failed to load; the server's log says why", type="server_error",
                       code="load_failed")
    if not state.ready.is_set():
        raise APIError(503, "the model is still loading; retry in a few seconds", type="server_error",
                       code="loading", headers={"Retry-After": "2"})
    return state.assistant, state.scheduler


def _check_headers(request: Request, limit: int) -> None:
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


async def _read_body(request: Request, limit: int) -> bytearray:
    """The body as bytes, refused (413) as soon as it passes `limit`."""
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise APIError(413, f"the request body is over this server's limit of {limit / 2**20:.1f} MiB "
                                "(--max-image-mb); send a smaller image", code="body_too_large")
        body += chunk
    return body


async def _json_body(request: Request, limit: int) -> Any:
    """A small JSON body (headers checked first, size bounded, parsed here): for routes whose bodies need no pool."""
    _check_headers(request, limit)
    return _parse_json(await _read_body(request, limit))


def _parse_json(body: bytes | bytearray) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise bad_request("the body nests arrays or objects too deeply to parse; send a flat JSON object") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON ({exc}); send a JSON object") from None


# --------------------------------------------------------------------------------------------------------------------
# Routes


def _routes(app: FastAPI, state: State) -> None:
    settings = state.settings

    @app.get("/health")
    async def health():
        if state.error is not None:  # the reason is in the server's log, not shown to every client
            return JSONResponse({"status": "error"}, status_code=503)
        if not state.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "2"})
        return {"status": "ok", "auth": bool(settings.api_key)}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(_page(), headers={"Cache-Control": "no-cache"})

    @app.get("/metrics")
    async def metrics(request: Request):
        _authorize(state, request)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict[str, Any]:
        return {"id": settings.model_id, "object": "model", "created": state.loaded_at, "owned_by": "sqllava-edge"}

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(state, request)
        _ready(state)
        state.metrics.requests.labels("/v1/models", "200").inc()
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        _authorize(state, request)
        _ready(state)
        if model_id != settings.model_id:
            raise APIError(404, f"no model {model_id!r} here; this server serves {settings.model_id!r}",
                           param="model", code="model_not_found")
        state.metrics.requests.labels("/v1/models/{model_id}", "200").inc()
        return model_card()

    @app.get("/v1/info")
    async def info(request: Request):
        """Extension: what the page shows (backends, limits)."""
        _authorize(state, request)
        assistant, _ = _ready(state)
        backends = assistant.backends
        return {"model": settings.model_id, "config": assistant.config.name, "template": assistant.template,
                "n_ctx": assistant.llm.n_ctx, "parallel": settings.parallel, "max_image_bytes": settings.max_image_bytes,
                "image_size": assistant.config.vision.image_size,
                "backends": {"vision": backends.vision if backends else assistant.vision.name,
                             "llm": backends.llm if backends else assistant.llm.name,
                             "vision_detail": backends.vision_detail if backends else assistant.vision.description,
                             "llm_detail": backends.llm_detail if backends else assistant.llm.description}}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrived = time.monotonic()
        _authorize(state, request)
        _, scheduler = _ready(state)
        _check_headers(request, settings.body_limit)
        _room(state)  # the queue check comes before any work
        body = await _read_body(request, settings.body_limit)
        with _Preparing(state):
            chat, pixels, ids = await state.work(_prepare_chat, state, body)
            config = await _structured_config(state.assistant, chat)  # compiled off the event loop, bounded in time
            call = _Call(state, request, arrived, "/v1/chat/completions")
            call.submit(scheduler, EngineRequest(ids, pixels, config, _seeds(chat.seed, chat.n),
                                                 timeout=settings.timeout,
                                                 drop_after=chat.config.temperature > 0 and chat.n > 1))
        try:
            await call.started()
            if chat.stream:
                streaming, call = call, None  # the stream closes its call
                return _EventStream(streaming.sse(chat), media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            texts, reasons, usage = await call.collect(chat.n)
            response = _completion(settings, call.id, texts, reasons, usage)
            if chat.logprobs is not None:
                for choice in response["choices"]:
                    choice["logprobs"] = {"content": call.logprobs.get(choice["index"], []), "refusal": None}
            return call.respond(response)
        finally:
            if call is not None:
                call.close()

    @app.post("/v1/self-questions")
    async def self_questions(request: Request):
        """Extension: the model's own questions about an image (SQ-LLaVA's visual self-questioning), optionally
        answered. {"image": data-URI, "n": 3, "seed": 0, "answer": false} -> {"description", "questions"}."""
        arrived = time.monotonic()
        _authorize(state, request)
        assistant, scheduler = _ready(state)
        _check_headers(request, settings.body_limit)
        _room(state)
        body = await _read_body(request, settings.body_limit)
        with _Preparing(state):
            ask, pixels = await state.work(_prepare_self_questions, state, body)
        description = await _describe(state, request, pixels)
        from sqllava_edge.conversation import interview_prompt, self_question_prompt

        tok, template = assistant.tokenizer, assistant.template
        seed = _seeds(ask.seed, 1)[0]
        prompt = await state.work(self_question_prompt, tok, description, template)
        call = _Call(state, request, arrived, "/v1/self-questions")
        call.submit(scheduler, EngineRequest(prompt, pixels, ask.config, [seed + i for i in range(ask.n)],
                                             timeout=settings.timeout, drop_after=True))
        questions, _, _ = await call.run(ask.n)
        if not ask.answer:
            return call.respond({"description": description, "questions": questions, "seed": seed})
        prompts = await state.work(lambda: [interview_prompt(tok, description, q, template) for q in questions])
        answers_call = _Call(state, request, arrived, "/v1/self-questions")
        answer_config = TASK_DEFAULTS["answer"].replace(max_new_tokens=ask.answer_tokens)
        answers_call.submit(scheduler, EngineRequest(prompts, pixels, answer_config, [None] * len(prompts),
                                                     timeout=settings.timeout))
        answers, _, _ = await answers_call.run(len(prompts))
        return call.respond({"description": description, "seed": seed,
                             "questions": [{"question": q, "answer": a} for q, a in zip(questions, answers)]})

    async def _describe(state: State, request: Request, pixels) -> str:
        from sqllava_edge.conversation import describe_prompt

        key = hashlib.sha256(pixels.tobytes()).hexdigest()
        if key not in state.descriptions:
            assistant, scheduler = _ready(state)
            call = _Call(state, request, time.monotonic(), "/v1/self-questions")
            call.submit(scheduler, EngineRequest(describe_prompt(assistant.tokenizer, assistant.template), pixels,
                                                 TASK_DEFAULTS["describe"], timeout=settings.timeout))
            texts, _, _ = await call.run(1)
            if len(state.descriptions) > 256:
                state.descriptions.clear()
            state.descriptions[key] = texts[0]
        return state.descriptions[key]


def _page() -> str:
    return resources.files("sqllava_edge.serve").joinpath("web/index.html").read_text(encoding="utf-8")


def _room(state: State) -> None:
    """503 if the scheduler's queue, counting the requests being prepared on the worker pool, is full."""
    if not state.has_room():
        scheduler = state.scheduler
        raise APIError(503, f"{scheduler.queue_depth + state.preparing} requests are waiting and "
                            f"{scheduler.running} running (--parallel {scheduler.parallel}, --queue "
                            f"{scheduler.queue_limit}); retry later", type="server_error", code="queue_full",
                       headers={"Retry-After": "1"})


class _Preparing:
    """Counts a POST as waiting from when its body is in (a slow sender holds no queue place) until it is submitted;
    refuses it (503) first if the queue, counting those, is full: the worker pool never holds more than the queue."""

    def __init__(self, state: State):
        self.state = state

    def __enter__(self) -> None:
        _room(self.state)
        self.state.preparing += 1

    def __exit__(self, *exc) -> None:
        self.state.preparing -= 1


# --------------------------------------------------------------------------------------------------------------------
# Preparation: runs on the worker pool (State.work)


def _prepare_chat(state: State, body: bytes) -> tuple[ChatRequest, Any, list[int]]:
    """Body -> (request, pixels or None, prompt ids), every check done; APIError for a bad request."""
    assistant = state.assistant
    chat = parse_chat(_parse_json(body), state.settings.limits)
    pixels = _pixels(state, chat.conversation.image, "messages")
    ids = _chat_prompt(assistant, chat, pixels is not None)
    chat.config = _check_length(assistant, ids, pixels is not None, chat)
    return chat, pixels, ids


def _prepare_self_questions(state: State, body: bytes):
    ask = parse_self_questions(_parse_json(body), TASK_DEFAULTS["self_question"])
    return ask, _pixels(state, ask.image, "image")


def _pixels(state: State, image, param: str):
    if image is None:
        return None
    settings = state.settings
    source = image_source(image, max_bytes=settings.max_image_bytes, media_paths=settings.media_paths, param=param)
    try:
        return state.assistant.engine.pixels(source, max_pixels=settings.max_image_pixels,
                                             max_aspect=settings.max_aspect_ratio)
    except ImageTooLargeError as exc:
        raise APIError(413, f"{exc} (this server's limits: --max-image-mpix {settings.max_image_pixels / 1e6:g}, "
                            f"--max-aspect-ratio {settings.max_aspect_ratio:g})", param=param,
                       code="image_too_large") from None
    except ImageError as exc:
        raise bad_request(str(exc), param=param, code="invalid_image") from None
    except MemoryError:
        raise APIError(413, "the image needs more memory to decode than the server has free; downscale it (this "
                            f"server's limit: --max-image-mpix {settings.max_image_pixels / 1e6:g})", param=param,
                       code="image_too_large") from None


def _chat_prompt(assistant, chat: ChatRequest, has_image: bool) -> list[int]:
    """Prompt ids of an OpenAI conversation in the model's template. Caller text (system prompt included) is plain
    text: only the template puts in BOS, EOS and the image position (at the start of the first user turn)."""
    from sqllava_edge.conversation import Turn, prompt_ids

    turns = [Turn(role, text) for role, text in chat.conversation.turns] + [Turn("assistant", None)]
    try:
        return prompt_ids(assistant.tokenizer, turns, assistant.template, has_image, system=chat.conversation.system)
    except ValueError as exc:
        raise bad_request(str(exc), param="messages") from None


def _check_length(assistant, ids: list[int], has_image: bool, chat: ChatRequest):
    """The prompt and max_tokens against the context one request may use -> the config to run: max_tokens is cut to
    the room the prompt leaves (the answer then ends with finish_reason "length", as llama-server does); one that no
    prompt could leave room for is refused."""
    rows = assistant.config.num_image_tokens if has_image else 0
    need = len(ids) - (1 if has_image else 0) + rows
    limit = assistant.engine.pool.max_positions
    if need + 1 > limit:
        raise bad_request(f"the prompt needs {need} positions ({rows} image rows + {need - rows} text tokens) but the "
                          f"context holds {limit} with room for at least one new token; shorten the conversation, or "
                          "start the server with a larger --n-ctx", param="messages", code="context_length_exceeded")
    room, config = limit - need, chat.config
    if config.max_new_tokens <= room:
        return config
    if chat.max_tokens_given and config.max_new_tokens >= limit:
        raise bad_request(f"max_tokens {config.max_new_tokens} can never fit: the context holds {limit} positions and "
                          f"this prompt needs {need}; ask for at most {room} (or start the server with a larger "
                          "--n-ctx)", param="max_tokens", code="context_length_exceeded")
    return config.replace(max_new_tokens=room)


async def _structured_config(assistant, chat: ChatRequest):
    """The request's GenerationConfig with its schema compiled (on a worker thread, never the scheduler's, within
    COMPILE_TIMEOUT) and its logprobs setting."""
    config = chat.config
    if chat.logprobs is not None:
        config = config.replace(logprobs=chat.logprobs)
    if chat.schema is None:
        return config
    from sqllava_edge.structured import SchemaError, compile_schema

    try:
        grammar = await asyncio.wait_for(run_in_threadpool(compile_schema, assistant.tokenizer, chat.schema),
                                         COMPILE_TIMEOUT)
    except SchemaError as exc:
        raise bad_request(str(exc), param="response_format", code="invalid_schema") from None
    except asyncio.TimeoutError:
        raise bad_request(f"the schema took over {COMPILE_TIMEOUT:g} s to compile; simplify it",
                          param="response_format", code="schema_too_complex") from None
    except ImportError as exc:
        raise APIError(501, str(exc), type="server_error", code="structured_output_unavailable") from None
    return config.replace(grammar=grammar)


def _seeds(seed: int | None, n: int) -> list[int]:
    base = random.SystemRandom().randrange(1 << 31) if seed is None else seed
    return [base + i for i in range(n)]


# --------------------------------------------------------------------------------------------------------------------
# One submitted request, seen from its handler


class _ClientGone(Exception):
    """The client closed the connection."""


class _EventStream(StreamingResponse):
    """A server-sent-event response that ends quietly when the client goes away (the call is cancelled by then)."""

    async def __call__(self, scope, receive, send):
        from starlette.requests import ClientDisconnect

        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass


class _Call:
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
        """The next event; _ClientGone when the client went away (the request is cancelled by then)."""
        event = await self.queue.get()
        if event is None:
            raise _ClientGone()
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
        except _ClientGone:
            raise APIError(499, "client closed the request", code="client_closed") from None
        if event.kind == "error":
            raise _api_error(event.error)
        if event.kind == "finish":  # cancelled or timed out while queued
            raise _ended_error(event.reason)

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
                        raise _ended_error(event.reason)
                    reasons[event.choice] = event.reason
                elif event.kind == "error":
                    raise _api_error(event.error)
                elif event.kind == "done":
                    return texts, reasons, event.usage
        except _ClientGone:
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
                        yield error(_ended_error(event.reason))
                        break
                    yield chunk([{"index": event.choice, "delta": {}, "finish_reason": event.reason}])
                elif event.kind == "error":
                    yield error(_api_error(event.error))
                    break
                elif event.kind == "done":
                    if chat.include_usage:
                        yield chunk([], _usage(event.usage))
                    break
            yield b"data: [DONE]\n\n"
            status = status or 200
        except _ClientGone:
            status = 499
        finally:
            self.close()
            if status is None or status == 499:
                status = 499
                if self.handle is not None:
                    self.handle.cancel()  # the client went away mid-stream: free its sequences
            self.state.metrics.requests.labels(self.endpoint, str(status)).inc()
            self.state.metrics.latency.labels(self.endpoint).observe(time.monotonic() - self.arrived)


def _usage(usage: dict[str, int]) -> dict[str, Any]:
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion(settings: Settings, call_id: str, texts: list[str], reasons: list[str], usage: dict) -> dict:
    return {"id": call_id, "object": "chat.completion", "created": int(time.time()), "model": settings.model_id,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                        for i, (text, reason) in enumerate(zip(texts, reasons))],
            "usage": _usage(usage)}


def _api_error(exc: BaseException | None) -> APIError:
    if isinstance(exc, PromptTooLongError):
        return bad_request(str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, ImageTooLargeError):
        return APIError(413, str(exc), code="image_too_large")
    if isinstance(exc, ImageError):
        return bad_request(str(exc), code="invalid_image")
    if isinstance(exc, ShuttingDownError):
        return APIError(503, str(exc), type="server_error", code="shutting_down")
    return _internal_error(exc, "the engine")


def _ended_error(reason: str) -> APIError:
    if reason == "timeout":
        return APIError(504, "the request ran over the server's per-request timeout (--timeout)", type="server_error",
                        code="timeout")
    return APIError(503, "the request was cancelled (the server is shutting down)", type="server_error",
                    code="cancelled")
