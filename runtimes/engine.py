"""One loaded model as every front door drives it: vision + LLM backends, the image-embedding cache (and the
descriptions derived from it), the KV-sequence pool and the lock that serialises them.

Generation runs on `runtimes.scheduler.Scheduler`, for `Assistant` (a scheduler without a thread) and for the server
(one on its own thread) alike: the same preprocessing, the same cached embeddings, the same prefix reuse
(runtimes.sequences), the same step.

Everything that touches the backends or the pool runs under `engine.lock` (re-entrant). Preprocessing an image
(`pixels`) needs no lock, so a server can decode and resize uploads on other threads.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np

from runtimes.sequences import ImageRef, SequencePool, prompt_items
from sqllava_edge.config import IMAGE_TOKEN_INDEX, ModelConfig
from sqllava_edge.errors import BundleError

IMAGE_CACHE = 16  # image embeddings kept, by content hash


class Engine:
    def __init__(self, vision, llm, tokenizer, config: ModelConfig, *, image_mode: str, sequences: int,
                 image_cache: int = IMAGE_CACHE):
        if llm.vocab_size != config.llm.vocab_size or tokenizer.vocab_size != config.llm.vocab_size:
            raise BundleError(f"vocabulary sizes disagree: model config {config.llm.vocab_size}, LLM backend "
                              f"{llm.vocab_size}, tokenizer {tokenizer.vocab_size}; the artifacts come from different models")
        self.vision, self.llm, self.tokenizer, self.config = vision, llm, tokenizer, config
        self.image_mode = image_mode
        self.eos_id = config.llm.eos_token_id
        self.pool = SequencePool(llm, sequences, config.llm.max_position_embeddings)
        self.lock = threading.RLock()
        self.image_hits = 0  # image_ref calls answered from the cache
        self._images: OrderedDict[str, ImageRef] = OrderedDict()
        self._image_cache = image_cache
        self._descriptions: dict[str, str] = {}  # image key -> its greedy description (runtimes.tasks)
        self._on_evict: list[Callable[[str], None]] = [lambda key: self._descriptions.pop(key, None)]

    @property
    def counters(self):
        return self.llm.counters

    # ------------------------------------------------------------------------------------------------------------
    # Images

    def pixels(self, image, **limits) -> np.ndarray:
        """(3, S, S) float32: the one preprocessing (sqllava_edge.image; `limits`: its max_pixels / max_aspect).
        Thread-safe, no lock needed."""
        from sqllava_edge.image import preprocess

        return preprocess(image, self.config.vision, self.image_mode, **limits)

    def image_ref(self, image) -> ImageRef:
        """ImageRef for `image` (anything `pixels` takes, pixels themselves, or an ImageRef): embeddings from the cache
        (by the preprocessed pixels' content hash) or one vision encode."""
        if isinstance(image, ImageRef):
            return image
        pixels = image if _is_pixels(image, self.config) else self.pixels(image)
        key = image_key(pixels)
        with self.lock:
            if key in self._images:
                self._images.move_to_end(key)
                self.image_hits += 1
                return self._images[key]
            embeds = self.vision.encode(pixels[None])[0]  # (T, H)
            self.counters.vision_encodes += 1
            want = (self.config.num_image_tokens, self.config.llm.hidden_size)
            if embeds.shape != want:
                raise BundleError(f"the vision backend returned {embeds.shape} embeddings per image but the LLM expects "
                                  f"{want}; the vision and LLM artifacts come from different models, re-export the bundle")
            ref = ImageRef(key, embeds)
            self._images[key] = ref
            while len(self._images) > self._image_cache:
                evicted, _ = self._images.popitem(last=False)
                for callback in self._on_evict:
                    callback(evicted)
            return ref

    def on_image_evicted(self, callback: Callable[[str], None]) -> None:
        """Call `callback(key)` when an image's embeddings leave the cache (to drop what was derived from them)."""
        self._on_evict.append(callback)

    def items(self, image, prompt_ids: Sequence[int]) -> list:
        """Prompt ids -> pool items; `image` fills the one IMAGE_TOKEN_INDEX (None for a text-only prompt)."""
        count = sum(1 for i in prompt_ids if i == IMAGE_TOKEN_INDEX)
        if count != (0 if image is None else 1):
            raise ValueError(f"prompt ids must hold exactly {0 if image is None else 1} image placeholder(s) "
                             f"({IMAGE_TOKEN_INDEX}), found {count}")
        return prompt_items(prompt_ids, [] if image is None else [self.image_ref(image)])

    # ------------------------------------------------------------------------------------------------------------
    # Descriptions: the greedy "describe the image" answer is a function of the image, so self-questioning computes
    # it once per cached image, whichever door asked (runtimes.tasks)

    def description(self, key: str) -> str | None:
        with self.lock:
            return self._descriptions.get(key)

    def remember_description(self, key: str, text: str) -> None:
        """Keep `text` as the description of the cached image `key` (nothing is kept for an image no longer cached:
        the cache of descriptions never outgrows the image cache)."""
        with self.lock:
            if key in self._images:
                self._descriptions[key] = text

    def reset(self) -> None:
        with self.lock:
            self.pool.reset()
            self._images.clear()
            self._descriptions.clear()

    def close(self) -> None:
        with self.lock:
            self.reset()
            self.vision.close()
            self.llm.close()


def image_key(pixels: np.ndarray) -> str:
    """The image cache's key: the content hash of the preprocessed pixels (equal keys, equal embeddings)."""
    return hashlib.sha256(pixels.tobytes()).hexdigest()


def _is_pixels(image: Any, config: ModelConfig) -> bool:
    size = config.vision.image_size
    return isinstance(image, np.ndarray) and image.dtype == np.float32 and image.shape == (3, size, size)


class TextStream:
    """Token ids -> text pieces; holds back an incomplete UTF-8 character and any possible start of a stop string.

    Stop strings are matched in time linear in the generated text: each new character advances one KMP matcher per
    stop string (amortised O(1) work), and a matcher's state is the length of the longest start of its stop string
    that the text ends with, which is exactly how much to hold back. The cost per token never depends on the stop
    strings' length (a client sending a 1 MB stop string costs one O(L) table, not O(L^2) per token). The text is cut
    at the first stop string to complete; among those completing on the same character, at the one starting first.
    """

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self._matchers = [_StopMatcher(s) for s in self.stop]
        self.ids: list[int] = []
        self.text = ""  # the final text so far (cut at a stop string)
        self.stopped = False
        self._emitted = 0
        self._fed = 0  # characters of the decoded text the matchers have seen

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        stable = len(text.rstrip("\ufffd"))  # U+FFFD: a multi-byte character still being generated
        cut = self._feed(text, stable)
        if cut is not None:
            self.text, self.stopped = text[:cut], True
            return self._emit(self.text)
        self.text = text
        hold = max((m.state for m in self._matchers), default=0)
        return self._emit(text[: stable - hold])

    def _feed(self, text: str, stable: int) -> int | None:
        """Run text[self._fed:stable] through the matchers -> where to cut when a stop string completed."""
        for i in range(self._fed, stable):
            char = text[i]
            done = [m.pattern for m in self._matchers if m.feed(char)]
            if done:
                self._fed = i + 1
                return i + 1 - max(len(s) for s in done)
        self._fed = max(self._fed, stable)
        return None

    def finish(self) -> str:
        return self._emit(self.text)

    def _emit(self, upto: str) -> str:
        """The text after what was emitted, up to `upto` less its trailing whitespace: whitespace goes out only once
        something follows it, so the pieces of a stream add up to the stripped answer, as the whole answer is."""
        upto = upto.rstrip()
        if self._emitted == 0:
            upto_stripped = upto.lstrip()
            skip = len(upto) - len(upto_stripped)
        else:
            skip = 0
        piece = upto[max(self._emitted, skip):]
        self._emitted = max(self._emitted, skip) + len(piece)
        return piece


class _StopMatcher:
    """Knuth-Morris-Pratt over a character stream: `state` is the length of the longest prefix of `pattern` that the
    text seen so far ends with; `feed` returns True when the whole pattern has just been seen."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.state = 0
        fail, k = [0] * len(pattern), 0  # fail[i]: longest proper prefix of pattern[:i + 1] that is also its suffix
        for i in range(1, len(pattern)):
            while k and pattern[i] != pattern[k]:
                k = fail[k - 1]
            if pattern[i] == pattern[k]:
                k += 1
            fail[i] = k
        self._fail = fail

    def feed(self, char: str) -> bool:
        pattern, k = self.pattern, self.state
        while k and pattern[k] != char:
            k = self._fail[k - 1]
        if pattern[k] == char:
            k += 1
        if k == len(pattern):
            self.state = self._fail[k - 1]
            return True
        self.state = k
        return False
