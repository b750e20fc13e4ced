"""Continuous batching on one Engine: many requests, one model, one batched decode call per step.

Up to `parallel` requests run at once. One scheduler thread loops: it moves the admission of the next waiting request
forward (encodes its image unless cached, prefills its prompt reusing any cached prefix, forks it for n > 1 choices),
then advances every running choice of every request by one token in a single `pool.decode` call (the LLM backend's
batched decode), as llama.cpp's `llama-server` does with its slots. A finished or cancelled request frees its
sequences at once, so the next waiting request is admitted on the next loop.

Chunked prefill: while other requests are decoding, a new request's prompt is prefilled `prefill_chunk` positions
(and its image encode) per loop, between their decode steps, so a 600-row image prompt arriving does not freeze the
streams already running for the whole prefill; they wait for one piece at a time. With nothing else running, the
prompt is prefilled in one go. `prefill_chunk=0` turns this off (the whole prompt between two decode steps).

This is the one place where a token is sampled, a stop string matched and a sequence freed, for every front door:
the server runs a Scheduler on its own thread; `Assistant` (and `runtimes.watch`) run one without a thread
(`thread=False`), whose loop turns on the caller's thread inside `events()`, so a question gives the same tokens
whichever door it came through (as long as the backend's batched decode gives the same logits as a lone one: exactly
so for llama.cpp with an f32 GGUF and f32 KV cache on the CPU).

Events go to each request's `on_event` callback from the thread running the loop; it must return quickly (the server
hands them to its event loop). All engine work runs under `engine.lock`, one step at a time, so two schedulers on one
engine (an `Assistant` call while its engine is being served) interleave step by step.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from runtimes.engine import Engine, TextStream
from runtimes.sequences import Prefill, positions
from sqllava_edge.errors import PromptTooLongError
from sqllava_edge.generation import GenerationConfig, Sampler


class QueueFullError(RuntimeError):
    """The waiting queue is full; try again later."""


class ShuttingDownError(RuntimeError):
    """The scheduler no longer accepts requests."""


@dataclass(frozen=True)
class Event:
    kind: str  # "start" | "token" | "finish" | "error" | "done"
    choice: int = 0
    text: str = ""  # "token": the new text piece (may be empty while a character or stop string is incomplete)
    token: int = -1
    reason: str = ""  # "finish": "stop" | "length" | "cancelled" | "timeout"
    error: BaseException | None = None
    usage: dict[str, int] = field(default_factory=dict)  # "start": prompt / cached positions; "done": totals
    logprobs: tuple | None = None  # "token", when the request's config asks: Sampler.last_logprobs


@dataclass
class Request:
    """One prompt continued by len(seeds) choices (forks of one prefill), or several prompts (a list of id lists),
    one choice each, prefilled separately (sharing whatever prefix they share) and decoded together."""

    prompt_ids: list  # ids holding one IMAGE_TOKEN_INDEX when `image` is given, or a list of such id lists
    image: Any  # None, preprocessed pixels (Engine.pixels), an ImageRef, or anything Engine.pixels takes; with
    # several prompts, a list or tuple gives each prompt its own image
    config: GenerationConfig
    seeds: Sequence[int | None] = (None,)  # one per choice
    on_event: Callable[[Event], None] = lambda event: None
    timeout: float | None = None  # seconds from submission
    drop_after: bool = False  # forget the sequences' content when done (sampled continuations)

    def __post_init__(self):
        if not self.seeds:
            raise ValueError("a request needs at least one choice")
        many = bool(self.prompt_ids) and isinstance(self.prompt_ids[0], (list, tuple))
        self.prompts = [list(p) for p in self.prompt_ids] if many else [list(self.prompt_ids)]
        if many and len(self.prompts) != len(self.seeds):
            raise ValueError(f"{len(self.prompts)} prompts need {len(self.prompts)} seeds, got {len(self.seeds)}")
        per_prompt = many and isinstance(self.image, (list, tuple))
        if per_prompt and len(self.image) != len(self.prompts):
            raise ValueError(f"{len(self.prompts)} prompts need {len(self.prompts)} images, got {len(self.image)}")
        self.images = list(self.image) if per_prompt else [self.image] * len(self.prompts)

    @property
    def sequences(self) -> int:
        """KV sequences it holds while running: one per prompt, or a shared prompt and its forks for n > 1 choices."""
        n = len(self.seeds)
        return len(self.prompts) if len(self.prompts) > 1 else n + (n > 1)


class Handle:
    """What `submit` returns: `cancel()` it when the client goes away; `finished` is set after its last event, and
    `first_token` holds the monotonic time of its first token (for callers that measure time to first token)."""

    def __init__(self, request: Request, scheduler: "Scheduler"):
        self.request = request
        self.submitted = time.monotonic()
        self.first_token: float | None = None
        self._scheduler = scheduler
        self.cancelled = False
        self.finished = threading.Event()

    def cancel(self) -> None:
        self.cancelled = True
        self._scheduler._wake()


class _Choice:
    def __init__(self, index: int, seq: int, logits: np.ndarray, sampler: Sampler, text: TextStream):
        self.index, self.seq, self.logits, self.sampler, self.text = index, seq, logits, sampler, text
        self.count = 0
        self.done = False


class _Admission:
    """A request being admitted: its prompt(s) prefilled one backend call per `step` (SequencePool.begin)."""

    def __init__(self, handle: Handle):
        self.handle, self.request = handle, handle.request
        self.task: Prefill | None = None
        self.seqs: list[int] = []  # prompts already in
        self.logits: list[np.ndarray] = []
        self.need = self.cached = 0
        self.current = 0  # positions of the prompt in progress

    def step(self, engine: Engine, chunk: int | None) -> bool:
        """One piece of work (caller holds engine.lock); True when every prompt is in."""
        if self.task is None:
            encodes = engine.counters.vision_encodes
            items = engine.items(self.request.images[len(self.seqs)], self.request.prompts[len(self.seqs)])
            self.current = positions(items)
            self.task = engine.pool.begin(items, chunk)
            self.need += self.task.positions
            self.cached += self.task.reused
            if engine.counters.vision_encodes != encodes and chunk:
                return False  # the encode was this step's work
        if not self.task.step():
            return False
        self.seqs.append(self.task.seq)
        self.logits.append(self.task.logits)
        self.task = None
        return len(self.seqs) == len(self.request.prompts)

    def abort(self, engine: Engine) -> None:
        """Roll back the prompt in progress and free the ones already in (caller holds engine.lock)."""
        if self.task is not None:
            self.task.cancel()
            self.task = None
        engine.pool.done(*self.seqs)
        self.seqs, self.logits = [], []


class _Job:
    def __init__(self, handle: Handle, choices: list[_Choice], prompt: int):
        self.handle, self.choices, self.prompt = handle, choices, prompt

    @property
    def active(self) -> list[_Choice]:
        return [c for c in self.choices if not c.done]

    def used(self, pool) -> int:
        """KV cells this request's running choices hold: its prompt(s), a prefix they share counted once, and the
        tokens they generated."""
        return pool.cells_of([c.seq for c in self.active])


# Positions prefilled per piece while other requests decode. llama.cpp prefills 256-row micro-batches about as fast as
# 512-row ones on a CPU (benchmarks/RESULTS.md, prefill table) and smaller ones slower, so 256 costs little prefill
# speed; a running stream then waits about one piece (~1 s on bench-1b, 2 cores) instead of the whole prompt.
PREFILL_CHUNK = 256


class Scheduler:
    def __init__(self, engine: Engine, parallel: int = 4, queue: int = 64, prefill_chunk: int = PREFILL_CHUNK, *,
                 thread: bool = True):
        """thread=False: no loop thread; the loop turns inside `events()` on the calling thread (the Python API)."""
        if not isinstance(parallel, int) or parallel < 1:
            raise ValueError(f"parallel must be a positive int, got {parallel!r}")
        if not isinstance(queue, int) or queue < 0:
            raise ValueError(f"queue must be an int >= 0, got {queue!r}")
        if not isinstance(prefill_chunk, int) or prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be an int >= 0 (0: no chunking), got {prefill_chunk!r}")
        self.engine, self.parallel, self.queue_limit = engine, parallel, queue
        self.prefill_chunk = prefill_chunk
        self.share = engine.pool.llm.n_ctx // parallel  # KV positions each running request is guaranteed
        self._waiting: collections.deque[Handle] = collections.deque()
        self._running: list[_Job] = []
        self._admitting: _Admission | None = None
        self._room_wait = False  # the next request did not fit beside the running ones: wait for one to finish
        self._cv = threading.Condition()
        self._accepting = True
        self._stop = False
        self.stats = collections.Counter()  # admitted, finished, cancelled, timeouts, errors, steps, cached_positions...
        self._turn = threading.Lock()  # one turn of the loop at a time (callers' threads when there is no loop thread)
        self._thread: threading.Thread | None = None
        if thread:
            self._thread = threading.Thread(target=self._loop, name="sqllava-edge-scheduler", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------------------------------------------------
    # Public

    def submit(self, request: Request) -> Handle:
        """Queue a request; raises QueueFullError / ShuttingDownError instead of waiting."""
        if request.sequences > self.engine.pool.capacity:
            raise ValueError(f"{len(request.seeds)} choices need {request.sequences} KV sequences but the engine keeps "
                             f"{self.engine.pool.capacity}; ask for fewer choices")
        handle = Handle(request, self)
        with self._cv:
            if not self._accepting:
                raise ShuttingDownError("the server is shutting down")
            if len(self._waiting) >= self.queue_limit + max(0, self.parallel - self.running):
                raise QueueFullError(f"{len(self._waiting)} requests are waiting and {self.running} running "
                                     f"(--parallel {self.parallel}, --queue {self.queue_limit}); retry later")
            self._waiting.append(handle)
            self._cv.notify_all()
        return handle

    def events(self, request: Request) -> Iterator[Event]:
        """Submit `request` and yield its events as they come, up to its last ("done" or "error"). Without a loop
        thread, the caller's thread turns the loop (every running request advances, not only this one). Closing the
        iterator early cancels the request and frees its sequences."""
        box: collections.deque[Event] = collections.deque()
        arrived = threading.Event()

        def on_event(event: Event) -> None:
            box.append(event)
            arrived.set()

        request.on_event = on_event
        handle = self.submit(request)
        try:
            while True:
                while not box:
                    if self._thread is None:
                        if not self._turn_once():
                            time.sleep(0.001)  # waiting for sequences another loop on this engine holds
                    else:
                        arrived.wait(0.1)
                        arrived.clear()
                event = box.popleft()
                yield event
                if event.kind in ("done", "error"):
                    return
        finally:
            if not handle.finished.is_set():
                handle.cancel()
                while self._thread is None and not handle.finished.is_set():
                    self._turn_once()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests decoding, and the one being prefilled."""
        return len(self._running) + (self._admitting is not None)

    @property
    def busy_slots(self) -> int:
        return sum(len(job.active) for job in self._running)

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Stop accepting, let queued and running requests finish for up to `timeout` s, cancel the rest, stop the
        thread. True if everything finished in time."""
        with self._cv:
            self._accepting = False
            self._cv.notify_all()
        deadline = time.monotonic() + timeout
        while (self._waiting or self.running) and time.monotonic() < deadline:
            if self._thread is None:
                self._turn_once()
            else:
                time.sleep(0.02)
        clean = not (self._waiting or self.running)
        with self._cv:
            admitting = [self._admitting.handle] if self._admitting else []
            for handle in list(self._waiting) + [job.handle for job in self._running] + admitting:
                handle.cancelled = True
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        return clean

    # ------------------------------------------------------------------------------------------------------------
    # The loop

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self.running or self._stop):
                    self._cv.wait(timeout=1.0)
                if self._stop and not self.running:
                    for handle in self._waiting:
                        self._emit(handle, Event("error", error=ShuttingDownError("the server is shutting down")))
                        handle.finished.set()
                    self._waiting.clear()
                    return
            if not self._turn_once():
                time.sleep(0.005)  # a request waits for KV room that nothing running will free: rare

    def _turn_once(self) -> bool:
        """One turn of the loop: reap, move an admission forward, one decode step. -> whether any work was done."""
        with self._turn:
            try:
                self._reap()
                worked = self._admit()
                if self._running:
                    self._step()
                    return True
                return worked
            except Exception as exc:  # a backend failure: fail what is running, keep serving
                for job in self._running:
                    self._end_job(job, Event("error", error=exc))
                self._running.clear()
                if self._admitting is not None:
                    self._fail_admission(exc)
                return True

    def _reap(self) -> None:
        """Cancelled and timed-out requests leave the queue and free their sequences."""
        now = time.monotonic()
        with self._cv:
            for handle in list(self._waiting):
                reason = _ended(handle, now)
                if reason:
                    self._waiting.remove(handle)
                    self.stats[reason] += 1
                    self._emit(handle, Event("finish", reason=reason))
                    self._emit(handle, Event("done", usage={"prompt_tokens": 0, "completion_tokens": 0}))
                    handle.finished.set()
        admission = self._admitting
        if admission is not None:
            reason = _ended(admission.handle, now)
            if reason:
                with self.engine.lock:
                    admission.abort(self.engine)
                self._admitting = None
                self.stats[reason] += 1
                self._emit(admission.handle, Event("finish", reason=reason))
                self._emit(admission.handle, Event("done", usage={"prompt_tokens": 0, "completion_tokens": 0}))
                admission.handle.finished.set()
        for job in list(self._running):
            reason = _ended(job.handle, now)
            if reason:
                self.stats[reason] += 1
                for choice in job.active:
                    self._finish(job, choice, reason)
                self._retire(job)

    def _admit(self) -> bool:
        """Move the next request's admission forward: take it from the queue when a slot and enough sequences are
        free, then run one piece of its prefill, or all of it when nothing else is running or chunking is off.
        When it is in, it joins the running requests. True if any work was done."""
        engine, pool = self.engine, self.engine.pool
        if self._admitting is None:
            with self._cv:
                if not self._waiting or len(self._running) >= self.parallel or (
                        self._room_wait and self._running):
                    return False
                handle = self._waiting[0]
            with engine.lock:
                if pool.capacity - len(pool.busy) < handle.request.sequences:
                    return False  # wait for running requests to free sequences
            with self._cv:
                self._waiting.popleft()
            self._admitting = _Admission(handle)
        admission = self._admitting
        chunk = self.prefill_chunk or None
        try:
            while True:
                with engine.lock:
                    started = time.perf_counter()
                    try:
                        finished = admission.step(engine, chunk)
                    finally:
                        self.stats["prefill_seconds"] += time.perf_counter() - started
                if finished or (self._running and chunk):
                    break
        except PromptTooLongError as exc:
            if admission.current <= pool.max_positions and self._running:
                # the room is held by running requests: start over, at once if a request over its guaranteed share
                # gave its room back, else when one of them finishes
                with engine.lock:
                    admission.abort(engine)
                    within_share = admission.current <= self.share and self._stop_over_share() is not None
                self._admitting = None
                self._room_wait = not within_share
                with self._cv:
                    self._waiting.appendleft(admission.handle)
                return True
            self._fail_admission(exc)
            return True
        except Exception as exc:  # this request's fault (a bad image, a prompt too long): fail it, keep serving
            self._fail_admission(exc)
            return True
        if finished:
            self._start_job(admission)
        return True

    def _start_job(self, admission: _Admission) -> None:
        engine, request = self.engine, admission.request
        seqs, logits = admission.seqs, admission.logits
        if len(request.prompts) == 1 and len(request.seeds) > 1:
            with engine.lock:
                root = seqs[0]
                seqs = [engine.pool.fork(root) for _ in request.seeds]
                logits = logits * len(seqs)
                engine.pool.done(root)
        self._admitting = None
        config = request.config
        choices = [_Choice(i, seq, seq_logits, Sampler(config, seed), TextStream(engine.tokenizer, config.stop))
                   for i, (seq, seq_logits, seed) in enumerate(zip(seqs, logits, request.seeds))]
        job = _Job(admission.handle, choices, admission.need)
        self._running.append(job)
        self.stats["admitted"] += 1
        self.stats["cached_positions"] += admission.cached
        self.stats["prompt_positions"] += admission.need
        self._emit(admission.handle, Event("start", usage={"prompt_tokens": admission.need,
                                                            "cached_tokens": admission.cached}))

    def _fail_admission(self, exc: BaseException) -> None:
        admission, self._admitting = self._admitting, None
        try:
            with self.engine.lock:
                admission.abort(self.engine)
        except Exception:  # the backend already failed; the pool is reset by the next reset()
            pass
        self.stats["errors"] += 1
        self._emit(admission.handle, Event("error", error=exc))
        admission.handle.finished.set()

    def _step(self) -> None:
        """Sample one token for every running choice, then decode all that continue in one batched call."""
        engine, eos = self.engine, self.engine.eos_id
        feed: dict[int, tuple[_Job, _Choice, int]] = {}  # seq -> (job, choice, token to feed)
        for job in list(self._running):
            for choice in job.active:
                try:
                    token = choice.sampler(choice.logits)
                except Exception as exc:  # this request's schema constraint failed: end it, keep the others
                    for other in job.choices:
                        feed.pop(other.seq, None)
                    self._end_job(job, Event("error", error=exc))
                    self._running.remove(job)
                    break
                if token == eos:
                    self._finish(job, choice, "stop")
                    continue
                choice.count += 1
                piece = choice.text.push(token)
                if job.handle.first_token is None:
                    job.handle.first_token = time.monotonic()
                self._emit(job.handle, Event("token", choice.index, piece, token,
                                             logprobs=choice.sampler.last_logprobs))
                if choice.text.stopped:
                    self._finish(job, choice, "stop")
                elif choice.count >= job.handle.request.config.max_new_tokens:
                    self._finish(job, choice, "length")
                else:
                    feed[choice.seq] = (job, choice, token)
        if feed:
            with engine.lock:
                fitted = self._fit({seq: token for seq, (_, _, token) in feed.items()}, feed)
                started = time.perf_counter()
                out = engine.pool.decode(fitted) if fitted else {}
                self.stats["decode_seconds"] += time.perf_counter() - started
                self.stats["decode_tokens"] += len(fitted)
            self.stats["steps"] += 1
            for seq, logits in out.items():
                feed[seq][1].logits = logits
        for job in list(self._running):
            if not job.active:
                self._retire(job)

    # ------------------------------------------------------------------------------------------------------------
    # KV policy: every running request is guaranteed `share` = n_ctx // parallel positions (the cells its choices
    # hold: its prompt(s), a prefix they share counted once, and all their tokens). It may grow beyond that while the
    # cache has room; when a decode step does not fit, the request furthest over its share stops ("length"), then a
    # prompt being admitted is put back in the queue. A request within its share never stops early: `parallel`
    # requests within their shares fit in n_ctx by construction.

    def _fit(self, tokens: dict[int, int], feed: dict) -> dict[int, int]:
        """The part of a decode step that continues (caller holds engine.lock); stops the choices that cannot."""
        pool = self.engine.pool
        for seq in [seq for seq in tokens if pool.llm.length(seq) >= pool.max_positions]:
            del tokens[seq]  # the model's own context is full
            self._finish(feed[seq][0], feed[seq][1], "length")
        while tokens and not pool.room_for(len(tokens), set(tokens)):
            stopped = self._stop_over_share()
            if stopped:
                for seq in stopped:
                    tokens.pop(seq, None)
            elif self._admitting is not None:  # its prompt took the room: it starts over when a request finishes
                admission, self._admitting = self._admitting, None
                admission.abort(self.engine)
                self._room_wait = True
                with self._cv:
                    self._waiting.appendleft(admission.handle)
            else:  # not reachable while the shares add up to n_ctx; kept so a step never overflows the cache
                seq = max(tokens)
                del tokens[seq]
                self._finish(feed[seq][0], feed[seq][1], "length")
        return tokens

    def _stop_over_share(self) -> set[int] | None:
        """Stop ("length") the running request furthest over its share -> its sequences (None: none is over)."""
        pool = self.engine.pool
        used = {job: job.used(pool) for job in self._running if job.active}
        over = [job for job, cells in used.items() if cells > self.share]
        if not over:
            return None
        job = max(over, key=lambda j: used[j])
        seqs = {choice.seq for choice in job.active}
        for choice in job.active:
            self._finish(job, choice, "length")
        self.stats["over_share_stops"] += 1
        return seqs

    # ------------------------------------------------------------------------------------------------------------
    # Bookkeeping

    def _finish(self, job: _Job, choice: _Choice, reason: str) -> None:
        choice.done = True
        tail = choice.text.finish()
        if tail:
            self._emit(job.handle, Event("token", choice.index, tail))
        with self.engine.lock:
            self.engine.pool.done(choice.seq, drop=job.handle.request.drop_after or len(job.choices) > 1)
        self._emit(job.handle, Event("finish", choice.index, reason=reason))

    def _retire(self, job: _Job) -> None:
        if job in self._running:
            self._running.remove(job)
        self._room_wait = False
        self.stats["finished"] += 1
        completion = sum(c.count for c in job.choices)
        self._emit(job.handle, Event("done", usage={"prompt_tokens": job.prompt, "completion_tokens": completion}))
        job.handle.finished.set()
        self._wake()

    def _end_job(self, job: _Job, event: Event) -> None:
        for choice in job.active:
            choice.done = True
            with self.engine.lock:
                try:
                    self.engine.pool.done(choice.seq, drop=True)
                except Exception:  # the backend already failed; the pool is reset by the next reset()
                    pass
        self.stats["errors"] += 1
        self._emit(job.handle, event)
        job.handle.finished.set()

    @staticmethod
    def _emit(handle: Handle, event: Event) -> None:
        try:
            handle.request.on_event(event)
        except Exception:  # a broken listener must not stop the loop; the request is cancelled instead
            handle.cancelled = True


def _ended(handle: Handle, now: float) -> str:
    if handle.cancelled:
        return "cancelled"
    timeout = handle.request.timeout
    if timeout is not None and now - handle.submitted > timeout:
        return "timeout"
    return ""
