"""The public API: one `Assistant` over pluggable vision and LLM backends.

    assistant = Assistant.load("bundle/")                     # or a training checkpoint folder (torch backends)
    assistant.ask("photo.jpg", "What is the man holding?")    # -> str
    for piece in assistant.stream(image, "Describe the image."): ...
    assistant.describe(image)
    assistant.self_question(image, n=3, seed=0)               # describe, then n sampled VUSER questions (spec 5.1)
    chat = assistant.chat(image); chat.ask("..."); chat.ask("and then?")
    print(assistant.backends)                                 # what was chosen and why

Sampling options per call (`max_new_tokens`, `temperature`, `top_k`, `top_p`, `seed`, `stop`) start from the task's
defaults (generation.TASK_DEFAULTS, spec 5). Image embeddings are cached by the content hash of the preprocessed
pixels; KV-cache prefixes are reused across calls (runtimes.sequences), so a chat follow-up prefills only its new
tokens and never re-encodes the image. One re-entrant lock serialises every call, so threads may share an Assistant.

Errors (all subclasses of ValueError / RuntimeError / FileNotFoundError, from sqllava_edge.errors):
  FileNotFoundError         the model folder or an image file does not exist
  ImageError                an image cannot be read (corrupt, unsupported, too large)
  BundleError               tampered artifact hash, malformed manifest, artifacts from different models
  BackendUnavailableError   a requested backend or device cannot run here (names what is missing)
  MemoryPlanError           the model would not fit the device's memory (suggests a smaller quant / n_ctx)
  PromptTooLongError        image tokens + text exceed n_ctx
  ValueError                empty question, unknown backend / option names, bad option values
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from sqllava_edge.config import IMAGE_TOKEN_INDEX, ModelConfig
from sqllava_edge.errors import BundleError
from sqllava_edge.generation import TASK_DEFAULTS, GenerationConfig, Sampler

OPTIONS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")
SEQUENCES = 4  # KV sequences kept: self_question(n=3) = the shared prompt + 3 samples in one batch
IMAGE_CACHE = 16  # image embeddings kept, by content hash


@dataclass(frozen=True)
class Backends:
    """What `Assistant.load` chose, and why."""

    device: str
    vision: str  # VisionKind value
    vision_detail: str
    vision_reason: str
    llm: str  # LLMKind value
    llm_detail: str
    llm_reason: str
    memory: str  # the memory plan

    def __str__(self) -> str:
        return (f"device: {self.device}\nvision: {self.vision} ({self.vision_detail})\n  why: {self.vision_reason}\n"
                f"llm: {self.llm} ({self.llm_detail})\n  why: {self.llm_reason}\nmemory plan:\n  "
                + self.memory.replace("\n", "\n  "))


@dataclass(frozen=True)
class SelfQuestions:
    description: str  # the greedy description the questions are conditioned on
    questions: list[str]  # question i was sampled with seed + i
    seed: int


def _config(task: str, options: dict[str, Any]) -> GenerationConfig:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown sampling option(s) {unknown}; valid: {', '.join(OPTIONS)}")
    stop = options.get("stop")
    if isinstance(stop, str):
        options = {**options, "stop": (stop,)}
    elif stop is not None:
        options = {**options, "stop": tuple(stop)}
    return TASK_DEFAULTS[task].replace(**options)


def _check_question(question: Any) -> str:
    if not isinstance(question, str):
        raise ValueError(f"the question must be a str, got {type(question).__name__}")
    if not question.strip():
        raise ValueError("the question is empty; ask something about the image")
    return question.strip()


class Assistant:
    def __init__(self, vision, llm, tokenizer, config: ModelConfig, *, template: str | None = None,
                 image_mode: str | None = None, backends: Backends | None = None, sequences: int = SEQUENCES,
                 image_cache: int = IMAGE_CACHE):
        """Wrap already-loaded backends (VisionBackend, LLMBackend). Most users call `Assistant.load` instead."""
        from runtimes.sequences import SequencePool

        if llm.vocab_size != config.llm.vocab_size or tokenizer.vocab_size != config.llm.vocab_size:
            raise BundleError(f"vocabulary sizes disagree: model config {config.llm.vocab_size}, LLM backend "
                              f"{llm.vocab_size}, tokenizer {tokenizer.vocab_size}; the artifacts come from different models")
        self.vision, self.llm, self.tokenizer, self.config = vision, llm, tokenizer, config
        self.template = template or config.template
        self.image_mode = image_mode or config.image_aspect_ratio
        self.backends = backends
        self.eos_id = config.llm.eos_token_id
        self._pool = SequencePool(llm, sequences)
        self._images: OrderedDict[str, Any] = OrderedDict()
        self._descriptions: dict[str, str] = {}  # image key -> greedy description, for self_question
        self._image_cache = image_cache
        self._lock = threading.RLock()

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | None = None, vision_backend: str | None = None,
             llm_backend: str | None = None, n_ctx: int | None = None, n_threads: int | None = None,
             gpu_layers: int | None = None, *, vision_precision: str | None = None, llm_precision: str | None = None,
             verify: bool = True) -> "Assistant":
        """Load a bundle (`python -m export`) or a training checkpoint folder (torch backends).

        device: None (detect), "cpu", "cuda", "jetson". vision_backend: torch | onnxruntime | tensorrt; llm_backend:
        torch | llama.cpp (None = automatic, or $SQLLAVA_EDGE_VISION_BACKEND / $SQLLAVA_EDGE_LLM_BACKEND).
        vision_precision: fp32 | fp16 | int8; llm_precision: a GGUF precision (f32, f16, q8_0, q4_k_m, ...).
        verify: check every artifact's sha256 against the manifest (a few seconds for a 7B bundle).
        """
        from runtimes.loader import load_parts

        parts = load_parts(path, device, vision_backend, llm_backend, n_ctx, n_threads, gpu_layers,
                           vision_precision, llm_precision, verify, SEQUENCES)
        try:
            return cls(parts.vision, parts.llm, parts.tokenizer, parts.config, template=parts.template,
                       image_mode=parts.image_mode, backends=parts.backends)
        except BaseException:
            parts.vision.close()
            parts.llm.close()
            raise

    @property
    def counters(self):
        """Work done so far (runtimes.base.Counters): vision encodes, prefilled tokens / embeddings, decode steps."""
        return self.llm.counters

    # ------------------------------------------------------------------------------------------------------------
    # Public calls

    def ask(self, image, question: str, **options) -> str:
        """Answer `question` about `image` (path, bytes, PIL image, array). Greedy by default (spec 5.3)."""
        return "".join(self.stream(image, question, **options)).rstrip()

    def stream(self, image, question: str, **options) -> Iterator[str]:
        """Like `ask`, yielding text pieces as they are generated."""
        from sqllava_edge.conversation import answer_prompt

        question = _check_question(question)
        config = _config("answer", options)
        ids = answer_prompt(self.tokenizer, question, self.template)
        return self._stream_text(image, ids, config)

    def describe(self, image, **options) -> str:
        """The SQ demo's first round: "Can you describe the image in detail?" (spec 5.1 step 3), greedy."""
        from sqllava_edge.conversation import describe_prompt

        ids = describe_prompt(self.tokenizer, self.template)
        return "".join(self._stream_text(image, ids, _config("describe", options))).rstrip()

    def generate(self, image, prompt_ids: Sequence[int], **options) -> list[int]:
        """Low level: new token ids for prompt ids holding one IMAGE_TOKEN_INDEX (EOS excluded; greedy default)."""
        config = _config("answer", options)
        with self._lock:
            items = self._items(image, prompt_ids)
            return [token for token, _ in self._tokens(items, config)]

    def self_question(self, image, n: int = 3, seed: int | None = None, *, description: str | None = None,
                      **options) -> SelfQuestions:
        """Describe the image (greedy), then sample n VUSER questions from `... ASSISTANT: {description}</s>VUSER:`.

        The shared prompt is prefilled once and the n questions decode as parallel sequences forked from it; question
        i uses seed + i, so the result equals n sequential calls with n=1 and seeds seed, seed+1, ... (spec 5.1).
        Options (defaults T 1.2, top-k 300, top-p 0.95, 300 tokens) apply to the questions.
        """
        from sqllava_edge.conversation import self_question_prompt

        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        config = _config("self_question", options)
        seed = int(np.random.SeedSequence().entropy % 2**31) if seed is None else int(seed)
        with self._lock:
            ref = image if _is_ref(image) else self._image(image)
            if description is None:  # greedy, hence a function of the image: computed once per image
                if ref.key not in self._descriptions:
                    self._descriptions[ref.key] = self.describe(ref)
                description = self._descriptions[ref.key]
            items = self._items(ref, self_question_prompt(self.tokenizer, description, self.template))
            questions: list[str] = []
            while len(questions) < n:  # rounds of at most (sequences - 1) samples beside the shared prompt
                count = min(n - len(questions), self._pool.capacity - 1)
                seeds = [seed + len(questions) + i for i in range(count)]
                questions += self._sample_forks(items, config, seeds)
        return SelfQuestions(description, questions, seed)

    def chat(self, image) -> "Chat":
        """A multi-turn conversation about one image: encoded once, its KV cache kept between questions."""
        return Chat(self, image)

    def close(self) -> None:
        with self._lock:
            self._pool.reset()
            self._images.clear()
            self._descriptions.clear()
            self.vision.close()
            self.llm.close()

    def __enter__(self) -> "Assistant":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        kinds = f"{self.backends.vision}+{self.backends.llm}" if self.backends else f"{self.vision.name}+{self.llm.name}"
        return f"Assistant({self.config.name}, {kinds}, n_ctx={self.llm.n_ctx})"

    # ------------------------------------------------------------------------------------------------------------
    # Internals (the caller holds the lock)

    def _image(self, image):
        """ImageRef for `image`: embeddings from the cache (by pixel content hash) or one vision encode."""
        from runtimes.sequences import ImageRef
        from sqllava_edge.image import preprocess

        pixels = preprocess(image, self.config.vision, self.image_mode)  # (3, S, S), the one preprocessing
        key = hashlib.sha256(pixels.tobytes()).hexdigest()
        if key in self._images:
            self._images.move_to_end(key)
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
            self._descriptions.pop(evicted, None)
        return ref

    def _items(self, image, prompt_ids: Sequence[int]):
        from runtimes.sequences import prompt_items

        if sum(1 for i in prompt_ids if i == IMAGE_TOKEN_INDEX) != 1:
            raise ValueError(f"prompt ids must hold exactly one image placeholder ({IMAGE_TOKEN_INDEX})")
        return prompt_items(prompt_ids, [image if _is_ref(image) else self._image(image)])

    def _tokens(self, items, config: GenerationConfig, stopped: Callable[[], bool] | None = None):
        """Greedy/sampled tokens of one sequence continuing `items`: yields (token, seq)."""
        from runtimes.sequences import sample

        seq, logits = self._pool.prefill(items)
        try:
            check = (lambda _seq: stopped()) if stopped else None
            for _, token in sample(self._pool, {seq: logits}, {seq: Sampler(config)}, config.max_new_tokens,
                                   self.eos_id, check):
                yield token, seq
        finally:
            self._pool.done(seq)

    def _stream_text(self, image, ids: Sequence[int], config: GenerationConfig,
                     on_finish: Callable[[list[int], str], None] | None = None) -> Iterator[str]:
        with self._lock:
            items = self._items(image, ids)  # errors (bad image, too long) surface at the first next()
            text = _TextStream(self.tokenizer, config.stop)
            tokens = []
            for token, _ in self._tokens(items, config, lambda: text.stopped):
                tokens.append(token)
                piece = text.push(token)
                if piece:
                    yield piece
            tail = text.finish()
            if tail:
                yield tail
            if on_finish is not None:
                on_finish(tokens, text.text)

    def _sample_forks(self, items, config: GenerationConfig, seeds: Sequence[int]) -> list[str]:
        from runtimes.sequences import sample

        pool = self._pool
        root, logits = pool.prefill(items)
        forks: list[int] = []
        try:
            forks = [pool.fork(root) for _ in seeds]
            samplers = {seq: Sampler(config, s) for seq, s in zip(forks, seeds)}
            streams = {seq: _TextStream(self.tokenizer, config.stop) for seq in forks}
            for seq, token in sample(pool, {seq: logits for seq in forks}, samplers, config.max_new_tokens,
                                     self.eos_id, lambda seq: streams[seq].stopped):
                streams[seq].push(token)
        finally:
            pool.done(*forks, drop=True)  # sampled continuations are not worth keeping
            pool.done(root)
        return [streams[seq].text.strip() for seq in forks]


def _is_ref(image) -> bool:
    from runtimes.sequences import ImageRef

    return isinstance(image, ImageRef)


class _TextStream:
    """Token ids -> text pieces; holds back an incomplete UTF-8 character and any possible start of a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # the final text so far (cut at a stop string)
        self.stopped = False
        self._emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                text, self.stopped = text[:at], True
        self.text = text
        if self.stopped:
            return self._emit(text)
        hold = max([k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])], default=0)
        safe = text[: len(text) - hold]
        return self._emit(safe.rstrip("\ufffd"))  # U+FFFD: a multi-byte character still being generated

    def finish(self) -> str:
        return self._emit(self.text)

    def _emit(self, upto: str) -> str:
        if self._emitted == 0:
            upto_stripped = upto.lstrip()
            skip = len(upto) - len(upto_stripped)
        else:
            skip = 0
        piece = upto[max(self._emitted, skip):]
        self._emitted = max(self._emitted, skip) + len(piece)
        return piece


class Chat:
    """Turns about one image. The image is encoded once (at creation) and kept; each question extends the KV cache
    holding the previous turns (the generated answer ids, then "</s>USER: ... ASSISTANT:"), so a follow-up prefills
    only its new tokens. `turns` is the conversation so far; `ids` the exact prompt ids the cache holds."""

    def __init__(self, assistant: Assistant, image):
        from sqllava_edge.conversation import Turn

        self._assistant = assistant
        with assistant._lock:
            self._image = assistant._image(image)
        self.turns: list[Turn] = []
        self.ids: list[int] = []

    def ask(self, question: str, **options) -> str:
        return "".join(self.stream(question, **options)).rstrip()

    def stream(self, question: str, **options) -> Iterator[str]:
        from sqllava_edge.conversation import Turn, chat_append_ids

        question = _check_question(question)
        config = _config("answer", options)
        assistant = self._assistant
        prompt = self.ids + chat_append_ids(assistant.tokenizer, self.turns, question, assistant.template)

        def finish(tokens: list[int], text: str) -> None:  # the cache now holds prompt + tokens; "</s>" closes the turn
            self.ids = prompt + tokens + [assistant.eos_id]
            self.turns += [Turn("user", question), Turn("assistant", text.strip())]

        return assistant._stream_text(self._image, prompt, config, finish)

    def next_prompt(self, question: str) -> list[int]:
        """The full prompt ids the next `ask(question)` would run (for a fresh single-shot comparison)."""
        from sqllava_edge.conversation import chat_append_ids

        return self.ids + chat_append_ids(self._assistant.tokenizer, self.turns, _check_question(question),
                                          self._assistant.template)
