"""The HTTP application: OpenAI-compatible chat completions, the self-questions extension, health, models, metrics
and the web page, all on one `Assistant`'s engine driven by a `runtimes.scheduler.Scheduler` (continuous batching).

Handlers never touch the backends: they parse and check the request (sqllava_edge.serve.protocol), decode and resize
the image on a worker thread (Engine.pixels needs no lock), build the prompt ids, and submit a Request; the scheduler
thread does the vision encode, the prefill and the batched decode, and sends events back to the handler's event loop.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtimes.scheduler import (PREFILL_CHUNK, Event, QueueFullError, Request as EngineRequest, Scheduler,
                                ShuttingDownError)
from sqllava_edge.errors import ImageError, ImageTooLargeError, PromptTooLongError
from sqllava_edge.generation import TASK_DEFAULTS
from sqllava_edge.serve.metrics import CONTENT_TYPE, Metrics
from sqllava_edge.serve.protocol import (APIError, ChatRequest, bad_request, image_source, parse_chat,
                                         parse_self_questions)

log = logging.getLogger("sqllava_edge.serve")
TEXT_LIMIT = 1 << 20  # bytes of JSON besides the image
COMPILE_TIMEOUT = 10.0  # seconds a response_format schema may take to compile (a worker thread; then 400)


@dataclass(frozen=True)
class Settings:
    api_key: str | None = None
    max_image_bytes: int = 20 << 20
    allow_local_files: bool = False
    parallel: int = 4
    queue: int = 64
    prefill_chunk: int = PREFILL_CHUNK  # positions prefilled between decode steps of running requests (0: all)
    timeout: float = 600.0  # seconds per request
    model_id: str = "sqllava-edge"

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

    app = FastAPI(title="sqllava-edge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sqllava = state
    _errors(app, state)
    _routes(app, state)
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
        log.exception("internal error on %s", request.url.path)
        error = APIError(500, f"internal error ({type(exc).__name__}); the server keeps running, see its log",
                         type="server_error")
        return await api_error(request, error)


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
        raise APIError(503, f"the model failed to load: {state.error}", type="server_error", code="load_failed")
    if not state.ready.is_set():
        raise APIError(503, "the model is still loading; retry in a few seconds", type="server_error",
                       code="loading", headers={"Retry-After": "2"})
    return state.assistant, state.scheduler


async def _json_body(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {int(declared) / 2**20:.1f} MiB, over this server's limit of "
                            f"{limit / 2**20:.1f} MiB (--max-image-mb); send a smaller image", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over this server's limit of {limit / 2**20:.1f} MiB "
                                "(--max-image-mb); send a smaller image", code="body_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON ({exc}); send a JSON object") from None


# --------------------------------------------------------------------------------------------------------------------
# Routes


def _routes(app: FastAPI, state: State) -> None:
    settings = state.settings

    @app.get("/health")
    async def health():
        if state.error is not None:
            return JSONResponse({"status": "error", "error": str(state.error)}, status_code=503)
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

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(state, request)
        _ready(state)
        state.metrics.requests.labels("/v1/models", "200").inc()
        return {"object": "list", "data": [{"id": settings.model_id, "object": "model", "created": state.loaded_at,
                                            "owned_by": "sqllava-edge"}]}

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
        assistant, scheduler = _ready(state)
        chat = parse_chat(await _json_body(request, settings.body_limit))
        config = await _structured_config(assistant, chat)  # a schema it cannot hold to fails before the image work
        pixels = await _pixels(state, chat.conversation.image, "messages")
        ids = _chat_prompt(assistant, chat, pixels is not None)
        _check_length(assistant, ids, pixels is not None, chat.config.max_new_tokens)
        seeds = _seeds(chat.seed, chat.n)
        call = _Call(state, request, arrived, "/v1/chat/completions")
        call.submit(scheduler, EngineRequest(ids, pixels, config, seeds, timeout=settings.timeout,
                                             drop_after=chat.config.temperature > 0 and chat.n > 1))
        await call.started()
        if chat.stream:
            return StreamingResponse(call.sse(chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts, reasons, usage = await call.collect(chat.n)
        body = _completion(settings, call.id, texts, reasons, usage)
        if chat.logprobs is not None:
            for choice in body["choices"]:
                choice["logprobs"] = {"content": call.logprobs.get(choice["index"], []), "refusal": None}
        return call.respond(body)

    @app.post("/v1/self-questions")
    async def self_questions(request: Request):
        """Extension: the model's own questions about an image (SQ-LLaVA's visual self-questioning), optionally
        answered. {"image": data-URI, "n": 3, "seed": 0, "answer": false} -> {"description", "questions"}."""
        arrived = time.monotonic()
        _authorize(state, request)
        assistant, scheduler = _ready(state)
        ask = parse_self_questions(await _json_body(request, settings.body_limit), TASK_DEFAULTS["self_question"])
        pixels = await _pixels(state, ask.image, "image")
        description = await _describe(state, request, pixels)
        from sqllava_edge.conversation import interview_prompt, self_question_prompt

        tok, template = assistant.tokenizer, assistant.template
        seed = _seeds(ask.seed, 1)[0]
        call = _Call(state, request, arrived, "/v1/self-questions")
        call.submit(scheduler, EngineRequest(self_question_prompt(tok, description, template), pixels, ask.config,
                                             [seed + i for i in range(ask.n)], timeout=settings.timeout,
                                             drop_after=True))
        await call.started()
        questions, _, _ = await call.collect(ask.n)
        questions = [q.strip() for q in questions]
        if not ask.answer:
            return call.respond({"description": description, "questions": questions, "seed": seed})
        prompts = [interview_prompt(tok, description, q, template) for q in questions]
        answers_call = _Call(state, request, arrived, "/v1/self-questions")
        answer_config = TASK_DEFAULTS["answer"].replace(max_new_tokens=ask.answer_tokens)
        answers_call.submit(scheduler, EngineRequest(prompts, pixels, answer_config, [None] * len(prompts),
                                                     timeout=settings.timeout))
        await answers_call.started()
        answers, _, _ = await answers_call.collect(len(prompts))
        return call.respond({"description": description, "seed": seed,
                             "questions": [{"question": q, "answer": a.strip()} for q, a in zip(questions, answers)]})

    async def _describe(state: State, request: Request, pixels) -> str:
        from sqllava_edge.conversation import describe_prompt

        key = hashlib.sha256(pixels.tobytes()).hexdigest()
        if key not in state.descriptions:
            assistant, scheduler = _ready(state)
            call = _Call(state, request, time.monotonic(), "/v1/self-questions")
            call.submit(scheduler, EngineRequest(describe_prompt(assistant.tokenizer, assistant.template), pixels,
                                                 TASK_DEFAULTS["describe"], timeout=settings.timeout))
            await call.started()
            texts, _, _ = await call.collect(1)
            if len(state.descriptions) > 256:
                state.descriptions.clear()
            state.descriptions[key] = texts[0].strip()
        return state.descriptions[key]


def _page() -> str:
    return resources.files("sqllava_edge.serve").joinpath("web/index.html").read_text(encoding="utf-8")


async def _pixels(state: State, image, param: str):
    if image is None:
        return None
    settings = state.settings
    source = image_source(image, max_bytes=settings.max_image_bytes, allow_local_files=settings.allow_local_files,
                          param=param)
    try:
        return await run_in_threadpool(state.assistant.engine.pixels, source)
    except ImageTooLargeError as exc:
        raise APIError(413, str(exc), code="image_too_large") from None
    except ImageError as exc:
        raise bad_request(str(exc), param=param, code="invalid_image") from None


def _chat_prompt(assistant, chat: ChatRequest, has_image: bool) -> list[int]:
    """Prompt ids of an OpenAI conversation in the model's template. Caller text (system prompt included) is plain
    text: only the template puts in BOS, EOS and the image position (at the start of the first user turn)."""
    from sqllava_edge.conversation import Turn, prompt_ids

    turns = [Turn(role, text) for role, text in chat.conversation.turns] + [Turn("assistant", None)]
    try:
        return prompt_ids(assistant.tokenizer, turns, assistant.template, has_image, system=chat.conversation.system)
    except ValueError as exc:
        raise bad_request(str(exc), param="messages") from None


def _check_length(assistant, ids: list[int], has_image: bool, max_new: int) -> None:
    rows = assistant.config.num_image_tokens if has_image else 0
    need = len(ids) - (1 if has_image else 0) + rows
    n_ctx = assistant.llm.n_ctx
    if need + 1 > n_ctx:
        raise bad_request(f"the prompt needs {need} positions ({rows} image rows + {need - rows} text tokens) but the "
                          f"context holds {n_ctx} with room for at least one new token; shorten the conversation, or "
                          "start the server with a larger --n-ctx", param="messages", code="context_length_exceeded")


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


class _Call:
    def __init__(self, state: State, request: Request, arrived: float, endpoint: str):
        self.state, self.request, self.arrived, self.endpoint = state, request, arrived, endpoint
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.handle = None
        self.first_token = False
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

    async def next(self) -> Event:
        """The next event; cancels the request if the client goes away while we wait."""
        while True:
            try:
                event = await asyncio.wait_for(self.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await self.request.is_disconnected():
                    self.handle.cancel()
                    raise asyncio.CancelledError("client disconnected")
                continue
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
        except asyncio.CancelledError:
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
                    return [t.rstrip() for t in texts], reasons, event.usage
        except asyncio.CancelledError:
            self.handle.cancel()
            raise

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
        model, finished = self.state.settings.model_id, False

        def chunk(choices: list, usage: dict | None = None) -> bytes:
            body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": model,
                    "choices": choices}
            if chat.include_usage:
                body["usage"] = usage
            return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"

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
                        error = _ended_error(event.reason)
                        yield b"data: " + json.dumps(error.body()).encode() + b"\n\n"
                        break
                    yield chunk([{"index": event.choice, "delta": {}, "finish_reason": event.reason}])
                elif event.kind == "error":
                    yield b"data: " + json.dumps(_api_error(event.error).body()).encode() + b"\n\n"
                    break
                elif event.kind == "done":
                    if chat.include_usage:
                        yield chunk([], _usage(event.usage))
                    break
            yield b"data: [DONE]\n\n"
            finished = True
            self.state.metrics.requests.labels(self.endpoint, "200").inc()
            self.state.metrics.latency.labels(self.endpoint).observe(time.monotonic() - self.arrived)
        finally:
            if not finished and self.handle is not None:
                self.handle.cancel()  # the client went away mid-stream: free its sequences


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
    log.error("request failed in the engine: %r", exc)
    return APIError(500, f"the engine failed on this request ({type(exc).__name__}: {exc}); the server keeps running",
                    type="server_error")


def _ended_error(reason: str) -> APIError:
    if reason == "timeout":
        return APIError(504, "the request ran over the server's per-request timeout (--timeout)", type="server_error",
                        code="timeout")
    return APIError(503, "the request was cancelled (the server is shutting down)", type="server_error",
                    code="cancelled")
