"""Structured answers: a JSON schema compiled into a token constraint that the one `Sampler` applies.

    grammar = compile_schema(tokenizer, {"type": "object", "properties": {...}})   # cached by canonical JSON
    config = GenerationConfig(grammar=grammar)        # every Sampler built from it masks its tokens

The grammar engine is llguidance (numpy token masks, reads the `tokenizers` JSON directly, no torch): chosen by
measurement against outlines-core and xgrammar on the 32000-token Llama-2 vocabulary (docs/results.md "Structured output",
`python -m benchmarks.structured`). A compiled `Grammar` is immutable and shared; each sequence gets its own
`Constraint` (the parser state), which says which tokens may come next and follows the tokens chosen.

The answer may start with one space (the model's natural first token after "ASSISTANT:" is "▁{", a space-prefixed
piece), then the JSON value, written compactly (no free whitespace inside: a random model would otherwise loop on
spaces). Once the value is complete only EOS is allowed, so the answer ends with EOS right after the JSON closes.
A schema keyword the engine does not implement is an error naming it, never a silently unconstrained answer.
"""
from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

# {"type": "json_object"} (OpenAI's JSON mode): any JSON object.
JSON_OBJECT: dict[str, Any] = {"type": "object"}
MAX_SCHEMA_BYTES = 64 << 10  # canonical JSON; a larger schema is refused
CACHE_SIZE = 64  # compiled grammars kept per tokenizer
# The features the tests cover (docs/serving.md "Structured output"); llguidance implements more (anyOf, $ref, pattern, ...).
SUPPORTED = ("type", "properties", "required", "additionalProperties", "enum", "const", "items", "minItems",
             "maxItems", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
             "pattern", "anyOf", "$ref", "$defs", "title", "description", "default")


class SchemaError(ValueError):
    """A schema this server cannot enforce: malformed, too large, or using an unimplemented keyword."""


class StructuredOutputError(ValueError):
    """A constrained answer that is not a complete JSON value (it hit max_new_tokens or a stop string).
    `text` holds what was generated."""

    def __init__(self, message: str, text: str):
        super().__init__(message)
        self.text = text


def schema_dict(schema: Any) -> dict[str, Any]:
    """A JSON schema from a dict, a JSON string or a Pydantic model class (its `model_json_schema()`)."""
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        schema = schema.model_json_schema()
    elif isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise SchemaError(f"the schema is not valid JSON ({exc})") from None
    if not isinstance(schema, dict):
        raise SchemaError(f"a schema must be a JSON-schema object (dict), a JSON string or a Pydantic model class, "
                          f"got {type(schema).__name__}")
    return schema


def canonical(schema: dict[str, Any]) -> str:
    try:
        return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"the schema is not plain JSON ({exc})") from None


class Grammar:
    """A compiled schema for one tokenizer: immutable, shared by every sequence that answers with it."""

    def __init__(self, schema: dict[str, Any], key: str, matcher: Any, vocab_size: int):
        self.schema, self.key, self._matcher, self.vocab_size = schema, key, matcher, vocab_size

    def constraint(self) -> "Constraint":
        """Fresh parser state for one sequence."""
        return Constraint(self._matcher.deep_copy(), self.vocab_size)

    def __repr__(self) -> str:
        return f"Grammar({self.key[:60]}{'...' if len(self.key) > 60 else ''})"


class Constraint:
    """One sequence's position in the grammar: `allowed()` -> bool mask over the vocabulary; `advance(token)`.

    After `advance` the next mask is computed on a worker thread (llguidance releases the GIL), so it overlaps the
    model's decode step that comes between two tokens; `allowed()` waits for it."""

    def __init__(self, matcher: Any, vocab_size: int):
        import llguidance.numpy as lln

        self._matcher, self.vocab_size = matcher, vocab_size
        self._bits = lln.allocate_token_bitmask(1, vocab_size)  # (1, ceil(V / 32)) int32, bit i = token i allowed
        self._pointer, self._nbytes = self._bits.ctypes.data, self._bits.nbytes
        self._next: Future | None = None

    def _compute(self) -> None:
        self._matcher.unsafe_compute_mask_ptr(self._pointer, self._nbytes)  # what lln.fill_next_token_bitmask does

    def allowed(self) -> np.ndarray:
        if self._next is None:
            self._compute()
        else:
            self._next.result()
            self._next = None
        self._check()
        return np.unpackbits(self._bits[0].view(np.uint8), bitorder="little")[: self.vocab_size].astype(bool)

    def wait(self) -> None:
        """Block until the mask being computed for the next token is ready."""
        if self._next is not None:
            self._next.result()

    def advance(self, token: int) -> None:
        if self._next is not None:  # advanced without asking allowed(): the mask being computed is stale
            self._next.result()
            self._next = None
        self._matcher.consume_token(int(token))
        self._check()
        if not self._matcher.is_stopped():
            self._next = _masks().submit(self._compute)

    @property
    def complete(self) -> bool:
        """The text so far is a whole JSON value of the schema."""
        return self._matcher.is_accepting()

    def _check(self) -> None:
        if self._matcher.is_error():
            raise RuntimeError(f"the schema constraint failed: {self._matcher.get_error()}")


class Compiler:
    """Compiles schemas for one tokenizer and keeps the last CACHE_SIZE, keyed by their canonical JSON."""

    def __init__(self, tokenizer: Any, cache_size: int = CACHE_SIZE):
        from sqllava_edge.deps import require

        llguidance = require("llguidance", "runtime", "a JSON-schema answer")
        self._llguidance = llguidance
        self.vocab_size = tokenizer.vocab_size
        # ~0.4 s for 32000 tokens: once per tokenizer
        self._tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                                 eos_token=tokenizer.eos_id)
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.compiled = 0  # schemas compiled (cache misses)

    def compile(self, schema: Any) -> Grammar:
        schema = schema_dict(schema)
        key = canonical(schema)
        if len(key.encode()) > MAX_SCHEMA_BYTES:
            raise SchemaError(f"the schema is {len(key.encode()) >> 10} KiB, over the limit of "
                              f"{MAX_SCHEMA_BYTES >> 10} KiB; simplify it")
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        grammar = Grammar(schema, key, self._matcher(schema), self.vocab_size)
        with self._lock:
            self.compiled += 1
            self._cache[key] = grammar
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _matcher(self, schema: dict[str, Any]) -> Any:
        options = {"whitespace_flexible": False, "lenient": False}
        body = {**schema, "x-guidance": {**schema.get("x-guidance", {}), **options}}
        lark = 'start: SP? value\nSP: " "\nvalue: %json ' + json.dumps(body)
        matcher = self._llguidance.LLMatcher(self._tokenizer, lark, log_level=0)
        if matcher.is_error():
            raise SchemaError(_explain(matcher.get_error()))
        return matcher


def _explain(error: str) -> str:
    found = re.search(r"Unimplemented keys: \[([^\]]*)\]", error)
    if found:
        keys = [k.strip().strip('"') for k in found.group(1).split(",") if k.strip()]
        return (f"unsupported JSON-schema keyword(s) {keys}: the answer could not be held to them; remove them "
                f"(supported: {', '.join(SUPPORTED)})")
    return f"the schema cannot be compiled: {error.strip().splitlines()[0] if error.strip() else 'unknown error'}"


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _masks() -> ThreadPoolExecutor:
    """The worker threads that compute next-token masks while the model decodes (made on first use)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sqllava-edge-mask")
        return _executor


_compilers: "weakref.WeakKeyDictionary[Any, Compiler]" = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compiler(tokenizer: Any) -> Compiler:
    """The Compiler of `tokenizer` (one per tokenizer object, built on first use)."""
    with _compilers_lock:
        found = _compilers.get(tokenizer)
        if found is None:
            found = _compilers[tokenizer] = Compiler(tokenizer)
        return found


def compile_schema(tokenizer: Any, schema: Any) -> Grammar:
    """`schema` (dict, JSON string, Pydantic model class) -> Grammar for `tokenizer`, from the cache when seen."""
    return compiler(tokenizer).compile(schema)


def parse_answer(text: str, schema: Any) -> Any:
    """The constrained answer's text -> the parsed value (a Pydantic instance when `schema` is a model class)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StructuredOutputError(f"the answer is not complete JSON ({exc}); it probably hit max_new_tokens: "
                                    "raise it", text) from None
    if isinstance(schema, type) and hasattr(schema, "model_validate"):
        return schema.model_validate(value)
    return value


# ------------------------------------------------------------------------------------------------------------------
# Log-probabilities (OpenAI's logprobs shape), from the model's distribution


def token_logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """(log p(token), the `top` most likely (id, log p)) under log-softmax of the raw logits: the model's
    distribution, before temperature, top-k / top-p and any schema mask."""
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    shifted = x - x.max()
    logz = np.log(np.exp(shifted).sum())
    chosen = float(shifted[token] - logz)
    if top <= 0:
        return chosen, ()
    best = np.argpartition(-shifted, top - 1)[:top]
    best = best[np.argsort(-shifted[best], kind="stable")]
    return chosen, tuple((int(i), float(shifted[i] - logz)) for i in best)


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer: Any, token: int) -> bytes:
    """The bytes a SentencePiece token stands for ("▁" is a space, "<0x0A>" one byte)."""
    piece = tokenizer.backend.id_to_token(int(token)) or ""
    found = _BYTE_PIECE.fullmatch(piece)
    if found:
        return bytes([int(found.group(1), 16)])
    return piece.replace("▁", " ").encode("utf-8")
