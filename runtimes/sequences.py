"""Prefix reuse over an LLMBackend's sequences, and sampling several sequences in one batch.

A prompt is a list of items: token ids (int) and `ImageRef`s (the T embedding rows of one image, identified by the
image's content hash). `SequencePool` remembers which items each backend sequence holds, so a new prompt prefills
only what no sequence already has: a chat follow-up extends its own sequence; a new question about an image seen
before copies the shared system-prompt + image prefix from another sequence (fork + truncate) and prefills only its
own text. Sequences are reused least-recently-used first; `busy` ones (in use by the current call) are never taken.

Context budget: llama.cpp keeps every sequence in one unified KV cache of n_ctx cells, where a fork shares its
prefix cells with the source. The pool counts cells the same way (blocks of positions shared by forks) for every
backend, and evicts idle sequences before a prefill or decode would overflow n_ctx. So the KV cache never exceeds
the n_ctx the memory plan budgeted, for torch as for llama.cpp.
"""
from __future__ import annotations

import inspect
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np

from sqllava_edge.config import IMAGE_TOKEN_INDEX
from sqllava_edge.errors import PromptTooLongError


@dataclass(frozen=True)
class ImageRef:
    key: str  # content hash of the preprocessed pixels: equal keys mean equal embeddings
    embeds: np.ndarray = field(compare=False, repr=False)  # (T, H) float32

    @property
    def rows(self) -> int:
        return int(self.embeds.shape[0])


Item = int | ImageRef


def prompt_items(ids: Sequence[int], images: Sequence[ImageRef]) -> list[Item]:
    """Prompt ids with each IMAGE_TOKEN_INDEX replaced by the next ImageRef."""
    count = sum(1 for i in ids if i == IMAGE_TOKEN_INDEX)
    if count != len(images):
        raise ValueError(f"the prompt holds {count} image placeholder(s) but {len(images)} image(s) were given")
    pending = iter(images)
    return [next(pending) if i == IMAGE_TOKEN_INDEX else int(i) for i in ids]


def positions(items: Sequence[Item]) -> int:
    return sum(item.rows if isinstance(item, ImageRef) else 1 for item in items)


def _common_prefix(a: Sequence[Item], b: Sequence[Item]) -> int:
    """Number of leading items a and b share (an ImageRef matches only the same image)."""
    n = 0
    for x, y in zip(a, b):
        if type(x) is not type(y) or x != y:
            break
        n += 1
    return n


class SequencePool:
    def __init__(self, llm, capacity: int, max_positions: int | None = None):
        """max_positions: the most one sequence may hold (the model's trained context); n_ctx bounds all together."""
        if capacity < 2:
            raise ValueError(f"a sequence pool needs at least 2 sequences, got {capacity}")
        self.llm = llm
        self.capacity = capacity
        self.max_positions = min(llm.n_ctx, max_positions or llm.n_ctx)
        self.content: dict[int, list[Item]] = {seq: [] for seq in range(capacity)}
        self.busy: set[int] = set()
        self._logits: dict[int, np.ndarray] = {}  # logits after each sequence's last position
        self._clock = itertools.count(1)
        self._used: dict[int, int] = {seq: 0 for seq in range(capacity)}
        # KV cells: each sequence holds [block id, positions used] entries; forks share block ids.
        self._blocks: dict[int, list[list[int]]] = {seq: [] for seq in range(capacity)}
        self._refs: Counter[int] = Counter()
        self._block_ids = itertools.count()
        self._pending: dict[int, int] = {}  # seq -> positions of a partly prefilled item (a Prefill between steps)
        self._epoch = 0  # counts resets: a Prefill begun before a reset must not write into the emptied pool

    # ------------------------------------------------------------------------------------------------------------
    # Prefill with prefix reuse

    def prefill(self, items: Sequence[Item]) -> tuple[int, np.ndarray]:
        """Put `items` into a sequence, reusing the longest cached prefix; mark it busy. -> (seq, last logits)."""
        task = self.begin(items)
        while not task.step():
            pass
        return task.seq, task.logits

    def begin(self, items: Sequence[Item], chunk: int | None = None) -> "Prefill":
        """A prefill of `items` that runs one backend call per `step()`, so a caller can interleave other work
        (a scheduler's decode steps) between the pieces of a long prompt: each run of text tokens and each image is
        one call, cut into pieces of at most `chunk` positions when `chunk` is given. The sequence is chosen (and its
        reusable prefix kept) now and is busy from now on; `cancel()` (or an error) rolls back what was written."""
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk must be a positive number of positions or None, got {chunk!r}")
        items = list(items)
        if not items:
            raise ValueError("empty prompt")
        need = positions(items)
        if need > self.max_positions:
            raise PromptTooLongError(_too_long(items, need, self.max_positions))
        seq, keep = self._place(items)
        self.busy.add(seq)
        return Prefill(self, seq, items, keep, chunk)

    def _pieces(self, task: "Prefill") -> Iterator[None]:
        """The body of a Prefill: yields between backend calls; sets task.logits at the end."""
        seq, items, keep = task.seq, task.items, task.keep
        need = positions(items)
        try:
            self._truncate(seq, keep)
            if not self._make_room(need - positions(items[:keep]), {seq}):
                raise PromptTooLongError(_too_long(items, need, self.llm.n_ctx) + " (other calls in progress hold "
                                         f"{self.cells_used() - positions(items[:keep])} positions of it)")
            first = True
            for start, stop in _runs(items, keep):
                run = items[start:stop]
                image = run[0] if isinstance(run[0], ImageRef) else None
                rows = positions(run)
                step = min(task.chunk or rows, rows)
                for lo in range(0, rows, step):
                    n = min(step, rows - lo)
                    if not first:
                        yield  # the caller may run other sequences here; they may have used the room we made
                        if self._epoch != task.epoch:
                            raise RuntimeError("the sequence pool was reset while this prompt was being prefilled; "
                                               "send it again")
                        if not self._make_room(n, {seq}):
                            raise PromptTooLongError(
                                _too_long(items, need, self.llm.n_ctx) + " (other calls in progress took the room "
                                f"this prompt needed after {self._pending.get(seq, 0)} positions of a piece)")
                    first = False
                    if image is not None:
                        logits = self.llm.prefill(seq, embeds=image.embeds[lo:lo + n])
                    else:
                        logits = self.llm.prefill(seq, tokens=run[lo:lo + n])
                    self._pending[seq] = lo + n
                del self._pending[seq]
                self.content[seq].extend(run)
                self._add_cells(seq, rows)
        except BaseException:  # an error, or the task was cancelled (GeneratorExit)
            if self._epoch == task.epoch:  # after a reset nothing of ours is left, and seq may be someone else's
                self._rollback(seq)
            raise
        self._logits[seq] = logits
        task.logits = logits

    def _rollback(self, seq: int) -> None:
        """Drop a half-written prefill: the backend keeps what `content` says, the sequence is free again."""
        self._pending.pop(seq, None)
        self.busy.discard(seq)
        self._logits.pop(seq, None)
        self.llm.truncate(seq, positions(self.content[seq]))

    def _place(self, items: list[Item]) -> tuple[int, int]:
        """Choose the sequence for `items` -> (seq, items already in it)."""
        shared = {seq: _common_prefix(content, items) for seq, content in self.content.items()}
        extendable = [seq for seq in self.content if seq not in self.busy and self.content[seq]
                      and shared[seq] == len(self.content[seq]) and (seq in self._logits or shared[seq] < len(items))]
        if extendable:
            seq = max(extendable, key=lambda s: shared[s])
            self._touch(seq)
            return seq, shared[seq]
        target = self._free_seq()
        source = max(shared, key=lambda s: (shared[s], s == target))
        keep = min(shared[source], len(items) - 1)  # at least the last item is recomputed, for its logits
        if keep > 0 and source != target:
            self._copy(source, target)
        elif keep == 0:
            self._truncate(target, 0)
        return target, keep

    def _free_seq(self) -> int:
        idle = [seq for seq in self.content if seq not in self.busy]
        if not idle:
            raise RuntimeError(f"all {self.capacity} sequences are in use; finish or close a stream first")
        empty = [seq for seq in idle if not self.content[seq]]
        seq = empty[0] if empty else min(idle, key=lambda s: self._used[s])
        self._touch(seq)
        return seq

    def _touch(self, seq: int) -> None:
        self._used[seq] = next(self._clock)

    # ------------------------------------------------------------------------------------------------------------
    # Content and KV-cell bookkeeping

    def _copy(self, src: int, dst: int) -> None:
        self._truncate(dst, 0)
        self.llm.fork(src, dst)
        if self._pending.get(src):  # src is between the pieces of an item: dst keeps only its whole items
            self.llm.truncate(dst, positions(self.content[src]))
        self.content[dst] = list(self.content[src])
        self._blocks[dst] = [list(entry) for entry in self._blocks[src]]
        self._refs.update(block for block, _ in self._blocks[dst])
        if src in self._logits:
            self._logits[dst] = self._logits[src]

    def _truncate(self, seq: int, keep_items: int) -> None:
        if keep_items >= len(self.content[seq]):
            return
        self.content[seq] = self.content[seq][:keep_items]
        self._logits.pop(seq, None)
        keep = positions(self.content[seq])
        if keep == 0:
            self.llm.release(seq)
        else:
            self.llm.truncate(seq, keep)
        entries, total = [], 0
        for block, used in self._blocks[seq]:
            if total < keep:
                entries.append([block, min(used, keep - total)])
            else:
                self._unref(block)
            total += used
        self._blocks[seq] = entries

    def _unref(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] <= 0:
            del self._refs[block]

    def _add_cells(self, seq: int, n: int) -> None:
        blocks = self._blocks[seq]
        if blocks and self._refs[blocks[-1][0]] == 1:  # our own block: grow it
            blocks[-1][1] += n
        else:
            block = next(self._block_ids)
            blocks.append([block, n])
            self._refs[block] += 1

    def cells_used(self) -> int:
        """KV cells in use over all sequences, counting a prefix shared by forks once."""
        widest: dict[int, int] = {}
        for blocks in self._blocks.values():
            for block, used in blocks:
                widest[block] = max(widest.get(block, 0), used)
        return sum(widest.values()) + sum(self._pending.values())

    def cells_of(self, seqs: Sequence[int]) -> int:
        """KV cells `seqs` hold together, a prefix they share counted once (one shared with other sequences too)."""
        widest: dict[int, int] = {}
        for seq in seqs:
            for block, used in self._blocks[seq]:
                widest[block] = max(widest.get(block, 0), used)
        return sum(widest.values()) + sum(self._pending.get(seq, 0) for seq in seqs)

    def _make_room(self, need: int, protect: set[int]) -> bool:
        """Evict idle sequences (least recently used first) until `need` more cells fit in n_ctx."""
        while self.cells_used() + need > self.llm.n_ctx:
            idle = [s for s in self.content if s not in self.busy and s not in protect and self.content[s]]
            if not idle:
                return False
            self._truncate(min(idle, key=lambda s: self._used[s]), 0)
        return True

    # ------------------------------------------------------------------------------------------------------------
    # Sampling support

    def fork(self, src: int) -> int:
        """A busy copy of sequence `src` in another sequence."""
        dst = self._free_seq()
        self._copy(src, dst)
        self.busy.add(dst)
        return dst

    def fit(self, tokens: Mapping[int, int]) -> dict[int, int]:
        """The part of a decode step the context has room for (after evicting idle sequences); the rest must stop."""
        feed = {seq: token for seq, token in tokens.items() if self.llm.length(seq) < self.max_positions}
        while feed and not self._make_room(len(feed), set(feed)):
            feed.pop(max(feed))
        return feed

    def room_for(self, n: int, protect: set[int]) -> bool:
        """Evict idle sequences (not in `protect`) until `n` more cells fit in n_ctx; False if even then they do not."""
        return self._make_room(n, protect)

    def decode(self, tokens: Mapping[int, int]) -> dict[int, np.ndarray]:
        out = self.llm.decode(dict(tokens))
        for seq, token in tokens.items():
            self.content[seq].append(int(token))
            self._add_cells(seq, 1)
            self._logits[seq] = out[seq]
        return out

    def done(self, *seqs: int, drop: bool = False) -> None:
        """The current call is finished with `seqs`; drop=True also forgets their content (sampled garbage)."""
        for seq in seqs:
            self.busy.discard(seq)
            if drop:
                self._truncate(seq, 0)

    def reset(self) -> None:
        self._epoch += 1
        self.busy.clear()
        for seq in list(self._pending):  # rows of a half-written item: not in `content`, so drop them here
            self.llm.truncate(seq, positions(self.content[seq]))
        self._pending.clear()
        for seq in self.content:
            self._truncate(seq, 0)


class Prefill:
    """One prompt being prefilled into `seq` (SequencePool.begin): `step()` runs the next backend call and returns
    True once the prompt is in (then `logits` holds the last row's logits); `cancel()` rolls back what was written.
    `reused` is the number of positions taken from the cache instead of computed."""

    def __init__(self, pool: SequencePool, seq: int, items: list[Item], keep: int, chunk: int | None):
        self.pool, self.seq, self.items, self.keep, self.chunk = pool, seq, items, keep, chunk
        self.positions = positions(items)
        self.reused = positions(items[:keep])
        self.logits: np.ndarray | None = pool._logits[seq] if keep == len(items) else None
        self.done = keep == len(items)
        self.epoch = pool._epoch  # the pool's reset count when this began
        self._body = None if self.done else pool._pieces(self)

    def step(self) -> bool:
        if self.done:
            return True
        try:
            next(self._body)
        except StopIteration:
            self.done = True
        return self.done

    def cancel(self) -> None:
        """Stop here and roll back (a no-op once done: the sequence then holds the prompt and stays busy)."""
        if self.done:
            return
        if inspect.getgeneratorstate(self._body) == inspect.GEN_CREATED:
            if self.pool._epoch == self.epoch:  # placed and busy, nothing written yet
                self.pool._rollback(self.seq)
        self._body.close()  # if suspended between pieces: GeneratorExit inside _pieces rolls back
        self.done, self._body = True, None


def _too_long(items: Sequence[Item], need: int, n_ctx: int) -> str:
    images = [item for item in items if isinstance(item, ImageRef)]
    return (f"the prompt needs {need} positions ({sum(i.rows for i in images)} for {len(images)} image(s), "
            f"{len(items) - len(images)} text tokens) but the context holds {n_ctx}; shorten the question or chat "
            "history, or load with a larger n_ctx")


def _runs(items: Sequence[Item], start: int) -> Iterator[tuple[int, int]]:
    """Split items[start:] into maximal token runs and single images."""
    i = start
    while i < len(items):
        j = i + 1
        if not isinstance(items[i], ImageRef):
            while j < len(items) and not isinstance(items[j], ImageRef):
                j += 1
        yield i, j
        i = j

