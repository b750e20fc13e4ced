"""Structured answers: JSON-schema constrained decoding in the one Sampler, and logprobs, through the Python API, the
CLI and the OpenAI-compatible server (official `openai` client), on the real 32000-token Llama-2 vocabulary and the
tiny random-weight bundle (tests/serve_helpers.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import httpx
import numpy as np
import pytest

from tests.serve_helpers import ROOT, THREADS, ServerThread, data_uri, image, serving

pytest.importorskip("llguidance", reason="structured answers need llguidance (pip install '.[runtime]')")
jsonschema = pytest.importorskip("jsonschema", reason="outputs are checked with jsonschema (pip install '.[dev]')")
openai = pytest.importorskip("openai", reason="the server tests use the official client (pip install '.[dev]')")

from sqllava_edge.generation import GenerationConfig, Sampler  # noqa: E402
from sqllava_edge.structured import (Compiler, SchemaError, StructuredOutputError, compile_schema,  # noqa: E402
                                     parse_answer, token_bytes, token_logprobs)

OBJECTS = {"type": "object", "additionalProperties": False, "required": ["objects", "door_open"], "properties": {
    "objects": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "additionalProperties": False, "required": ["label", "colour"], "properties": {
            "label": {"type": "string", "maxLength": 12},
            "colour": {"enum": ["red", "green", "blue"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 9},
            "size": {"type": "number", "minimum": 0, "maximum": 1}}}},
    "door_open": {"type": "boolean"},
    "note": {"type": "string", "maxLength": 6}}}


@pytest.fixture(scope="module")
def tok():
    from sqllava_edge.tokenizer import default_tokenizer

    return default_tokenizer()


def _run(sampler: Sampler, tok, rng, steps: int = 400) -> tuple[list[int], bool]:
    """Feed random logits to `sampler` until EOS -> (tokens without EOS, ended with EOS)."""
    ids = []
    for _ in range(steps):
        token = sampler(rng.standard_normal(tok.vocab_size).astype(np.float32) * 3)
        if token == tok.eos_id:
            return ids, True
        ids.append(token)
    return ids, False


# --------------------------------------------------------------------------------------------------------------------
# The mask in the Sampler


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_sampler_keeps_random_logits_to_the_schema_and_ends_with_eos(tok, temperature):
    grammar = compile_schema(tok, OBJECTS)
    for seed in range(4):
        sampler = Sampler(GenerationConfig(temperature=temperature, top_k=50 if seed % 2 else 0, grammar=grammar),
                          seed=seed)
        ids, ended = _run(sampler, tok, np.random.default_rng(seed))
        assert ended, tok.decode(ids)
        jsonschema.validate(json.loads(tok.decode(ids)), OBJECTS)


def test_eos_is_allowed_exactly_when_the_json_is_complete(tok):
    grammar = compile_schema(tok, {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                                          "maximum": 50}}, "required": ["n"]})
    constraint = grammar.constraint()
    ids = tok.encode('{"n":42}')
    for i, token in enumerate(ids):
        allowed = constraint.allowed()
        assert allowed[token] and not allowed[tok.eos_id], tok.decode(ids[:i])
        constraint.advance(token)
    allowed = constraint.allowed()
    assert allowed[tok.eos_id] and allowed.sum() == 1  # after "}" only EOS


def test_the_masked_greedy_choice_is_the_best_allowed_token(tok):
    grammar = compile_schema(tok, {"enum": ["yes", "no"]})
    logits = np.zeros(tok.vocab_size, np.float32)
    logits[tok.encode("maybe")[0]] = 10.0  # the unconstrained favourite is not allowed
    allowed = grammar.constraint().allowed()
    best_allowed = int(np.argmax(np.where(allowed, logits + np.arange(tok.vocab_size) * 1e-6, -np.inf)))
    sampler = Sampler(GenerationConfig(grammar=grammar))
    assert sampler(logits + np.arange(tok.vocab_size, dtype=np.float32) * 1e-6) == best_allowed


def test_unsupported_keywords_are_named_and_bad_schemas_refused(tok):
    with pytest.raises(SchemaError, match="uniqueItems"):
        compile_schema(tok, {"type": "array", "uniqueItems": True})
    with pytest.raises(SchemaError, match="strin"):
        compile_schema(tok, {"type": "strin"})
    with pytest.raises(SchemaError, match="over the limit"):
        compile_schema(tok, {"enum": ["x" * 100] * 1000})
    with pytest.raises(SchemaError, match="Pydantic"):
        compile_schema(tok, [1, 2])


def test_compiled_schemas_are_cached_by_canonical_json_with_a_bound(tok):
    compiler = Compiler(tok, cache_size=2)
    first = compiler.compile({"type": "object", "properties": {"a": {"type": "integer"}}})
    assert compiler.compile('{"properties": {"a": {"type": "integer"}}, "type": "object"}') is first
    compiler.compile({"type": "integer"})
    compiler.compile({"type": "boolean"})  # evicts the first (least recently used)
    assert compiler.compiled == 3 and len(compiler._cache) == 2
    assert compiler.compile({"type": "object", "properties": {"a": {"type": "integer"}}}) is not first


def test_pydantic_models_give_instances_and_cut_answers_keep_their_text(tok):
    from pydantic import BaseModel

    class Box(BaseModel):
        colour: str
        count: int

    assert parse_answer(' {"colour":"red","count":2}', Box) == Box(colour="red", count=2)
    with pytest.raises(StructuredOutputError) as info:
        parse_answer('{"colour":"re', Box)
    assert info.value.text == '{"colour":"re'


def test_logprobs_are_the_log_softmax_of_the_raw_logits(tok):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(tok.vocab_size).astype(np.float32) * 4
    reference = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    chosen, top = token_logprobs(logits, 7, 5)
    assert chosen == pytest.approx(reference[7], abs=1e-9)
    assert [t for t, _ in top] == list(np.argsort(-reference)[:5])
    assert [lp for _, lp in top] == pytest.approx(np.sort(reference)[::-1][:5], abs=1e-9)
    sampler = Sampler(GenerationConfig(temperature=0.7, logprobs=3), seed=1)
    token = sampler(logits)
    assert sampler.last_logprobs[0] == pytest.approx(reference[token], abs=1e-9)  # before temperature
    assert token_bytes(tok, tok.encode("\n")[-1]) == b"\n" and token_bytes(tok, tok.encode("the")[0]) == b" the"
    with pytest.raises(ValueError, match="logprobs"):
        GenerationConfig(logprobs=21)


# --------------------------------------------------------------------------------------------------------------------
# Python API and CLI (llama.cpp on the tiny bundle)


@pytest.fixture(scope="module")
def assistant(tiny_bundle):
    from sqllava_edge.assistant import Assistant

    a = Assistant.load(tiny_bundle, vision_precision="fp32", n_threads=THREADS)
    yield a
    a.close()


def test_ask_chat_stream_and_interview_follow_the_schema(assistant):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        colour: Literal["red", "green", "blue"]
        count: int = Field(ge=0, le=9)

    value = assistant.ask(image(0), "What is in the image?", schema=OBJECTS, max_new_tokens=300)
    jsonschema.validate(value, OBJECTS)
    text = "".join(assistant.stream(image(0), "What is in the image?", schema=OBJECTS, max_new_tokens=300))
    assert json.loads(text) == value
    model = assistant.ask(image(1), "Colour and count?", schema=Answer, max_new_tokens=300)
    assert isinstance(model, Answer)
    chat = assistant.chat(image(2))
    jsonschema.validate(chat.ask("Objects?", schema=OBJECTS, max_new_tokens=300), OBJECTS)
    assert isinstance(chat.ask("And now?", max_new_tokens=4), str)
    exchanges = assistant.interview(image(3), n=2, seed=0, max_new_tokens=6, max_answer_tokens=300,
                                    schema={"type": "object", "properties": {"yes": {"type": "boolean"}},
                                            "required": ["yes"], "additionalProperties": False})
    assert all(isinstance(e.answer["yes"], bool) for e in exchanges)
    with pytest.raises(StructuredOutputError):
        assistant.ask(image(0), "What is in the image?", schema=OBJECTS, max_new_tokens=3)
    with pytest.raises(SchemaError, match="uniqueItems"):
        assistant.ask(image(0), "?", schema={"type": "array", "uniqueItems": True})


def test_cli_json_schema_prints_json_that_validates(tiny_bundle, tmp_path, capsys):
    from sqllava_edge import cli

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(OBJECTS))
    picture = tmp_path / "x.png"
    image(0).save(picture)
    common = ["ask", str(tiny_bundle), str(picture), "Objects?", "--threads", str(THREADS), "--vision-precision", "fp32"]
    assert cli.main([*common, "--json-schema", str(schema), "--max-new-tokens", "300"]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), OBJECTS)
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "array", "uniqueItems": true}')
    assert cli.main([*common, "--json-schema", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "uniqueItems" in err and len(err.strip().splitlines()) == 1, err


# --------------------------------------------------------------------------------------------------------------------
# The server


@pytest.fixture(scope="module")
def server(tiny_bundle):
    with serving(tiny_bundle, parallel=4) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _messages(i: int, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": {"url": data_uri(image(i))}}]}]


def test_openai_parse_returns_a_pydantic_instance(client):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Thing(BaseModel):
        label: str = Field(max_length=10)
        colour: Literal["red", "green", "blue"]
        count: int = Field(ge=0, le=20)
        seen: bool

    completion = client.chat.completions.parse(model="m", messages=_messages(0, "Describe one object."),
                                               response_format=Thing, max_tokens=400)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Thing)


def test_json_object_mode_streamed_and_not(client):
    # any JSON object: a random-weight model rarely closes a free string, so this image's greedy answer (which does)
    # is the case; the schema tests below cover closing under every other kind of value
    ask = dict(model="m", messages=_messages(0, "Answer in JSON."), max_tokens=200,
               response_format={"type": "json_object"})
    response = client.chat.completions.create(**ask)
    assert response.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(response.choices[0].message.content), dict)
    stream = client.chat.completions.create(**ask, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
        response.choices[0].message.content


def test_constrained_server_answers_equal_the_python_api_token_for_token(client, assistant):
    from runtimes.scheduler import Request
    from runtimes.tasks import tokens as generated
    from sqllava_edge.conversation import answer_prompt

    for i, schema in enumerate([OBJECTS, {"enum": ["red", "green", "blue"]}]):
        question = "Which objects are there?"
        response = client.chat.completions.create(
            model="m", messages=_messages(i, question), max_tokens=300, logprobs=True,
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}})
        config = GenerationConfig(max_new_tokens=300, grammar=compile_schema(assistant.tokenizer, schema))
        ids = answer_prompt(assistant.tokenizer, question, assistant.template)
        tokens = list(generated(assistant.scheduler, Request(ids, image(i), config)))
        served = [bytes(entry.bytes) for entry in response.choices[0].logprobs.content]
        assert served == [token_bytes(assistant.tokenizer, t) for t in tokens]
        assert response.choices[0].finish_reason == "stop"
        assert json.loads(response.choices[0].message.content) == assistant.ask(image(i), question, schema=schema,
                                                                                max_new_tokens=300)


def test_logprobs_have_openais_shape_streamed_and_not(client):
    response = client.chat.completions.create(model="m", messages=_messages(2, "What is it?"), max_tokens=6,
                                              logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == 6
    text = ""
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3 and isinstance(entry.bytes, list)
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-9  # greedy: the chosen token is the top one
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        text += bytes(entry.bytes).decode("utf-8", errors="replace")
    assert text.strip() == response.choices[0].message.content
    stream = client.chat.completions.create(model="m", messages=_messages(2, "What is it?"), max_tokens=6,
                                            logprobs=True, top_logprobs=3, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)  # prefix reused
    plain = client.chat.completions.create(model="m", messages=_messages(2, "What is it?"), max_tokens=2)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("body, status, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, 400, "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "enum": ["a" * 200] * 400}}}}, 400, "over the limit"),
    ({"response_format": {"type": "xml"}}, 400, "response_format"),
    ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"top_logprobs": 2}, 400, "logprobs: true"),
    ({"response_format": {"type": "json_object"}, "guided_json": {"type": "object"}}, 400, "not several"),
])
def test_bad_structured_requests_get_400_naming_the_problem(server, body, status, message):
    response = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}], **body})
    assert response.status_code == status and message in response.json()["error"]["message"], response.text


def test_a_schema_too_slow_to_compile_gets_400_and_the_server_keeps_serving(server, monkeypatch):
    from sqllava_edge.serve import app

    monkeypatch.setattr(app, "COMPILE_TIMEOUT", 0.0)  # nothing compiles in no time
    body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "properties": {"never_seen_before": {"type": "integer"}}}}}}
    response = httpx.post(server.url + "/v1/chat/completions", timeout=60, json=body)
    assert response.status_code == 400 and "took over" in response.json()["error"]["message"], response.text
    monkeypatch.setattr(app, "COMPILE_TIMEOUT", 10.0)
    assert httpx.post(server.url + "/v1/chat/completions", timeout=60, json=body).status_code == 200


def test_a_failing_constraint_ends_its_own_request_only(assistant):
    from runtimes.scheduler import Request, Scheduler
    from sqllava_edge.conversation import answer_prompt

    class Broken:  # a grammar whose parser state fails at the first token
        def constraint(self):
            raise RuntimeError("the schema constraint failed: broken on purpose")

    class Late:  # fails at the third token, after the request started streaming
        def constraint(self):
            grammar, steps = compile_schema(assistant.tokenizer, {"type": "string", "maxLength": 50}), [0]
            inner = grammar.constraint()

            class Failing:
                def allowed(self):
                    steps[0] += 1
                    if steps[0] == 3:
                        raise RuntimeError("the schema constraint failed: late on purpose")
                    return inner.allowed()

                def advance(self, token):
                    inner.advance(token)
            return Failing()

    ids = answer_prompt(assistant.tokenizer, "What is it?", assistant.template)
    events: dict[str, list] = {"good": [], "late": []}
    scheduler = Scheduler(assistant.engine, parallel=2)
    try:
        with pytest.raises(RuntimeError, match="broken on purpose"):
            Sampler(GenerationConfig(grammar=Broken()))
        good = scheduler.submit(Request(ids, image(0), GenerationConfig(max_new_tokens=8),
                                        on_event=events["good"].append))
        late = scheduler.submit(Request(ids, image(1), GenerationConfig(max_new_tokens=8, grammar=Late()),
                                        on_event=events["late"].append))
        assert good.finished.wait(120) and late.finished.wait(120)
    finally:
        scheduler.shutdown()
    assert [e.kind for e in events["late"]][-1] == "error" and "late on purpose" in str(events["late"][-1].error)
    assert sum(e.kind == "token" and e.token >= 0 for e in events["good"]) == 8
    assert [e.kind for e in events["good"]][-1] == "done"


def test_llama_server_vllm_and_ollama_style_fields(server):
    for field, value in [("json_schema", {"enum": ["yes", "no"]}), ("guided_json", '{"enum": ["yes", "no"]}'),
                         ("format", "json"), ("response_format", {"type": "text"})]:
        response = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
            "model": "m", "max_tokens": 200, "messages": _messages(0, "Yes or no?"), field: value})
        assert response.status_code == 200, response.text
        content = response.json()["choices"][0]["message"]["content"]
        if field == "format":
            assert isinstance(json.loads(content), dict)
        elif field != "response_format":
            assert json.loads(content) in ("yes", "no")


# --------------------------------------------------------------------------------------------------------------------
# Logprobs against the PyTorch backend's logits


def test_logprobs_equal_the_log_softmax_of_the_torch_engines_logits(tiny_bundle):
    pytest.importorskip("torch", reason="the PyTorch backend needs torch (pip install '.[torch]')")
    from sqllava_edge.assistant import Assistant
    from sqllava_edge.conversation import answer_prompt
    from sqllava_edge.serve.app import Settings

    ckpt = tiny_bundle.parent / "ckpt"
    if not ckpt.is_dir():
        pytest.skip("the tiny bundle was given by $SQLLAVA_EDGE_TEST_BUNDLE without its checkpoint")
    server = ServerThread(lambda: Assistant.load(ckpt), Settings()).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        response = client.chat.completions.create(
            model="m", messages=_messages(4, "Which objects?"), max_tokens=16, logprobs=True, top_logprobs=2,
            response_format={"type": "json_schema", "json_schema": {"name": "o", "schema": OBJECTS}})
        reference = server.state.assistant  # the same engine, after the request: recompute its logits
        assert reference.llm.name == "torch"
        with reference.engine.lock:
            tok = reference.tokenizer
            items = reference.engine.items(image(4), answer_prompt(tok, "Which objects?", reference.template))
            seq, logits = reference.engine.pool.prefill(items)
            try:
                entries = response.choices[0].logprobs.content
                assert len(entries) == response.usage.completion_tokens > 0
                replay = Sampler(GenerationConfig(grammar=compile_schema(tok, OBJECTS)))  # the engine's choices
                for entry in entries:
                    token = replay(logits)
                    x = logits.astype(np.float64)
                    log_softmax = x - x.max() - np.log(np.exp(x - x.max()).sum())
                    assert bytes(entry.bytes) == token_bytes(tok, token)
                    assert entry.logprob == pytest.approx(log_softmax[token], abs=1e-4)
                    logits = reference.engine.pool.decode({seq: token})[seq]
            finally:
                reference.engine.pool.done(seq)
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------------------------------
# Property: random schemas from the supported subset, sampled at temperature 1


def _schemas():
    from hypothesis import strategies as st

    words = st.text(alphabet="abcdefgh", min_size=1, max_size=6)
    leaf = st.one_of(
        st.just({"type": "boolean"}),
        st.tuples(st.integers(-50, 50), st.integers(0, 100)).map(
            lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}),
        st.tuples(st.integers(-5, 5), st.integers(1, 10)).map(
            lambda t: {"type": "number", "minimum": t[0], "maximum": t[0] + t[1]}),
        st.integers(1, 8).map(lambda n: {"type": "string", "maxLength": n}),
        st.lists(words, min_size=1, max_size=4, unique=True).map(lambda v: {"enum": v}),
    )

    def objects(children):
        return st.dictionaries(words, children, min_size=1, max_size=3).flatmap(
            lambda props: st.sets(st.sampled_from(sorted(props)), max_size=len(props)).map(
                lambda required: {"type": "object", "properties": props, "required": sorted(required),
                                  "additionalProperties": False}))

    def arrays(children):
        return st.tuples(children, st.integers(0, 2), st.integers(0, 2)).map(
            lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1] + t[2]})

    return st.recursive(leaf, lambda children: st.one_of(objects(children), arrays(children)), max_leaves=6)


def test_random_schemas_sampled_at_temperature_1_always_validate_and_end_with_eos(server):
    hypothesis = pytest.importorskip("hypothesis", reason="property test (pip install '.[dev]')")

    @hypothesis.settings(max_examples=25, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(schema=_schemas(), seed=hypothesis.strategies.integers(0, 1000))
    def check(schema, seed):
        response = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
            "model": "m", "max_tokens": 600, "temperature": 1.0, "seed": seed,
            "messages": [{"role": "user", "content": "Describe the scene as JSON."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "stop", (schema, choice)
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)

    check()


# --------------------------------------------------------------------------------------------------------------------
# The demo's structured answer (its accuracy on the trained demo bundle comes from `make demo`)


def test_the_training_json_answers_are_token_for_token_what_the_schema_decoder_allows(tok):
    """The JSON answers of the synthetic stage-2 data, tokenized as training renders them, pass the compiled schema's
    mask at every token and complete it right before the EOS they are trained to end with: the mask never forces
    the trained model off the answers it learned (the spaced form json.dumps writes by default would be cut off)."""
    from sqllava_edge.conversation import Turn, tokenize_conversation
    from training.synthetic import JSON_SCHEMAS, json_question, sample_scene

    def passes(schema: dict, ids: list[int]) -> bool:
        constraint = compile_schema(tok, schema).constraint()
        for token in ids:
            if not constraint.allowed()[token]:
                return False
            constraint.advance(token)
        return constraint.complete

    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(40):
        item = json_question(sample_scene(rng, held_out=False, grid=8), rng)
        conv = tokenize_conversation(tok, "v1_sq", [Turn("user", item["question"], image=True),
                                                    Turn("assistant", item["answer"])], has_image=True)
        answer = [i for i, label in zip(conv.ids, conv.labels) if label != -100]
        kind = "count" if '"count"' in item["answer"] else "object"
        kinds.add(kind)
        assert answer[-1] == tok.eos_id and passes(JSON_SCHEMAS[kind], answer[:-1]), item
    assert kinds == {"object", "count"}
    spaced = tok.encode('{"colour": "red", "shape": "star"}')
    assert not passes(JSON_SCHEMAS["object"], spaced)
    # Inside a JSON string a value is spelled with other tokens than the free-text answer: "red" after a quote is
    # `red`, the answer " red" is `▁red` (so a model must learn the in-string spellings to fill a schema's fields).
    assert tok.encode('{"colour":"red"')[-1] != tok.encode("red")[0]


def test_the_demo_prints_a_constrained_answer_and_both_accuracies(assistant, tmp_path, capsys):
    import importlib.util

    subprocess.run([sys.executable, "-m", "training.synthetic", str(tmp_path / "data"), "--n-train", "2",
                    "--n-eval", "6", "--seed", "0"], cwd=ROOT, check=True, capture_output=True)
    spec = importlib.util.spec_from_file_location("demo_script_structured", ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = demo
    spec.loader.exec_module(demo)
    samples = json.loads((tmp_path / "data" / "eval.json").read_text())
    result = demo.show_structured(assistant, samples, tmp_path / "data" / "images", n_images=3)
    out = capsys.readouterr().out
    assert result["fields"] == 6 and 0 <= result["structured"] <= 1 and 0 <= result["free_text"] <= 1
    assert result["target_met"] == (result["structured"] >= result["free_text"])
    assert "schema answer: {" in out and "JSON schema" in out and "free text" in out
    assert "Q: Answer in JSON: what are the colour and shape of the " in out  # the form the model was trained on
    assert f"target JSON schema >= free text: {'met' if result['target_met'] else 'NOT met'}" in out


def test_the_benchmark_runs_side_by_side_and_writes_its_report(tiny_bundle, tmp_path):
    from benchmarks import structured

    assert structured.main(["--bundle", str(tiny_bundle), "--rounds", "1", "--new-tokens", "8", "--repeats", "1",
                            "--threads", str(THREADS), "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "structured.json").read_text())
    assert sorted(s["constrained"] for s in data["samples"]) == [False, True]
    assert data["engines"][0]["engine"].startswith("llguidance") and data["engines"][0]["compile_ms"] > 0
    report = (tmp_path / "structured.md").read_text()
    assert "| nested schema |" in report and "llguidance" in report and "xgrammar" in report
