"""Chunked prefill: SequencePool.begin / Prefill.step on a recording fake backend (what is written, in what order,
what is counted and rolled back), and the scheduler interleaving a new request's prefill with the decode steps of
the requests already running, on the tiny bundle (llama.cpp f32: the chunked prompt gives the same tokens)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from runtimes.sequences import ImageRef, SequencePool, prompt_items
from sqllava_edge.config import IMAGE_TOKEN_INDEX
from sqllava_edge.errors import PromptTooLongError
from tests.fake_llm import FakeLLM


class RowLLM(FakeLLM):
    """FakeLLM that keeps an image row's first value (so the tests see which rows went in, in what order) and every
    prefill call's size; logits are a function of the content, so equal content gives equal logits."""

    vocab_size = 16

    def __init__(self, n_ctx: int):
        super().__init__(n_ctx)
        self.calls = []

    def _logits(self, seq):
        rows = self.seqs[seq]
        rng = np.random.default_rng(int(sum((i + 1) * v for i, v in enumerate(rows)) * 1000) % 2**32)
        return rng.normal(size=self.vocab_size).astype(np.float32)

    def prefill(self, seq, tokens=None, embeds=None):
        rows = [float(t) for t in tokens] if tokens is not None else [float(r) for r in embeds[:, 0]]
        self.calls.append((seq, len(rows)))
        self.seqs.setdefault(seq, []).extend(rows)
        return self._logits(seq)


def image(key: str, rows: int, base: float) -> ImageRef:
    embeds = np.zeros((rows, 4), np.float32)
    embeds[:, 0] = base + np.arange(rows)  # row i carries base + i
    return ImageRef(key, embeds)


IMG = image("img-a", 8, 1000.0)
PROMPT = prompt_items([1, 5, IMAGE_TOKEN_INDEX, 6, 7], [IMG])
ROWS = [1.0, 5.0] + [1000.0 + i for i in range(8)] + [6.0, 7.0]


def run(task) -> int:
    """Step a Prefill to the end -> the number of steps that returned False."""
    pauses = 0
    while not task.step():
        pauses += 1
    return pauses


def test_chunked_prefill_writes_the_same_rows_in_pieces_of_at_most_chunk():
    llm = RowLLM(100)
    pool = SequencePool(llm, 4)
    task = pool.begin(PROMPT, chunk=3)
    assert run(task) == 4  # text [1, 5], image 3 + 3 + 2, text [6, 7]: five backend calls, four pauses between
    assert [n for _, n in llm.calls] == [2, 3, 3, 2, 2]
    assert llm.seqs[task.seq] == ROWS and pool.content[task.seq] == PROMPT and task.seq in pool.busy
    whole = RowLLM(100)
    seq, logits = SequencePool(whole, 4).prefill(PROMPT)
    assert [n for _, n in whole.calls] == [2, 8, 2]  # without chunk: one call per text run and per image
    assert np.array_equal(task.logits, logits) and task.reused == 0 and task.positions == 12


def test_chunk_must_be_positive():
    pool = SequencePool(RowLLM(100), 2)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="chunk"):
            pool.begin(PROMPT, chunk=bad)


def test_partly_written_rows_count_against_the_context_between_steps():
    llm = RowLLM(100)
    pool = SequencePool(llm, 4)
    task = pool.begin(PROMPT, chunk=3)
    task.step()  # text [1, 5]
    task.step()  # 3 image rows: not yet an item of the sequence's content
    assert pool.content[task.seq] == [1, 5] and llm.length(task.seq) == 5
    assert pool.cells_used() == 5


def test_a_copy_from_a_sequence_mid_image_takes_only_its_whole_items():
    llm = RowLLM(100)
    pool = SequencePool(llm, 4)
    task = pool.begin(PROMPT, chunk=3)
    task.step()
    task.step()  # the first sequence holds [1, 5] + 3 of the image's 8 rows
    other = prompt_items([1, 5, 9, 9], [])  # shares [1, 5] with it
    seq, _ = pool.prefill(other)
    assert seq != task.seq and llm.seqs[seq] == [1.0, 5.0, 9.0, 9.0], "half an image leaked into the copy"
    pool.done(seq)
    run(task)
    assert llm.seqs[task.seq] == ROWS


def test_cancel_rolls_back_to_the_whole_items_and_frees_the_sequence():
    llm = RowLLM(100)
    pool = SequencePool(llm, 4)
    task = pool.begin(PROMPT, chunk=3)
    for _ in range(3):
        task.step()  # text, then 3 + 3 image rows
    task.cancel()
    assert llm.seqs[task.seq] == [1.0, 5.0] and pool.content[task.seq] == [1, 5]
    assert task.seq not in pool.busy and pool.cells_used() == 2
    assert task.step() is True and task.logits is None  # a cancelled task does nothing more
    again = pool.begin(PROMPT)  # the text before the image is still reusable
    assert again.seq == task.seq and again.reused == 2
    run(again)
    assert llm.seqs[again.seq] == ROWS


def test_cancel_before_the_first_step_frees_the_sequence():
    pool = SequencePool(RowLLM(100), 4)
    task = pool.begin(PROMPT, chunk=3)
    task.cancel()
    assert task.seq not in pool.busy and pool.cells_used() == 0


def test_room_taken_between_steps_fails_the_prefill_cleanly():
    llm = RowLLM(20)
    pool = SequencePool(llm, 4)
    task = pool.begin(PROMPT, chunk=3)  # 12 positions; room made for all of them now
    task.step()
    task.step()
    other, _ = pool.prefill(list(range(20, 34)))  # 14 busy positions: 5 + 14 in use, 3 more rows do not fit
    with pytest.raises(PromptTooLongError, match="took the room"):
        run(task)
    assert llm.seqs[task.seq] == [1.0, 5.0] and task.seq not in pool.busy and other in pool.busy
    assert pool.cells_used() == 2 + 14


def test_an_exact_repeat_is_done_at_once():
    llm = RowLLM(100)
    pool = SequencePool(llm, 4)
    seq, logits = pool.prefill(PROMPT)
    pool.done(seq)
    calls = len(llm.calls)
    task = pool.begin(PROMPT, chunk=3)
    assert task.done and task.step() and task.reused == 12 and np.array_equal(task.logits, logits)
    assert len(llm.calls) == calls


# --------------------------------------------------------------------------------------------------------------------
# The scheduler on the tiny bundle


@pytest.fixture(scope="module")
def assistant(tiny_bundle):
    from sqllava_edge.assistant import Assistant
    from tests.serve_helpers import THREADS

    a = Assistant.load(tiny_bundle, vision_precision="fp32", n_threads=THREADS, n_ctx=2048, sequences=8)
    yield a
    a.close()


def prompt_ids(question: list[int]) -> list[int]:
    return [1, 319, 13563, IMAGE_TOKEN_INDEX, 13, *question]


def run_pair(assistant, chunk: int):
    """Request A decodes 48 tokens; once it has produced 2, request B (a new image, 64 rows) arrives. -> the order of
    events (("A", "token") ... ("B", "start") ...), B's tokens and A's tokens."""
    from runtimes.scheduler import Request, Scheduler
    from sqllava_edge.generation import GenerationConfig
    from tests.serve_helpers import image

    assistant.engine.reset()
    scheduler = Scheduler(assistant.engine, parallel=2, prefill_chunk=chunk)
    log, tokens, lock = [], {"A": [], "B": []}, threading.Lock()
    a_started = threading.Event()

    def listener(name):
        def on_event(event):
            with lock:
                log.append((name, event.kind))
                if event.kind == "token" and event.token >= 0:
                    tokens[name].append(event.token)
                if name == "A" and len(tokens["A"]) == 2:
                    a_started.set()
        return on_event

    config = GenerationConfig(max_new_tokens=48)
    try:
        a = scheduler.submit(Request(prompt_ids(list(range(400, 420))), image(1), config, on_event=listener("A")))
        assert a_started.wait(60), "request A produced no tokens"
        b = scheduler.submit(Request(prompt_ids(list(range(500, 540))), image(2), GenerationConfig(max_new_tokens=8),
                                     on_event=listener("B")))
        assert a.finished.wait(120) and b.finished.wait(120)
    finally:
        scheduler.shutdown()
    return log, tokens


def a_tokens_during_b_prefill(log) -> int:
    """A's tokens after its 2nd (when B was submitted) and before B's "start" (the end of B's prefill)."""
    a_tokens = [i for i, (name, kind) in enumerate(log) if name == "A" and kind == "token"]
    b_start = log.index(("B", "start"))
    return sum(1 for i in a_tokens[2:] if i < b_start)


def test_running_streams_keep_decoding_while_a_new_prompt_prefills(assistant):
    chunked_log, chunked = run_pair(assistant, chunk=16)
    whole_log, whole = run_pair(assistant, chunk=0)
    assert ("A", "error") not in chunked_log + whole_log and ("B", "error") not in chunked_log + whole_log
    assert len(chunked["A"]) == len(whole["A"]) == 48, "A stopped early: the test needs it decoding throughout"
    # B's prompt: 5 + 40 text positions and 64 image rows = pieces of 16: the encode, 1 + 4 + 3 prefill calls
    assert a_tokens_during_b_prefill(chunked_log) >= 6, chunked_log
    assert a_tokens_during_b_prefill(whole_log) <= 1, whole_log
    # the pieces compute what the whole prompt does (llama.cpp f32): same tokens for both requests
    assert chunked["B"] == whole["B"] and chunked["A"] == whole["A"]


def test_cancelling_a_request_mid_prefill_frees_its_sequence(assistant):
    from runtimes.scheduler import Request, Scheduler
    from sqllava_edge.generation import GenerationConfig
    from tests.serve_helpers import image

    assistant.engine.reset()
    scheduler = Scheduler(assistant.engine, parallel=2, prefill_chunk=8)
    events = {"A": [], "B": []}
    a_going = threading.Event()
    handles = {}

    def on_a(event):
        events["A"].append(event.kind)
        if event.kind == "token":
            a_going.set()

    def on_b(event):
        events["B"].append(event.kind)

    try:
        handles["A"] = scheduler.submit(Request(prompt_ids([400, 401]), image(3), GenerationConfig(max_new_tokens=40),
                                                on_event=on_a))
        assert a_going.wait(60)
        handles["B"] = scheduler.submit(Request(prompt_ids(list(range(500, 560))), image(4),
                                                GenerationConfig(max_new_tokens=8), on_event=on_b))
        while scheduler._admitting is None and not handles["B"].finished.is_set():
            threading.Event().wait(0.001)
        handles["B"].cancel()
        assert handles["B"].finished.wait(60) and handles["A"].finished.wait(120)
    finally:
        scheduler.shutdown()
    assert events["B"][-2:] == ["finish", "done"] and "start" not in events["B"], events["B"]
    assert scheduler.stats["cancelled"] == 1 and not assistant.engine.pool.busy
    assert assistant.engine.pool._pending == {}


def test_a_reset_between_steps_stops_the_prefill_with_a_clear_error():
    llm = RowLLM(100)
    pool = SequencePool(llm, 4)
    task = pool.begin(PROMPT, chunk=3)
    task.step()
    task.step()
    pool.reset()
    with pytest.raises(RuntimeError, match="reset while this prompt was being prefilled"):
        task.step()
    assert not pool.busy and pool.cells_used() == 0 and all(not rows for rows in llm.seqs.values())
    task.cancel()  # what a caller's cleanup does next: nothing left to undo
    assert not pool.busy and pool.cells_used() == 0


def test_a_reset_drops_the_rows_of_a_half_written_first_item():
    llm = RowLLM(100)
    pool = SequencePool(llm, 4)
    task = pool.begin([ImageRef("img-b", IMG.embeds), 3], chunk=3)  # the image is the first item
    task.step()
    assert llm.length(task.seq) == 3 and pool.content[task.seq] == []
    pool.reset()
    assert llm.length(task.seq) == 0 and pool.cells_used() == 0


def test_a_prefill_dropped_after_a_reset_never_touches_the_sequence_again():
    import gc

    llm = RowLLM(100)
    pool = SequencePool(llm, 4)
    task = pool.begin(PROMPT, chunk=3)
    task.step()
    task.step()  # suspended between two pieces of the image
    pool.reset()
    other, _ = pool.prefill([40, 41, 42])  # the reset freed task.seq; this prompt may take it
    del task
    gc.collect()  # closing the abandoned generator must not roll back (free, truncate) the new owner's sequence
    assert other in pool.busy and llm.seqs[other] == [40.0, 41.0, 42.0] and pool.cells_used() == 3
