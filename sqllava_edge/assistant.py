"""The public API: one `Assistant` over pluggable vision and LLM backends.

    assistant = Assistant.load("bundle/")                     # or a training checkpoint folder (torch backends)
    assistant.ask("photo.jpg", "What is the man holding?")    # -> str
    for piece in assistant.stream(image, "Describe the image."): ...
    assistant.describe(image)
    assistant.self_question(image, n=3, seed=0)               # describe, then n sampled VUSER questions (docs/spec.md 5.1)
    assistant.interview(image, n=3, seed=0)                   # ... and the model's answers to its own questions
    chat = assistant.chat(image); chat.ask("..."); chat.ask("and then?")
    assistant.ask(image, "Which objects?", schema=Objects)    # JSON-schema dict or Pydantic model -> parsed answer
    print(assistant.backends)                                 # what was chosen and why

`schema=` (ask, stream, chat.ask / chat.stream, interview) holds the answer to a JSON schema: every token is masked
by the compiled schema (sqllava_edge.structured) before sampling, the answer ends with EOS once the JSON closes, and
`ask` returns the parsed value (a model instance for a Pydantic class; `stream` yields the text).

Sampling options per call (`max_new_tokens`, `temperature`, `top_k`, `top_p`, `seed`, `stop`) start from the task's
defaults (generation.TASK_DEFAULTS, docs/spec.md 5). Image embeddings are cached by the content hash of the preprocessed
pixels; KV-cache prefixes are reused across calls (runtimes.sequences), so a chat follow-up prefills only its new
tokens and never re-encodes the image. The backends, caches and pool live in a `runtimes.engine.Engine`
(`assistant.engine`), the one `sqllava-edge serve` batches requests on, and every call runs as requests on a
`runtimes.scheduler.Scheduler` without a thread (`assistant.scheduler`): the server's own step, turned by the calling
thread. Threads may share an Assistant: their calls are admitted one at a time, and whichever thread turns the loop
advances them all.

Errors (all subclasses of ValueError / RuntimeError / FileNotFoundError, from sqllava_edge.errors):
  FileNotFoundError         the model folder or an image file does not exist
  ImageError                an image cannot be read (corrupt, unsupported, too large)
  BundleError               tampered artifact hash, malformed manifest, artifacts from different models
  BackendUnavailableError   a requested backend or device cannot run here (names what is missing)
  MemoryPlanError           the model would not fit the device's memory (suggests a smaller quant / n_ctx)
  PromptTooLongError        image tokens + text exceed n_ctx
  ValueError                empty question, unknown backend / option names, bad option values
  SchemaError               (a ValueError, sqllava_edge.structured) a schema= that cannot be enforced, naming why
  StructuredOutputError     (a ValueError) a schema= answer cut short (max_new_tokens, stop); `.text` holds it
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from runtimes.loader import Backends  # what Assistant.load chose, and why (re-exported here for users)
from sqllava_edge.config import ModelConfig
from sqllava_edge.generation import TASK_DEFAULTS, GenerationConfig, check_seed

OPTIONS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")
SEQUENCES = 4  # KV sequences kept: self_question(n=3) = the shared prompt + 3 samples in one batch
CALLS_WAITING = 1 << 16  # calls from other threads waiting for the one running (a bound no program reaches)


@dataclass(frozen=True)
class SelfQuestions:
    description: str  # the greedy description the questions are conditioned on
    questions: list[str]  # question i was sampled with seed + i
    seed: int


@dataclass(frozen=True)
class Exchange:
    question: str  # one of the model's own questions (self_question)
    answer: Any  # the model's greedy answer to it, in the same conversation (str, or parsed with a schema)


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


def _parse(text: str, schema: Any) -> Any:
    from sqllava_edge.structured import parse_answer

    return parse_answer(text, schema)


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
        from runtimes.scheduler import Scheduler

        self.engine = Engine(vision, llm, tokenizer, config, image_mode=image_mode or config.image_aspect_ratio,
                             sequences=sequences, image_cache=IMAGE_CACHE if image_cache is None else image_cache)
        # one call at a time on the whole context (as a lone caller always had), the rest wait in its queue
        self.scheduler = Scheduler(self.engine, parallel=1, queue=CALLS_WAITING, prefill_chunk=0, thread=False)
        self.vision, self.llm, self.tokenizer, self.config = vision, llm, tokenizer, config
        self.template = template or config.template
        self.image_mode = self.engine.image_mode
        self.backends = backends
        self.eos_id = config.llm.eos_token_id

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

    def ask(self, image, question: str, *, schema: Any = None, **options) -> Any:
        """Answer `question` about `image` (path, bytes, PIL image, array). Greedy by default (docs/spec.md 5.3).
        With `schema` (a JSON-schema dict or a Pydantic model class) the answer is held to it and returned parsed
        (StructuredOutputError, carrying the text, if it was cut short by max_new_tokens)."""
        text = "".join(self.stream(image, question, schema=schema, **options)).rstrip()
        return text if schema is None else _parse(text, schema)

    def stream(self, image, question: str, *, schema: Any = None, **options) -> Iterator[str]:
        """Like `ask`, yielding text pieces as they are generated (the JSON text with `schema`)."""
        from sqllava_edge.conversation import answer_prompt

        question = _check_question(question)
        config = self._constrain(_config("answer", options), schema)
        ids = answer_prompt(self.tokenizer, question, self.template)
        return self._pieces(image, ids, config)

    def describe(self, image, **options) -> str:
        """The SQ demo's first round: "Can you describe the image in detail?" (docs/spec.md 5.1 step 3), greedy."""
        from sqllava_edge.conversation import describe_prompt

        ids = describe_prompt(self.tokenizer, self.template)
        return "".join(self._pieces(image, ids, _config("describe", options))).rstrip()

    def generate(self, image, prompt_ids: Sequence[int], **options) -> list[int]:
        """Low level: new token ids for prompt ids holding one IMAGE_TOKEN_INDEX (EOS excluded; greedy default)."""
        from runtimes.scheduler import Request
        from runtimes.tasks import tokens

        return list(tokens(self.scheduler, Request(list(prompt_ids), image, _config("answer", options))))

    def self_question(self, image, n: int = 3, seed: int | None = None, *, description: str | None = None,
                      **options) -> SelfQuestions:
        """Describe the image (greedy), then sample n VUSER questions from `... ASSISTANT: {description}</s>VUSER:`.

        The shared prompt is prefilled once and the n questions decode as parallel sequences forked from it; question
        i uses seed + i, so the result equals n sequential calls with n=1 and seeds seed, seed+1, ... (docs/spec.md 5.1).
        Options (defaults T 1.2, top-k 300, top-p 0.95, 300 tokens) apply to the questions.
        """
        asked = self._self_questioning(image, n, seed, options, description=description)
        return SelfQuestions(asked.description, asked.questions, asked.seed)

    def interview(self, image, n: int = 3, seed: int | None = None, *, max_answer_tokens: int | None = None,
                  schema: Any = None, **options) -> list[Exchange]:
        """The model questions itself about the image, then answers each of its questions: `self_question(image, n,
        seed)`, then for question q the greedy answer to `... ASSISTANT: {description}</s>VUSER: {q}</s> ASSISTANT:`
        (the conversation the SQ objective trains, docs/spec.md 3.3). The answers decode together in one batch on the shared
        image + description prefix. Options apply to the questions (as in self_question); answers are greedy, at most
        `max_answer_tokens` (default: the answer default, 512) each. With `schema` each answer is held to it and
        `Exchange.answer` is the parsed value."""
        answers = self._constrain(_config("answer", {"max_new_tokens": max_answer_tokens}), schema)
        asked = self._self_questioning(image, n, seed, options, answers=answers)
        said = asked.answers if schema is None else [_parse(a, schema) for a in asked.answers]
        return [Exchange(q, a) for q, a in zip(asked.questions, said)]

    def _self_questioning(self, image, n: int, seed: int | None, options: dict[str, Any], **plan):
        """runtimes.tasks.self_questioning on this image, run here (the description cached by the engine)."""
        from runtimes.tasks import run_jobs, run_plan, self_questioning

        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        config = _config("self_question", options)
        seed = check_seed(seed)
        seed = int(np.random.SeedSequence().entropy % 2**31) if seed is None else seed
        ref = self.engine.image_ref(image)
        return run_plan(self_questioning(self.engine, ref.key, self.template, n, seed, config, **plan),
                        run_jobs(self.scheduler, ref))

    def _pieces(self, image, ids: Sequence[int], config: GenerationConfig, on_finish=None) -> Iterator[str]:
        from runtimes.scheduler import Request
        from runtimes.tasks import pieces

        return pieces(self.scheduler, Request(list(ids), image, config), on_finish)

    def _constrain(self, config: GenerationConfig, schema: Any) -> GenerationConfig:
        if schema is None:
            return config
        from sqllava_edge.structured import compile_schema

        return config.replace(grammar=compile_schema(self.tokenizer, schema))

    def watch(self, source, question: str, fps: float | None = None, every_change: bool = True, *,
              threshold: float | None = None, realtime: bool | None = None, self_questions: int = 0, **options):
        """Answer `question` over a video -> iterator of runtimes.watch.FrameAnswer(timestamp, frame_index, answer,
        latency, skipped_since_last, dropped_since_last, questions). source: a file, a folder of images, a stream URL,
        /dev/videoN, gst:PIPELINE (sqllava_edge.video.open_source), a VideoSource or an iterable of video.Frame.
        fps: frames sampled per second of source time (None: every frame the device takes); every_change: answer only
        frames that differ from the last answered one by more than `threshold` grey levels; realtime: read a file at
        its own pace, dropping what the device cannot take (live sources always are). Greedy, 32 tokens by default.
        self_questions: also sample that many of the model's own questions about each answered frame (a new scene),
        conditioned on a description of at most WATCH_DESCRIBE tokens, seed 0, WATCH_TOKENS tokens each."""
        from runtimes.watch import DEFAULT_THRESHOLD, WATCH_TOKENS, watch
        from sqllava_edge.conversation import answer_prompt

        config = _config("answer", {"max_new_tokens": WATCH_TOKENS, **options})
        ids = answer_prompt(self.tokenizer, _check_question(question), self.template)
        if not isinstance(self_questions, int) or self_questions < 0:
            raise ValueError(f"self_questions must be an int >= 0, got {self_questions!r}")
        return watch(self.scheduler, source, ids, config, fps=fps, every_change=every_change, realtime=realtime,
                     threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
                     questions=(lambda image: self._scene_questions(image, self_questions)) if self_questions else None)

    def _scene_questions(self, image, n: int) -> list[str]:
        """`watch`'s self-questions about a frame: n questions (seed 0, short) on a short greedy description."""
        from runtimes.watch import WATCH_DESCRIBE, WATCH_TOKENS

        description = self.describe(image, max_new_tokens=WATCH_DESCRIBE)
        return self.self_question(image, n, seed=0, description=description, max_new_tokens=WATCH_TOKENS).questions

    def chat(self, image) -> "Chat":
        """A multi-turn conversation about one image: encoded once, its KV cache kept between questions."""
        return Chat(self, image)

    def close(self) -> None:
        self.scheduler.shutdown(timeout=0)
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

    def ask(self, question: str, *, schema: Any = None, **options) -> Any:
        text = "".join(self.stream(question, schema=schema, **options)).rstrip()
        return text if schema is None else _parse(text, schema)

    def stream(self, question: str, *, schema: Any = None, **options) -> Iterator[str]:
        from sqllava_edge.conversation import Turn, chat_append_ids

        question = _check_question(question)
        assistant = self._assistant
        config = assistant._constrain(_config("answer", options), schema)
        prompt = self.ids + chat_append_ids(assistant.tokenizer, self.turns, question, assistant.template)

        def finish(tokens: list[int], text: str) -> None:  # the cache now holds prompt + tokens; "</s>" closes the turn
            self.ids = prompt + tokens + [assistant.eos_id]
            self.turns += [Turn("user", question), Turn("assistant", text.strip())]

        return assistant._pieces(self._image, prompt, config, finish)

    def next_prompt(self, question: str) -> list[int]:
        """The full prompt ids the next `ask(question)` would run (for a fresh single-shot comparison)."""
        from sqllava_edge.conversation import chat_append_ids

        return self.ids + chat_append_ids(self._assistant.tokenizer, self.turns, _check_question(question),
                                          self._assistant.template)
