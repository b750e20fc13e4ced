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
import logging
import random
import threading
import time
from importlib import resources
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtimes.scheduler import Request as EngineRequest, Scheduler
from sqllava_edge.errors import ImageError, ImageTooLargeError
from sqllava_edge.generation import TASK_DEFAULTS
from sqllava_edge.serve.calls import (Call, EventStream, Settings, State, authorize, check_headers, endpoint_of,
                                      internal_error, parse_json, read_body, ready, usage_body)
from sqllava_edge.serve.live import live_router
from sqllava_edge.serve.metrics import CONTENT_TYPE
from sqllava_edge.serve.protocol import (APIError, ChatRequest, bad_request, image_source, parse_chat,
                                         parse_self_questions)
from sqllava_edge.serve.security import HostCheck

log = logging.getLogger("sqllava_edge.serve")
COMPILE_TIMEOUT = 10.0  # seconds a response_format schema may take to compile (a worker thread; then 400)


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
    app.include_router(live_router(state))
    return app


# --------------------------------------------------------------------------------------------------------------------
# Errors, auth, body


def _errors(app: FastAPI, state: State) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        state.metrics.requests.labels(endpoint_of(request), str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        error = APIError(exc.status_code, str(exc.detail), type="invalid_request_error",
                         code="not_found" if exc.status_code == 404 else None)
        return await api_error(request, error)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        return await api_error(request, internal_error(exc, f"{request.method} {request.url.path}"))


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
        authorize(state, request)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict[str, Any]:
        return {"id": settings.model_id, "object": "model", "created": state.loaded_at, "owned_by": "sqllava-edge"}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(state, request)
        ready(state)
        state.metrics.requests.labels("/v1/models", "200").inc()
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        authorize(state, request)
        ready(state)
        if model_id != settings.model_id:
            raise APIError(404, f"no model {model_id!r} here; this server serves {settings.model_id!r}",
                           param="model", code="model_not_found")
        state.metrics.requests.labels("/v1/models/{model_id}", "200").inc()
        return model_card()

    @app.get("/v1/info")
    async def info(request: Request):
        """Extension: what the page shows (backends, limits)."""
        authorize(state, request)
        assistant, _ = ready(state)
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
        authorize(state, request)
        _, scheduler = ready(state)
        check_headers(request, settings.body_limit)
        _room(state)  # the queue check comes before any work
        body = await read_body(request, settings.body_limit)
        with _Preparing(state):
            chat, pixels, ids = await state.work(_prepare_chat, state, body)
            config = await _structured_config(state.assistant, chat)  # compiled off the event loop, bounded in time
            call = Call(state, request, arrived, "/v1/chat/completions")
            call.submit(scheduler, EngineRequest(ids, pixels, config, _seeds(chat.seed, chat.n),
                                                 timeout=settings.timeout,
                                                 drop_after=not chat.config.greedy and chat.n > 1))
        try:
            await call.started()
            if chat.stream:
                streaming, call = call, None  # the stream closes its call
                return EventStream(streaming.sse(chat), media_type="text/event-stream",
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
        authorize(state, request)
        assistant, scheduler = ready(state)
        check_headers(request, settings.body_limit)
        _room(state)
        body = await read_body(request, settings.body_limit)
        with _Preparing(state):
            ask, pixels = await state.work(_prepare_self_questions, state, body)
        from runtimes.engine import image_key
        from runtimes.tasks import advance, self_questioning

        seed = _seeds(ask.seed, 1)[0]
        answers = TASK_DEFAULTS["answer"].replace(max_new_tokens=ask.answer_tokens) if ask.answer else None
        key = image_key(pixels)  # its cached description, if any, is the engine's
        plan = self_questioning(assistant.engine, key, assistant.template, ask.n, seed, ask.config, answers=answers)
        job, asked = await state.work(advance, plan)  # prompts are tokenised on the worker pool
        call = None
        while job is not None:
            call = Call(state, request, arrived, "/v1/self-questions")
            call.submit(scheduler, job.request(pixels, timeout=settings.timeout))
            texts, _, _ = await call.run(len(job.seeds))
            job, asked = await state.work(advance, plan, texts)
        body = {"description": asked.description, "seed": seed}
        if asked.answers is None:
            body["questions"] = asked.questions
        else:
            body["questions"] = [{"question": q, "answer": a} for q, a in zip(asked.questions, asked.answers)]
        return call.respond(body)


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
    chat = parse_chat(parse_json(body), state.settings.limits)
    pixels = _pixels(state, chat.conversation.image, "messages")
    ids = _chat_prompt(assistant, chat, pixels is not None)
    chat.config = _check_length(assistant, ids, pixels is not None, chat)
    return chat, pixels, ids


def _prepare_self_questions(state: State, body: bytes):
    ask = parse_self_questions(parse_json(body), TASK_DEFAULTS["self_question"])
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


def _completion(settings: Settings, call_id: str, texts: list[str], reasons: list[str], usage: dict) -> dict:
    return {"id": call_id, "object": "chat.completion", "created": int(time.time()), "model": settings.model_id,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                        for i, (text, reason) in enumerate(zip(texts, reasons))],
            "usage": usage_body(usage)}


