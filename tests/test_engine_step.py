"""One engine step for every front door: the scheduler's step runs `Assistant` (a scheduler without a thread, turned by
the caller) and the server (a scheduler on its own thread); the self-questioning plan (runtimes.tasks) and the
description cache (on the engine) are shared by both."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from runtimes.engine import Engine
from runtimes.scheduler import Request, Scheduler
from runtimes.tasks import Job, run_plan, self_questioning, texts
from sqllava_edge.config import get_preset
from sqllava_edge.generation import GenerationConfig
from tests.fake_llm import FakeLLM

CONFIG = get_preset("tiny")


class _LLM(FakeLLM):
    vocab_size = CONFIG.llm.vocab_size


class _Tokenizer:
    vocab_size = CONFIG.llm.vocab_size

    @staticmethod
    def decode(ids):
        return "".join(f"<{i}>" for i in ids)


def fake_engine(n_ctx: int = 200, sequences: int = 4, tokenizer=None) -> Engine:
    return Engine(None, _LLM(n_ctx), tokenizer or _Tokenizer(), CONFIG, image_mode="pad", sequences=sequences)


def test_forks_decode_in_one_batched_step_per_token_and_stop_at_max():
    engine = fake_engine()
    scheduler = Scheduler(engine, parallel=1, prefill_chunk=0, thread=False)
    config = GenerationConfig(max_new_tokens=5, temperature=1.0)
    got = texts(scheduler, Request([1, 2, 3], None, config, seeds=[1, 2, 3]))
    assert [t.count("<") for t in got] == [5, 5, 5] and len(set(got)) == 3
    assert engine.llm.counters.decode_steps == 4  # 3 sequences together; the 5th token is not fed
    assert engine.pool.cells_used() == 3 and not engine.pool.busy  # sampled forks dropped, the prompt kept


def test_a_thread_less_scheduler_gives_the_threaded_ones_tokens():
    config = GenerationConfig(max_new_tokens=6, temperature=0.9)
    requests = [([5, 6, 7], [11]), ([5, 6, 8, 9], [12, 13])]
    results = []
    for thread in (False, True):
        scheduler = Scheduler(fake_engine(), parallel=2, prefill_chunk=0, thread=thread)
        try:
            results.append([texts(scheduler, Request(ids, None, config, seeds=seeds)) for ids, seeds in requests])
        finally:
            scheduler.shutdown(timeout=5)
    assert results[0] == results[1]


def test_closing_the_events_early_cancels_the_request_and_frees_its_sequences():
    engine = fake_engine()
    scheduler = Scheduler(engine, parallel=1, prefill_chunk=0, thread=False)
    events = scheduler.events(Request([1, 2, 3], None, GenerationConfig(max_new_tokens=50)))
    kinds = [next(events).kind for _ in range(3)]
    assert kinds == ["start", "token", "token"] and engine.pool.busy
    events.close()
    assert not engine.pool.busy and scheduler.running == 0 and scheduler.stats["cancelled"] == 1


def test_callers_on_two_threads_share_one_thread_less_scheduler():
    engine = fake_engine()
    scheduler = Scheduler(engine, parallel=1, queue=8, prefill_chunk=0, thread=False)
    config = GenerationConfig(max_new_tokens=20)
    alone = texts(Scheduler(fake_engine(), parallel=1, prefill_chunk=0, thread=False), Request([4, 4], None, config))
    out, errors = {}, []

    def ask(name):
        try:
            out[name] = texts(scheduler, Request([4, 4], None, config))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and out == {0: alone, 1: alone}


def test_a_request_error_is_raised_to_the_caller_as_it_was():
    scheduler = Scheduler(fake_engine(n_ctx=10), parallel=1, prefill_chunk=0, thread=False)
    from sqllava_edge.errors import PromptTooLongError

    with pytest.raises(PromptTooLongError):
        texts(scheduler, Request(list(range(3, 40)), None, GenerationConfig(max_new_tokens=2)))
    assert scheduler.stats["errors"] == 1


def test_several_prompts_can_each_have_their_own_image():
    with pytest.raises(ValueError, match="2 prompts need 2 images"):
        Request([[1], [2]], ["a", "b", "c"], GenerationConfig(), [None, None])
    request = Request([[1], [2]], ["a", "b"], GenerationConfig(), [None, None])
    assert request.images == ["a", "b"] and request.sequences == 2
    assert Request([1], "a", GenerationConfig(), [1, 2, 3]).sequences == 4  # the shared prompt and 3 forks


class _Ref:
    key = "image-key"


def test_the_self_questioning_plan_describes_once_per_cached_image():
    from sqllava_edge.tokenizer import default_tokenizer

    engine = fake_engine(tokenizer=default_tokenizer())  # the plan's prompts are real template text
    engine._images["image-key"] = _Ref()  # cached: its description may be kept
    asked = []

    def execute(job: Job) -> list[str]:
        asked.append(job)
        return [f"text {len(asked)}.{i}" for i in range(len(job.seeds))]

    questions = GenerationConfig(temperature=1.0, max_new_tokens=4)
    first = run_plan(self_questioning(engine, "image-key", CONFIG.template, 5, 10, questions), execute)
    # describe, then 5 questions in rounds of capacity - 1 = 3 forks of the shared prompt
    assert [len(j.seeds) for j in asked] == [1, 3, 2] and asked[1].seeds == (10, 11, 12) and asked[2].seeds == (13, 14)
    assert first.description == "text 1.0" and engine.description("image-key") == "text 1.0"
    asked.clear()
    answers = GenerationConfig(max_new_tokens=3)
    second = run_plan(self_questioning(engine, "image-key", CONFIG.template, 2, 10, questions, answers=answers),
                      execute)
    assert [len(j.seeds) for j in asked] == [2, 2]  # no describe: the engine kept it; the answers in one batch
    assert second.description == "text 1.0" and len(second.answers) == 2 and asked[1].config is answers


def test_descriptions_are_kept_only_for_cached_images_and_leave_with_them():
    engine = fake_engine()
    engine.remember_description("not-cached", "text")
    assert engine.description("not-cached") is None
    engine._image_cache = 1
    engine._images["a"] = _Ref()
    engine.remember_description("a", "about a")
    assert engine.description("a") == "about a"
    from runtimes.sequences import ImageRef

    engine.vision = type("V", (), {"encode": staticmethod(
        lambda pixels: np.zeros((1, CONFIG.num_image_tokens, CONFIG.llm.hidden_size), np.float32))})()
    engine.image_ref(np.zeros((3, CONFIG.vision.image_size, CONFIG.vision.image_size), np.float32))  # evicts "a"
    assert engine.description("a") is None and isinstance(next(iter(engine._images.values())), ImageRef)


def test_a_call_made_while_a_stream_is_open_waits_for_it_without_deadlock():
    """A caller reading a stream asks something else in between (parallel 1): the second call turns the loop, which
    finishes the open stream first (its events wait for it), then answers; both give what they give alone."""
    config = GenerationConfig(max_new_tokens=8)
    alone = [texts(Scheduler(fake_engine(), parallel=1, prefill_chunk=0, thread=False), Request(ids, None, config))
             for ids in ([4, 5], [6, 7])]
    scheduler = Scheduler(fake_engine(), parallel=1, prefill_chunk=0, thread=False)
    events = scheduler.events(Request([4, 5], None, config))
    first = [next(events), next(events)]
    inner = texts(scheduler, Request([6, 7], None, config))
    rest = list(events)
    outer = "".join(e.text for e in first + rest if e.kind == "token")
    assert [[outer], inner] == alone and rest[-1].kind == "done"


def test_self_questions_keep_their_prompt_cached_for_the_next_call():
    """Sampled forks are dropped, but the shared prompt stays in the pool: asking again about the same image (n=1
    as well as n>1) prefills at most the prompt's last token again."""
    from runtimes.tasks import run_jobs
    from sqllava_edge.tokenizer import default_tokenizer

    engine = fake_engine(n_ctx=400, tokenizer=default_tokenizer())
    scheduler = Scheduler(engine, parallel=1, prefill_chunk=0, thread=False)
    config = GenerationConfig(temperature=1.0, max_new_tokens=3)
    from runtimes.sequences import ImageRef

    image = ImageRef("k", np.zeros((4, CONFIG.llm.hidden_size), np.float32))
    fresh = []
    for n in (1, 1, 3, 3):
        before = engine.llm.counters.prefill_tokens + engine.llm.counters.prefill_embeds
        run_plan(self_questioning(engine, "k", CONFIG.template, n, 5, config, description="A red square."),
                 run_jobs(scheduler, image))
        fresh.append(engine.llm.counters.prefill_tokens + engine.llm.counters.prefill_embeds - before)
    assert fresh[0] > 20 and max(fresh[1:]) <= 1, fresh  # at most the prompt's last token, for its logits
