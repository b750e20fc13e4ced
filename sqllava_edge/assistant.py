"""The public API: one `Assistant` over pluggable vision and LLM backends.

    assistant = Assistant.load("bundle/")                     # or a training checkpoint folder (torch backends)
    assistant.ask("photo.jpg", "What is the man holding?")    # -> str
    for piece in assistant.stream(image, "Describe the image."): ...
    assistant.describe(image)
    assistant.self_question(image, n=3, seed=0)               # describe, then n sampled VUSER questions (spec 5.1)
    assistant.interview(image, n=3, seed=0)                   # ... and the model's answers to its own questions
    chat = assistant.chat(image); chat.ask("..."); chat.ask("and then?")
    print(assistant.backends)                                 # what was chosen and why

Sampling options per call (`max_new_tokens`, `temperature`, `top_k`, `top_p`, `seed`, `stop`) start from the task's
defaults (generation.TASK_DEFAULTS, spec 5). Image embeddings are cached by the content hash of the preprocessed
pixels; KV-cache prefixes are reused across calls (runtimes.sequences), so a chat follow-up prefills only its new
tokens and never re-encodes the image. The backends, caches and pool live in a `runtimes.engine.Engine`
(`assistant.engine`), the same one `sqllava-edge serve` batches requests on; its re-entrant lock serialises every call,
so threads may share an Assistant.

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

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from sqllava_edge.config import ModelConfig
from sqllava_edge.generation import TASK_DEFAULTS, GenerationConfig, check_seed

OPTIONS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")
SEQUENCES = 4  # KV sequences kept: self_question(n=3) = the shared prompt + 3 samples in one batch


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
    quality: str = ""  # bundles: every candidate artifact's speed and fidelity, kept or dropped and why (runtimes.quality)
    vision_precision: str = ""  # the artifacts that run ("" on the torch backends)
    llm_precision: str = ""

    def __str__(self) -> str:
        text = (f"device: {self.device}\nvision: {self.vision} ({self.vision_detail})\n  why: {self.vision_reason}\n"
                f"llm: {self.llm} ({self.llm_detail})\n  why: {self.llm_reason}\nmemory plan:\n  "
                + self.memory.replace("\n", "\n  "))
        if self.quality:
            text += "\ncandidates (speed, quality vs fp32 PyTorch):\n  " + self.quality.replace("\n", "\n  ")
        return text


@dataclass(frozen=True)
class SelfQuestions:
    description: str  # the greedy description the questions are conditioned on
    questions: list[str]  # question i was sampled with seed + i
    seed: int


@dataclass(frozen=True)
class Exchange:
    question: str  # one of the model's own questions (self_question)
    answer: str  # the model's greedy answer to it, in the same conversation


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
                 image_cache: int | None = None):
        """Wrap already-loaded backends (VisionBackend, LLMBackend). Most users call `Assistant.load` instead."""
        from runtimes.engine import IMAGE_CACHE, Engine

        self.engine = Engine(vision, llm, tokenizer, config, image_mode=image_mode or config.image_aspect_ratio,
                             sequences=sequences, image_cache=IMAGE_CACHE if image_cache is None else image_cache)
        self.vision, self.llm, self.tokenizer, self.config = vision, llm, tokenizer, config
        self.template = template or config.template
        self.image_mode = self.engine.image_mode
        self.backends = backends
        self.eos_id = config.llm.eos_token_id
        self._descriptions: dict[str, str] = {}  # image key -> greedy description, for self_question
        self._lock = self.engine.lock
        self.engine.on_image_evicted(lambda key: self._descriptions.pop(key, None))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | None = None, vision_backend: str | None = None,
             llm_backend: str | None = None, n_ctx: int | None = None, n_threads: int | None = None,
             gpu_layers: int | None = None, *, vision_precision: str | None = None, llm_precision: str | None = None,
             verify: bool = True, sequences: int = SEQUENCES, prefer: str = "latency",
             tune: bool | None = None, max_quality_loss=None) -> "Assistant":
        """Load a bundle (`python -m export`) or a training checkpoint folder (torch backends).

        device: None (detect), "cpu", "cuda", "jetson". vision_backend: torch | onnxruntime | tensorrt; llm_backend:
        torch | llama.cpp (None = automatic, or $SQLLAVA_EDGE_VISION_BACKEND / $SQLLAVA_EDGE_LLM_BACKEND).
        vision_precision: fp32 | fp16 | int8; llm_precision: a GGUF precision (f32, f16, q8_0, q4_k_m, ...).
        verify: check every artifact's sha256 against the manifest (a few seconds for a 7B bundle).
        sequences: KV sequences the LLM keeps (prefix cache + parallel samples; the server raises it for its slots).
        prefer: what measured selection optimises on a CPU: "latency" (first answer for an image + short question),
        "throughput" (decode tokens/s) or "memory" (smallest artifacts that work). On the first load of a bundle on a
        machine every option it offers is timed in child processes and the table cached (runtimes.tune;
        `sqllava-edge tune BUNDLE` does it ahead). tune: False (or $SQLLAVA_EDGE_TUNE=0) keeps the rule-based
        order; an explicit backend, precision, n_threads or gpu_layers also skips it. `backends` shows the numbers.
        max_quality_loss: the quality floor of the automatic choice (runtimes.quality): None = the default (mean KL
        <= 0.05 nats and top-1 >= 97% vs fp32 PyTorch, per artifact, as recorded at export), a number = that max KL
        in nats, "off" = none. Artifacts below it are no candidates for measured or rule-based selection; an explicit
        precision always loads. `backends.quality` shows every candidate's speed and fidelity and why it was kept.
        """
        from runtimes.loader import load_parts

        parts = load_parts(path, device, vision_backend, llm_backend, n_ctx, n_threads, gpu_layers,
                           vision_precision, llm_precision, verify, sequences, tune=tune, prefer=prefer,
                           max_quality_loss=max_quality_loss)
        try:
            return cls(parts.vision, parts.llm, parts.tokenizer, parts.config, template=parts.template,
                       image_mode=parts.image_mode, backends=parts.backends, sequences=sequences)
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
        return self.engine.stream_text(image, ids, config)

    def describe(self, image, **options) -> str:
        """The SQ demo's first round: "Can you describe the image in detail?" (spec 5.1 step 3), greedy."""
        from sqllava_edge.conversation import describe_prompt

        ids = describe_prompt(self.tokenizer, self.template)
        return "".join(self.engine.stream_text(image, ids, _config("describe", options))).rstrip()

    def generate(self, image, prompt_ids: Sequence[int], **options) -> list[int]:
        """Low level: new token ids for prompt ids holding one IMAGE_TOKEN_INDEX (EOS excluded; greedy default)."""
        config = _config("answer", options)
        with self._lock:
            items = self.engine.items(image, prompt_ids)
            return [token for token, _ in self.engine.tokens(items, config)]

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
        seed = check_seed(seed)
        seed = int(np.random.SeedSequence().entropy % 2**31) if seed is None else seed
        with self._lock:
            ref = self.engine.image_ref(image)
            description = self._description(ref) if description is None else description
            items = self.engine.items(ref, self_question_prompt(self.tokenizer, description, self.template))
            questions: list[str] = []
            while len(questions) < n:  # rounds of at most (sequences - 1) samples beside the shared prompt
                count = min(n - len(questions), self.engine.pool.capacity - 1)
                seeds = [seed + len(questions) + i for i in range(count)]
                questions += self.engine.sample_forks(items, config, seeds)
        return SelfQuestions(description, questions, seed)

    def interview(self, image, n: int = 3, seed: int | None = None, *, max_answer_tokens: int | None = None,
                  **options) -> list[Exchange]:
        """The model questions itself about the image, then answers each of its questions: `self_question(image, n,
        seed)`, then for question q the greedy answer to `... ASSISTANT: {description}</s>VUSER: {q}</s> ASSISTANT:`
        (the conversation the SQ objective trains, spec 3.3). The answers decode together in one batch on the shared
        image + description prefix. Options apply to the questions (as in self_question); answers are greedy, at most
        `max_answer_tokens` (default: the answer default, 512) each."""
        from sqllava_edge.conversation import interview_prompt

        with self._lock:
            asked = self.self_question(image, n, seed, **options)
            ref = self.engine.image_ref(image)
            prompts = [self.engine.items(ref, interview_prompt(self.tokenizer, asked.description, q, self.template))
                       for q in asked.questions]
            answers: list[str] = []
            for start in range(0, len(prompts), self.engine.pool.capacity):
                answers += self.engine.answer_batch(prompts[start:start + self.engine.pool.capacity],
                                                    _config("answer", {"max_new_tokens": max_answer_tokens}))
        return [Exchange(q, a) for q, a in zip(asked.questions, answers)]

    def _description(self, ref) -> str:
        """The greedy description of an image (a function of the image: computed once per cached image)."""
        if ref.key not in self._descriptions:
            self._descriptions[ref.key] = self.describe(ref)
        return self._descriptions[ref.key]

    def chat(self, image) -> "Chat":
        """A multi-turn conversation about one image: encoded once, its KV cache kept between questions."""
        return Chat(self, image)

    def close(self) -> None:
        with self._lock:
            self._descriptions.clear()
            self.engine.close()

    def __enter__(self) -> "Assistant":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        kinds = f"{self.backends.vision}+{self.backends.llm}" if self.backends else f"{self.vision.name}+{self.llm.name}"
        return f"Assistant({self.config.name}, {kinds}, n_ctx={self.llm.n_ctx})"


class Chat:
    """Turns about one image. The image is encoded once (at creation) and kept; each question extends the KV cache
    holding the previous turns (the generated answer ids, then "</s>USER: ... ASSISTANT:"), so a follow-up prefills
    only its new tokens. `turns` is the conversation so far; `ids` the exact prompt ids the cache holds."""

    def __init__(self, assistant: Assistant, image):
        from sqllava_edge.conversation import Turn

        self._assistant = assistant
        self._image = assistant.engine.image_ref(image)
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

        return assistant.engine.stream_text(self._image, prompt, config, finish)

    def next_prompt(self, question: str) -> list[int]:
        """The full prompt ids the next `ask(question)` would run (for a fresh single-shot comparison)."""
        from sqllava_edge.conversation import chat_append_ids

        return self.ids + chat_append_ids(self._assistant.tokenizer, self.turns, _check_question(question),
                                          self._assistant.template)
