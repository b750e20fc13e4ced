"""What the front doors ask of a model, written once: an answer, its text pieces or token ids, and the
self-questioning plan (describe the image, sample the model's own questions, answer them).

Everything runs as `runtimes.scheduler.Request`s on a Scheduler: `Assistant` passes its thread-less scheduler and
gets the results back directly; the server runs the same plan (`self_questioning`) one request at a time on its own
scheduler from its event loop. A plan is a generator: it yields a `Job` (prompt ids, generation config, seeds) and is
sent back the texts of that job's choices; its return value is the result. `run_plan` drives one synchronously.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterator

from runtimes.engine import Engine
from runtimes.scheduler import Request, Scheduler
from sqllava_edge.generation import TASK_DEFAULTS, GenerationConfig


@dataclass(frozen=True)
class Job:
    """One scheduler request of a plan: `prompts` holds one id list (continued by len(seeds) choices forked from one
    prefill) or several (one choice each, decoded together)."""

    prompts: list[list[int]]
    config: GenerationConfig
    seeds: tuple[int | None, ...]

    def request(self, image, timeout: float | None = None) -> Request:
        ids = self.prompts[0] if len(self.prompts) == 1 else self.prompts
        return Request(ids, image, self.config, self.seeds, timeout=timeout)


@dataclass(frozen=True)
class SelfQuestioning:
    description: str
    questions: list[str]
    seed: int
    answers: list[str] | None = None  # with answers requested: answers[i] answers questions[i]


Plan = Generator[Job, list[str], Any]


def self_questioning(engine: Engine, key: str, template: str, n: int, seed: int, questions: GenerationConfig, *,
                     description: str | None = None, answers: GenerationConfig | None = None) -> Plan:
    """Visual self-questioning about the image cached under `key` (docs/spec.md 5.1): its greedy description (the
    engine's, computed once per cached image, unless `description` is given), then n sampled VUSER questions
    continuing `... ASSISTANT: {description}</s>VUSER:` (question i with seed + i; forks of one prefill, at most pool
    capacity - 1 at a time), then, when `answers` is given, the greedy answer to each question continuing
    `... VUSER: {q}</s> ASSISTANT:` (docs/spec.md 3.3), up to pool capacity of them decoded together."""
    from sqllava_edge.conversation import describe_prompt, interview_prompt, self_question_prompt

    tok, per = engine.tokenizer, engine.pool.capacity - 1
    if description is None:
        description = engine.description(key)
        if description is None:
            (description,) = yield Job([describe_prompt(tok, template)], TASK_DEFAULTS["describe"], (None,))
            engine.remember_description(key, description)
    prompt = self_question_prompt(tok, description, template)
    asked: list[str] = []
    while len(asked) < n:
        count = min(n - len(asked), per)
        asked += yield Job([prompt], questions, tuple(seed + len(asked) + i for i in range(count)))
    if answers is None:
        return SelfQuestioning(description, asked, seed)
    prompts = [interview_prompt(tok, description, q, template) for q in asked]
    said: list[str] = []
    for start in range(0, len(prompts), per + 1):  # separate prompts need no shared root: a sequence each
        group = prompts[start:start + per + 1]
        said += yield Job(group, answers, (None,) * len(group))
    return SelfQuestioning(description, asked, seed, said)


def advance(plan: Plan, texts: list[str] | None = None) -> tuple[Job | None, Any]:
    """One move of a plan: (its next job, None), or (None, its result) once it is done. `texts`: the results of the
    job it yielded last (None to start it)."""
    try:
        return (next(plan) if texts is None else plan.send(texts)), None
    except StopIteration as done:
        return None, done.value


def run_plan(plan: Plan, execute: Callable[[Job], list[str]]) -> Any:
    """Drive `plan` to its result, running each of its jobs with `execute` (job -> texts of its choices)."""
    job, result = advance(plan)
    while job is not None:
        job, result = advance(plan, execute(job))
    return result


# ----------------------------------------------------------------------------------------------------------------
# Requests run on the caller's thread (the scheduler's `events`)


def pieces(scheduler: Scheduler, request: Request,
           on_finish: Callable[[list[int], str], None] | None = None) -> Iterator[str]:
    """Text pieces of a one-choice request as they are generated; `on_finish(tokens, text)` after the last one.
    An error of the request is raised here, as the exception it was."""
    tokens: list[int] = []
    text: list[str] = []
    for event in scheduler.events(request):
        if event.kind == "token":
            if event.token >= 0:
                tokens.append(event.token)
            if event.text:
                text.append(event.text)
                yield event.text
        elif event.kind == "error":
            raise event.error
    if on_finish is not None:
        on_finish(tokens, "".join(text))


def tokens(scheduler: Scheduler, request: Request) -> Iterator[int]:
    """Token ids of a one-choice request as they are generated (EOS excluded)."""
    for event in scheduler.events(request):
        if event.kind == "token" and event.token >= 0:
            yield event.token
        elif event.kind == "error":
            raise event.error


def texts(scheduler: Scheduler, request: Request) -> list[str]:
    """The text of every choice of a request, in choice order."""
    out: dict[int, list[str]] = {i: [] for i in range(len(request.seeds))}
    for event in scheduler.events(request):
        if event.kind == "token":
            out[event.choice].append(event.text)
        elif event.kind == "error":
            raise event.error
    return ["".join(out[i]) for i in range(len(out))]


def run_jobs(scheduler: Scheduler, image) -> Callable[[Job], list[str]]:
    """`run_plan`'s executor for jobs about one image, on the caller's thread."""
    return lambda job: texts(scheduler, job.request(image))


def llm_scheduler(llm, tokenizer, config, sequences: int = 2) -> Scheduler:
    """A thread-less scheduler on an LLM backend alone: its requests carry their image as embeddings (an ImageRef),
    as a comparison of LLM backends on the same image tokens needs. The backend stays the caller's to close."""
    engine = Engine(None, llm, tokenizer, config, image_mode=config.image_aspect_ratio, sequences=sequences)
    return Scheduler(engine, parallel=1, prefill_chunk=0, thread=False)
