"""The server's wire formats: OpenAI chat-completion requests in, prompts and sampling settings out; errors as
OpenAI's error object. Pure functions of the request body (and the tokenizer), so every rule here is testable
without a socket.

Rules (docs/serving.md, "What it accepts", says the same):
- `messages`: system turns (first, joined) replace the template's system prompt; user / assistant turns alternate
  (consecutive turns of one role are joined with a newline) and the last one is the user's.
- One image per conversation, in a user turn, as a data URI (`data:image/...;base64,...`). It goes where SQ-LLaVA
  was trained to see it: the start of the first user turn. `http(s)://` URLs are refused (the server never fetches);
  `file://` URLs and plain paths only under the directories named with --allowed-local-media-path.
- Sampling: temperature defaults to 0 (greedy, as SQ-LLaVA's evaluation), max_tokens to 512.
- Fields that would change the meaning of the answer and are not supported (tools, non-zero penalties, logit_bias,
  ...) are refused by name; unknown fields too, so nothing is silently ignored.
- Structured output (parse_structured): response_format json_object / json_schema (or llama-server's json_schema,
  vLLM's guided_json, ollama's format) give the schema the answer is held to; logprobs + top_logprobs (0-20).
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from sqllava_edge.generation import MAX_TOP_LOGPROBS, GenerationConfig

MAX_N = 8  # choices per request (each is a KV sequence)
MAX_STOP = 4  # stop strings, as OpenAI allows
DEFAULT_MAX_TOKENS = 512


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, checked before any work is done; each is a `sqllava-edge serve` flag, named in
    the error that enforces it."""

    max_text_chars: int = 200_000  # characters of message text in all (--max-text-chars); ~4 per token
    max_messages: int = 512  # messages per request (--max-messages)
    max_stop: int = MAX_STOP  # stop strings per request (--max-stop)
    max_stop_chars: int = 512  # characters per stop string (--max-stop-chars)

# Accepted and used; accepted because harmless; refused because they change what the answer means.
USED = {"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop",
        "n", "stream", "stream_options"}
HARMLESS = {"user", "metadata", "store", "service_tier", "modalities", "parallel_tool_calls", "prediction"}
UNSUPPORTED = {"tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs", "response_format",
               "logit_bias", "presence_penalty", "frequency_penalty", "audio", "reasoning_effort", "web_search_options",
               "min_p", "repeat_penalty"}
# (zero / false / null / "text" values of some unsupported fields mean "off" and are accepted)
_OFF_VALUES = {"logprobs": (False, None), "presence_penalty": (0, None), "frequency_penalty": (0, None),
               "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
               "tool_choice": (None, "none", "auto"), "top_logprobs": (None, 0), "modalities": (None,),
               "response_format": (None, {"type": "text"})}


class APIError(Exception):
    """An error the client caused or must handle, rendered as OpenAI's error object with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Conversation:
    """What a chat-completions request asks: turns (role, text), where the image goes, and a system prompt."""

    turns: list[tuple[str, str]]  # ("user" | "assistant", text); ends with a user turn
    system: str | None = None
    image: bytes | str | None = None  # raw bytes (data URI) or a local path (--allowed-local-media-path)


@dataclass
class ChatRequest:
    conversation: Conversation
    config: GenerationConfig
    n: int = 1
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    max_tokens_given: bool = False  # the client set max_tokens (else the default, cut to the room left)
    schema: dict[str, Any] | None = None  # the answer is held to this JSON schema (parse_structured)
    logprobs: int | None = None  # None: off; k: each token's logprob and its k most likely alternatives


# ----------------------------------------------------------------------------------------------------------------
# Fields


def check_fields(body: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    refused = sorted(k for k in body if k in UNSUPPORTED and body[k] not in _OFF_VALUES.get(k, ()))
    if refused:
        raise bad_request(f"unsupported field(s) {refused}: this server answers with text from one image conversation; "
                          "remove them", param=refused[0], code="unsupported_parameter")
    unknown = sorted(set(body) - allowed - HARMLESS - UNSUPPORTED)
    if unknown:
        raise bad_request(f"unknown field(s) {unknown}; accepted: {', '.join(sorted(allowed | HARMLESS))}",
                          param=unknown[0], code="unknown_parameter")
    return body


def _number(body: dict, name: str, lo: float, hi: float, default=None, *, integer: bool = False,
            lo_open: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise bad_request(f"{name} must be {kind}, got {value!r}", param=name)
    if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
        bounds = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise bad_request(f"{name} must be in {bounds}, got {value!r}", param=name)
    return value


def sampling(body: dict, *, default_temperature: float = 0.0, default_max: int = DEFAULT_MAX_TOKENS,
             max_tokens_limit: int = 1 << 20, limits: Limits = Limits()) -> tuple[GenerationConfig, int | None]:
    """GenerationConfig and seed from the OpenAI sampling fields (+ top_k)."""
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise bad_request("give max_tokens or max_completion_tokens, not both", param="max_tokens")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_new = _number(body, name, 1, max_tokens_limit, default_max, integer=True)
    temperature = _number(body, "temperature", 0, 2, default_temperature)
    top_p = _number(body, "top_p", 0, 1, 1.0)
    if top_p == 0:  # only the most likely token: greedy (OpenAI accepts 0)
        temperature, top_p = 0, 1.0
    top_k = _number(body, "top_k", 0, 1 << 20, 0, integer=True)
    seed = _number(body, "seed", -(1 << 63), (1 << 64) - 1, None, integer=True)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise bad_request(f"stop must be a string or a list of at most {limits.max_stop} strings", param="stop")
    if len(stops) > limits.max_stop:
        raise bad_request(f"{len(stops)} stop strings, over this server's limit of {limits.max_stop} (--max-stop)",
                          param="stop", code="too_many_stop_strings")
    if any(not s for s in stops):
        raise bad_request("stop strings must not be empty (an empty string would never match)", param="stop")
    longest = max(map(len, stops), default=0)
    if longest > limits.max_stop_chars:
        raise bad_request(f"a stop string of {longest} characters, over this server's limit of "
                          f"{limits.max_stop_chars} (--max-stop-chars); use a shorter one", param="stop",
                          code="stop_too_long")
    config = GenerationConfig(max_new_tokens=max_new, temperature=float(temperature), top_k=top_k,
                              top_p=float(top_p), stop=stops)
    return config, None if seed is None else int(seed) % (1 << 63)


# ----------------------------------------------------------------------------------------------------------------
# Messages


def parse_chat(body: Any, limits: Limits = Limits()) -> ChatRequest:
    body = check_fields(body, USED | STRUCTURED_FIELDS)
    conversation = parse_messages(body.get("messages"), limits)
    config, seed = sampling(body, limits=limits)
    n = _number(body, "n", 1, MAX_N, 1, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad_request("stream must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        raise bad_request("stream_options accepts {\"include_usage\": bool}", param="stream_options")
    if body.get("stream_options") is not None and not stream:
        raise bad_request("stream_options is only allowed with \"stream\": true", param="stream_options")
    model = body.get("model", "")
    if not isinstance(model, str):
        raise bad_request("model must be a string", param="model")
    given = body.get("max_tokens") is not None or body.get("max_completion_tokens") is not None
    schema, logprobs = parse_structured(body)
    return ChatRequest(conversation, config, n, seed, bool(stream), bool(options.get("include_usage")), model,
                       max_tokens_given=given, schema=schema, logprobs=logprobs)


# ----------------------------------------------------------------------------------------------------------------
# Structured output and logprobs

# OpenAI's response_format / logprobs / top_logprobs, llama-server's json_schema, vLLM's guided_json and ollama's
# format (on its OpenAI-style requests) are used, not refused.
STRUCTURED_FIELDS = {"response_format", "logprobs", "top_logprobs", "json_schema", "guided_json", "format"}
UNSUPPORTED -= STRUCTURED_FIELDS


def parse_structured(body: dict) -> tuple[dict[str, Any] | None, int | None]:
    """(JSON schema the answer must follow or None, top_logprobs count or None when logprobs are off)."""
    from sqllava_edge.structured import JSON_OBJECT

    given = [name for name in ("response_format", "json_schema", "guided_json", "format") if body.get(name) is not None]
    if len(given) > 1:
        raise bad_request(f"give one of {given}, not several: each sets the answer's schema", param=given[1])
    schema = None
    if given == ["response_format"]:
        schema = _response_format(body["response_format"])
    elif given:
        name = given[0]
        value = body[name]
        if name == "format" and value == "json":  # ollama
            schema = dict(JSON_OBJECT)
        elif isinstance(value, str) and name != "format":
            try:
                schema = json.loads(value)
            except json.JSONDecodeError:
                raise bad_request(f"{name} must be a JSON schema (an object or its JSON text)", param=name) from None
        else:
            schema = value
        if not isinstance(schema, dict):
            raise bad_request(f"{name} must be a JSON schema object" + (" or \"json\"" if name == "format" else ""),
                              param=name)
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise bad_request("logprobs must be true or false", param="logprobs")
    top = _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, None, integer=True)
    if top is not None and top > 0 and not logprobs:
        raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
    return schema, (int(top or 0) if logprobs else None)


def _response_format(value: Any) -> dict[str, Any] | None:
    from sqllava_edge.structured import JSON_OBJECT

    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return dict(JSON_OBJECT)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}',
                              param="response_format")
        schema = spec.get("schema", JSON_OBJECT)
        if not isinstance(schema, dict):
            raise bad_request("response_format.json_schema.schema must be a JSON-schema object",
                              param="response_format")
        return dict(schema)
    raise bad_request('response_format must be {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                      '"json_schema": {"name": ..., "schema": {...}, "strict": true}}', param="response_format")


def parse_messages(messages: Any, limits: Limits = Limits()) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {role, content} objects", param="messages")
    if len(messages) > limits.max_messages:
        raise bad_request(f"{len(messages)} messages, over this server's limit of {limits.max_messages} "
                          "(--max-messages); send a shorter history", param="messages", code="too_many_messages")
    system: list[str] = []
    turns: list[tuple[str, list[str]]] = []  # same-role messages gathered, joined once at the end (linear time)
    image, chars = None, 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or "role" not in message:
            raise bad_request(f"{where} must be an object with a role and content", param=where)
        role = message["role"]
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise bad_request(f"{where}.role {role!r} is not supported; use system, user or assistant", param=where)
        text, found = _content(message.get("content"), where)
        chars += len(text)
        if chars > limits.max_text_chars:
            raise bad_request(f"the messages hold over {limits.max_text_chars:,} characters of text, this server's "
                              "limit (--max-text-chars); send a shorter conversation", param="messages",
                              code="text_too_long")
        if found is not None:
            if role != "user":
                raise bad_request(f"{where}: only user messages may carry an image", param=where)
            if image is not None:
                raise bad_request("SQ-LLaVA takes one image per conversation; this one has more", param=where)
            image = found
        if role == "system":
            if turns:
                raise bad_request(f"{where}: system messages go before the conversation", param=where)
            system.append(text)
        elif turns and turns[-1][0] == role:
            turns[-1][1].append(text)
        else:
            turns.append((role, [text]))
    turns = [(role, "\n".join(texts)) for role, texts in turns]
    if not turns or turns[0][0] != "user":
        raise bad_request("the conversation must start with a user message (after any system messages)",
                          param="messages")
    if turns[-1][0] != "user":
        raise bad_request("the last message must be the user's: the model answers it", param="messages")
    if any(not text.strip() for role, text in turns if role == "user") and image is None:
        raise bad_request("a user message is empty; ask something", param="messages")
    return Conversation(turns, "\n".join(system) if system else None, image)


def _content(content: Any, where: str) -> tuple[str, Any]:
    """(text, image or None) of one message's content: a string, or a list of text / image_url parts."""
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of parts", param=where)
    texts, image = [], None
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise bad_request(f"{where}.content[{j}].image_url must be {{\"url\": \"data:image/...\"}}", param=where)
            if image is not None:
                raise bad_request("SQ-LLaVA takes one image per conversation; this one has more", param=where)
            image = url
        else:
            raise bad_request(f"{where}.content[{j}] must be {{\"type\": \"text\", \"text\": ...}} or "
                              "{\"type\": \"image_url\", \"image_url\": {\"url\": ...}}", param=where)
    return "\n".join(texts), image


_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.ASCII)


def image_source(url: str, *, max_bytes: int, media_paths: tuple[str, ...] = (), param: str = "messages"
                 ) -> bytes | str:
    """An image URL as the client sent it -> raw bytes (data URI) or the real path of a file under one of
    `media_paths` (sqllava_edge.serve.security.local_media_path); APIError otherwise."""
    match = _DATA_URI.match(url)
    if match:
        mime = (match.group("mime") or "").lower()
        if not mime.startswith("image/"):
            raise bad_request(f"the data URI holds {mime or 'no media type'}, not an image; send "
                              "data:image/png;base64,... (or jpeg, webp)", param=param, code="invalid_image")
        if not match.group("b64"):
            raise bad_request("image data URIs must be base64 (data:image/png;base64,...)", param=param,
                              code="invalid_image")
        payload = url[match.end():]
        if len(payload) * 3 // 4 > max_bytes + 3:
            raise too_large(len(payload) * 3 // 4, max_bytes)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request("the image data URI is not valid base64 (truncated or corrupted?)", param=param,
                              code="invalid_image") from None
        if not data:
            raise bad_request("the image is empty (0 bytes)", param=param, code="invalid_image")
        if len(data) > max_bytes:
            raise too_large(len(data), max_bytes)
        return data
    if url.startswith(("http://", "https://")):
        raise bad_request("the server does not fetch image URLs: download the image and send its bytes as a data URI "
                          "(data:image/jpeg;base64,...)", param=param, code="invalid_image")
    if not media_paths:
        raise bad_request("local image paths are off on this server (start it with --allowed-local-media-path DIR); "
                          "send the bytes as a data URI (data:image/png;base64,...)", param=param, code="invalid_image")
    from sqllava_edge.serve.security import MediaPathError, local_media_path

    try:
        path = local_media_path(url, media_paths)
    except MediaPathError as exc:
        raise bad_request(str(exc), param=param, code="invalid_image") from None
    if os.path.getsize(path) > max_bytes:
        raise too_large(os.path.getsize(path), max_bytes)
    return path


def data_uri(image, mime: str = "image/png") -> str:
    """The client side of image_source: encoded image bytes (or a PIL image, saved as PNG) -> a data URI."""
    if not isinstance(image, (bytes, bytearray)):
        import io

        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        image, mime = buffer.getvalue(), "image/png"
    return f"data:{mime};base64," + base64.b64encode(bytes(image)).decode()


def too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the image is {size / 2**20:.1f} MiB, over this server's limit of {limit / 2**20:.1f} MiB "
                         "(--max-image-mb); downscale or re-encode it (JPEG) before sending",
                    code="image_too_large")


# ----------------------------------------------------------------------------------------------------------------
# The self-questions extension


SELF_QUESTION_FIELDS = {"image", "n", "seed", "answer", "model", "max_tokens", "temperature", "top_p", "top_k"}


@dataclass
class SelfQuestionRequest:
    image: str
    n: int
    seed: int | None
    answer: bool
    config: GenerationConfig
    answer_tokens: int | None = None  # max_tokens applies to the questions and to each answer


def parse_self_questions(body: Any, defaults: GenerationConfig) -> SelfQuestionRequest:
    body = check_fields(body, SELF_QUESTION_FIELDS)
    image = body.get("image")
    if not isinstance(image, str):
        raise bad_request("image must be a data URI string (data:image/png;base64,...)", param="image")
    n = _number(body, "n", 1, MAX_N, 3, integer=True)
    answer = body.get("answer", False)
    if not isinstance(answer, bool):
        raise bad_request("answer must be true or false", param="answer")
    config, seed = sampling(body, default_temperature=defaults.temperature, default_max=defaults.max_new_tokens)
    config = config.replace(top_k=body.get("top_k", defaults.top_k), top_p=body.get("top_p", defaults.top_p))
    return SelfQuestionRequest(image, n, seed, answer, config, body.get("max_tokens"))
