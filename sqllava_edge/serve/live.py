"""Live video on the server: a standing question answered over frames a client pushes (a browser's camera), or over a
source the operator allowed on the command line (`--live-source /dev/video0`, `--live-source rtsp://cams.local/`).

    POST /v1/live                 {"question": "...", "fps": 2, "threshold": 6, "every_change": true, "max_tokens": 32,
                                   "source": "/dev/video0" (only if allowed; omit it to push frames)}
        -> text/event-stream      event: session  {"id", "frames": "/v1/live/<id>/frames", "source"}
                                  event: answer   {"timestamp", "frame_index", "answer", "latency",
                                                   "skipped_since_last", "dropped_since_last"}
                                  event: error    OpenAI's error object, then the stream ends
                                  event: end      {"reason": "source ended"}
    POST /v1/live/<id>/frames     {"image": "data:image/jpeg;base64,...", "timestamp": 1.25 (seconds, optional)}
        -> 202                    {"status": "queued" | "unchanged" | "sampled out", "skipped", "dropped"}

Both POST bodies are JSON (frames as base64 data URIs, as /v1/chat/completions takes images). A session holds at most
one frame waiting: a frame pushed while the model is busy replaces the one waiting (counted as dropped), so a client
faster than the device never builds a backlog; a client that waits for each answer before pushing again (the web page
does) runs at the rate the server keeps up with. Frames pass the same gate as `sqllava-edge watch` (runtimes.watch:
rate sampling on their timestamps, unchanged frames skipped). Each answer is one request on the server's scheduler,
batched with the chat requests. Closing the event stream ends the session: its frame endpoint answers 404 from then on
and its in-flight answer is cancelled.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import asdict
from typing import Any, AsyncIterator

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from runtimes.scheduler import Request as EngineRequest
from runtimes.watch import DEFAULT_THRESHOLD, WATCH_TOKENS, FrameAnswer, Gate, Mailbox, Pending, read_into
from sqllava_edge.errors import ImageError, ImageTooLargeError
from sqllava_edge.serve.calls import Call, State, authorize, json_body, ready
from sqllava_edge.serve.protocol import APIError, _number, bad_request, check_fields, image_source
from sqllava_edge.video import Frame

START_FIELDS = {"question", "source", "fps", "threshold", "every_change", "max_tokens", "model"}
FRAME_FIELDS = {"image", "timestamp"}
MAX_TOKENS = 256  # a standing question wants a short answer
IDLE = 0.5  # seconds between checks that the client is still there while no frame waits


def allowed_source(spec: str, allowed: tuple[str, ...]) -> bool:
    """A camera must be listed exactly; a URL must start with a listed URL prefix. Nothing else (no files)."""
    for entry in allowed:
        if "://" in entry:
            if "://" in spec and spec.startswith(entry):
                return True
        elif spec == entry:
            return True
    return False


class Session:
    def __init__(self, state: State, ids: list[int], config, gate: Gate, source: str | None):
        self.id = f"live-{uuid.uuid4().hex[:16]}"
        self.state, self.ids, self.config, self.gate, self.source = state, ids, config, gate, source
        self.started = time.monotonic()
        self.frames = 0  # frames received (pushed or read)
        self.loop = asyncio.get_running_loop()
        self.ready = asyncio.Event()  # set when a frame is put in the box, or the box closes
        self.box = Mailbox(notify=lambda: self.loop.call_soon_threadsafe(self.ready.set))
        self.reader = None  # (thread, source) of a server-side source
        self.failure: list[BaseException] = []  # what stopped the server-side source's reader
        self._offering = threading.Lock()  # a client may push frames concurrently: the gate takes one at a time

    def offer(self, image: np.ndarray, timestamp: float | None) -> str:
        """A pushed frame through the gate into the box (a worker thread: the gate's thumbnail is numpy work)."""
        with self._offering:
            stamp = time.monotonic() - self.started if timestamp is None else timestamp
            frame = Frame(self.frames, stamp, image)
            self.frames += 1
            if not self.gate.admit(frame.timestamp, image):
                return self.gate.verdict
            self.box.put(Pending(frame, time.monotonic(), self.gate.skipped))
            return "queued"

    async def next(self) -> Pending | None:
        """The waiting frame; None when the box closed (the source ended or the session stopped); _IDLE when nothing
        came within IDLE seconds (time to check that the client is still there)."""
        self.ready.clear()
        item = self.box.get(timeout=0)
        if item is not None or self.box.closed:
            return item
        try:
            await asyncio.wait_for(self.ready.wait(), IDLE)
        except asyncio.TimeoutError:
            return _IDLE
        item = self.box.get(timeout=0)
        return item if item is not None or self.box.closed else _IDLE

    def close(self) -> None:
        self.box.close()
        if self.reader is not None:  # the reader stops at its next frame; release the device after it
            thread, source = self.reader
            threading.Thread(target=lambda: (thread.join(10), source.close()), daemon=True).start()


_IDLE = Pending(None, 0.0, 0)  # no frame within IDLE seconds: check the client


def live_router(state: State) -> APIRouter:
    router = APIRouter()
    sessions: dict[str, Session] = {}
    state.live_sessions = sessions  # what /metrics-style readers (and the tests) can look at
    settings = state.settings

    @router.post("/v1/live")
    async def start(request: Request):
        authorize(state, request)
        assistant, scheduler = ready(state)
        body = check_fields(await json_body(request, 1 << 20), START_FIELDS)
        question = body.get("question")
        if not isinstance(question, str) or not question.strip():
            raise bad_request("question must be a non-empty string: the standing question about the video",
                              param="question")
        every_change = body.get("every_change", True)
        if not isinstance(every_change, bool):
            raise bad_request("every_change must be true or false", param="every_change")
        gate = Gate(_number(body, "fps", 0, 1000, None, lo_open=True), every_change,
                    _number(body, "threshold", 0, 255, DEFAULT_THRESHOLD))
        config = assistant_config(_number(body, "max_tokens", 1, MAX_TOKENS, WATCH_TOKENS, integer=True))
        from sqllava_edge.conversation import answer_prompt

        ids = answer_prompt(assistant.tokenizer, question.strip(), assistant.template)
        if len(sessions) >= max(1, settings.parallel):
            raise APIError(503, f"{len(sessions)} live sessions are running, this server's most (--parallel); "
                                "close one or retry later", type="server_error", code="too_many_sessions",
                           headers={"Retry-After": "5"})
        session = Session(state, ids, config, gate, body.get("source"))
        if session.source is not None:
            await _open(session, settings.live_sources)
        sessions[session.id] = session
        return StreamingResponse(_events(state, request, session, sessions), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.post("/v1/live/{session_id}/frames", status_code=202)
    async def push(session_id: str, request: Request):
        authorize(state, request)
        assistant, _ = ready(state)
        session = sessions.get(session_id)
        if session is None:
            raise APIError(404, f"no live session {session_id}: it ended (its event stream closed) or never started; "
                                "start one with POST /v1/live", code="session_not_found")
        if session.source is not None:
            raise APIError(409, "this session watches a server-side source; frames cannot be pushed to it",
                           code="session_has_source")
        body = check_fields(await json_body(request, settings.body_limit), FRAME_FIELDS)
        if not isinstance(body.get("image"), str):
            raise bad_request("image must be a data URI string (data:image/jpeg;base64,...)", param="image")
        timestamp = _number(body, "timestamp", 0, 1e9, None)
        data = image_source(body["image"], max_bytes=settings.max_image_bytes, param="image")
        status = await state.work(_offer, session, data, timestamp, settings)
        return JSONResponse({"status": status, "skipped": session.gate.skipped, "dropped": session.box.dropped},
                            status_code=202)

    return router


def assistant_config(max_tokens: int):
    from sqllava_edge.generation import TASK_DEFAULTS

    return TASK_DEFAULTS["answer"].replace(max_new_tokens=max_tokens)


def _offer(session: Session, data: bytes, timestamp: float | None, settings) -> str:
    from sqllava_edge.image import load_image

    try:  # the server's image limits, checked from the header before decoding
        image = np.asarray(load_image(data, max_pixels=settings.max_image_pixels, max_aspect=settings.max_aspect_ratio))
    except ImageTooLargeError as exc:
        raise APIError(413, str(exc), code="image_too_large") from None
    except ImageError as exc:
        raise bad_request(str(exc), param="image", code="invalid_image") from None
    return session.offer(image, timestamp)


async def _open(session: Session, allowed: tuple[str, ...]) -> None:
    """Start reading an allowed server-side source on a thread (opening a stream or camera may take seconds)."""
    from sqllava_edge.video import open_source

    spec = session.source
    if not isinstance(spec, str) or not allowed_source(spec, allowed):
        hint = (f"allowed here: {', '.join(allowed)}" if allowed else
                "this server allows none (the operator lists them with --live-source); push frames instead")
        raise APIError(403, f"source {spec!r} is not an allowed live source; {hint}", param="source",
                       code="source_not_allowed")
    try:
        source = await run_in_threadpool(open_source, spec)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise bad_request(f"cannot open the live source: {exc}", param="source", code="source_unavailable") from None
    thread = threading.Thread(target=read_into, args=(source, session.gate, session.box, not source.live,
                                                      session.failure), name="sqllava-edge-live-reader", daemon=True)
    session.reader = (thread, source)
    thread.start()


async def _events(state: State, request: Request, session: Session, sessions: dict) -> AsyncIterator[bytes]:
    def event(name: str, data: Any) -> bytes:
        return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

    skipped = dropped = 0
    try:
        yield event("session", {"id": session.id, "frames": f"/v1/live/{session.id}/frames", "source": session.source})
        while True:
            item = await session.next()
            if item is _IDLE:
                if await request.is_disconnected():
                    return
                continue
            if item is None:
                if session.failure:
                    yield event("error", bad_request(f"the live source failed: {session.failure[0]}",
                                                     param="source", code="source_failed").body())
                else:
                    yield event("end", {"reason": "source ended"})
                return
            try:
                text = await _answer(state, request, session, item)
            except APIError as exc:
                yield event("error", exc.body())
                return
            answer = FrameAnswer(item.frame.timestamp, item.frame.index, text, time.monotonic() - item.arrived,
                                 item.skipped - skipped, session.box.dropped - dropped)
            skipped, dropped = item.skipped, session.box.dropped
            yield event("answer", asdict(answer))
    finally:
        sessions.pop(session.id, None)
        session.close()


async def _answer(state: State, request: Request, session: Session, item: Pending) -> str:
    """One frame through the scheduler: encode, prefill the standing prompt, decode (batched with other requests)."""
    assistant, scheduler = ready(state)
    pixels = await state.work(assistant.engine.pixels, item.frame.image)
    call = Call(state, request, item.arrived, "/v1/live")
    call.submit(scheduler, EngineRequest(session.ids, pixels, session.config, timeout=state.settings.timeout))
    await call.started()
    texts, _, _ = await call.collect(1)
    return texts[0].strip()
