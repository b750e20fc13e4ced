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

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

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

    # ------------------------------------------------------------------------------------------------------------
    # Prefill with prefix reuse

    def prefill(self, items: Sequence[Item]) -> tuple[int, np.ndarray]:
        """Put `items` into a sequence, reusing the longest cached prefix; mark it busy. -> (seq, last logits)."""
        items = list(items)
        if not items:
            raise ValueError("empty prompt")
        need = positions(items)
        if need > self.max_positions:
            raise PromptTooLongError(_too_long(items, need, self.max_positions))
        seq, keep = self._place(items)
        self.busy.add(seq)
        if keep == len(items):
            return seq, self._logits[seq]
        try:
            self._truncate(seq, keep)
            if not self._make_room(need - positions(items[:keep]), {seq}):
                raise PromptTooLongError(_too_long(items, need, self.llm.n_ctx) + " (other calls in progress hold "
                                         f"{self.cells_used() - positions(items[:keep])} positions of it)")
            for start, stop in _runs(items, keep):
                chunk = items[start:stop]
                if isinstance(chunk[0], ImageRef):
                    logits = self.llm.prefill(seq, embeds=chunk[0].embeds)
                else:
                    logits = self.llm.prefill(seq, tokens=chunk)
                self.content[seq].extend(chunk)
                self._add_cells(seq, positions(chunk))
        except BaseException:
            self.busy.discard(seq)
            self._logits.pop(seq, None)
            self.llm.truncate(seq, positions(self.content[seq]))  # drop a half-written chunk
            raise
        self._logits[seq] = logits
        return seq, logits

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
        return sum(widest.values())

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
        self.busy.clear()
        for seq in self.content:
            self._truncate(seq, 0)


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


def sample(pool: SequencePool, logits: Mapping[int, np.ndarray], samplers: Mapping[int, Callable[[np.ndarray], int]],
           max_new_tokens: int, eos_id: int, stopped: Callable[[int], bool] | None = None) -> Iterator[tuple[int, int]]:
    """Sample every sequence in `logits` until EOS, max_new_tokens, a full context or stopped(seq); yield (seq, token).

    Sequences still running decode together in one batched `decode` call per step. EOS is neither yielded nor fed.
    """
    active, counts = dict(logits), {seq: 0 for seq in logits}
    while active:
        feed = {}
        for seq, seq_logits in active.items():
            token = samplers[seq](seq_logits)
            if token == eos_id:
                continue
            counts[seq] += 1
            yield seq, token
            if counts[seq] < max_new_tokens and not (stopped and stopped(seq)):
                feed[seq] = token
        feed = pool.fit(feed)
        active = pool.decode(feed) if feed else {}
