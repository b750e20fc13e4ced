"""The tiny bundle's answers do not move when the generation code is reorganised: what every front door (the Python
API, the OpenAI-compatible server, the command line) returns for a fixed set of calls, and the sha256 of every
exported artifact, compared EXACTLY with tests/golden/tiny_bundle.json.

The bundle is the session's random-weight tiny bundle (tests/serve_helpers.make_tiny_bundle: fixed seeds, fp32 vision
ONNX, f32 GGUF); every load uses one llama.cpp thread and rule-based backend selection (conftest sets
SQLLAVA_EDGE_TUNE=0). Server responses are normalised: ids, `created` and timing fields are dropped; text,
finish_reason and usage token counts are kept, floats (logprobs) rounded to 5 decimals. All server requests run in
one fixed order on a fresh server, because a logprob depends (in its last digits) on which prefix the KV cache
reused. The stop string of the stop-string cases is stored in the JSON (taken from the greedy answer when recording).

Artifact hashes pin the exporter's bytes; they are a function of the installed torch / onnx / gguf versions too, so
an upgrade of those moves them (re-record, and say so in the commit).

A deliberate change of the answers re-records the file (atomically: a temporary file, then a rename), one section per
test: SQLLAVA_EDGE_RECORD_GOLDEN=1 python -m pytest tests/test_golden_outputs.py (and say in the commit why).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serve_helpers import ROOT, THREADS, data_uri, image, serving

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny_bundle.json"
RECORD = bool(os.environ.get("SQLLAVA_EDGE_RECORD_GOLDEN"))
N = 12  # new tokens per answer
QUESTIONS = ["What is in the picture?", "What colour is the sky?"]
IMAGES = [0, 1]
SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 9},
                                           "seen": {"type": "boolean"}},
          "required": ["colour", "count", "seen"], "additionalProperties": False}
SCHEMA_TOKENS = 64  # room for the whole object: a cut one raises StructuredOutputError
DROPPED = {"id", "created", "system_fingerprint"}  # per-request values, not behaviour


# --------------------------------------------------------------------------------------------------------------------
# Recording and comparing


def _golden() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}


def _differences(expected, got, where: str = "") -> list[str]:
    """Readable differences: one line per differing leaf, `path: expected X, got Y`."""
    if isinstance(expected, dict) and isinstance(got, dict):
        lines = []
        for key in sorted(set(expected) | set(got), key=str):
            path = f"{where}.{key}" if where else str(key)
            if key not in got:
                lines.append(f"{path}: expected {expected[key]!r}, missing")
            elif key not in expected:
                lines.append(f"{path}: not expected, got {got[key]!r}")
            else:
                lines += _differences(expected[key], got[key], path)
        return lines
    if isinstance(expected, list) and isinstance(got, list) and len(expected) == len(got):
        return [line for i, (e, g) in enumerate(zip(expected, got)) for line in _differences(e, g, f"{where}[{i}]")]
    return [] if expected == got and type(expected) is type(got) else [f"{where}: expected {expected!r}, got {got!r}"]


def check(section: str, got: dict) -> None:
    """Record `got` as the golden `section` (SQLLAVA_EDGE_RECORD_GOLDEN=1), or compare it exactly with the record."""
    got = json.loads(json.dumps(got))  # tuples -> lists, int keys -> str: what the file holds
    if RECORD:
        from sqllava_edge.fileutil import atomic_write

        data = {**_golden(), section: got}
        with atomic_write(GOLDEN, "w") as handle:
            json.dump(data, handle, indent=1, ensure_ascii=False, sort_keys=True)
            handle.write("\n")
        return
    golden = _golden()
    assert section in golden, f"{GOLDEN.name} has no {section!r}; record it: SQLLAVA_EDGE_RECORD_GOLDEN=1 pytest {__file__}"
    differences = _differences(golden[section], got, section)
    assert not differences, "the outputs moved from the golden record:\n  " + "\n  ".join(differences)


def recorded(section: str, key: str, record_value):
    """A value chosen at record time (e.g. a stop string cut from a greedy answer): stored, then read back."""
    return record_value() if RECORD else _golden()[section][key]


def _normalise(value):
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()
                if k not in DROPPED and not k.endswith(("_seconds", "_ms", "_time"))}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    if isinstance(value, float):
        return round(value, 5)
    return value


# --------------------------------------------------------------------------------------------------------------------
# The Python API


@pytest.fixture(scope="module")
def assistant(tiny_bundle):
    from sqllava_edge.assistant import Assistant

    a = Assistant.load(tiny_bundle, vision_precision="fp32", n_threads=THREADS, tune=False)
    yield a
    a.close()


@pytest.fixture(scope="module")
def python_api(assistant) -> dict:
    """Every Assistant call, in one fixed order."""
    out: dict = {"ask": {}, "stream": {}}
    for i in IMAGES:
        for question in QUESTIONS:
            key = f"image{i}: {question}"
            out["ask"][key] = assistant.ask(image(i), question, max_new_tokens=N)
            out["stream"][key] = list(assistant.stream(image(i), question, max_new_tokens=N))
    out["describe"] = assistant.describe(image(0), max_new_tokens=N)
    from sqllava_edge.conversation import answer_prompt

    out["generate"] = assistant.generate(image(1), answer_prompt(assistant.tokenizer, QUESTIONS[0], assistant.template),
                                         max_new_tokens=N)
    asked = assistant.self_question(image(0), n=3, seed=7, max_new_tokens=N)
    out["self_question"] = {"description": asked.description, "questions": asked.questions, "seed": asked.seed}
    out["interview"] = [[e.question, e.answer] for e in
                        assistant.interview(image(1), n=2, seed=3, max_new_tokens=N, max_answer_tokens=8)]
    chat = assistant.chat(image(1))
    out["chat"] = {"answers": [chat.ask("What is on the left?", max_new_tokens=N),
                               chat.ask("And on the right?", max_new_tokens=N)], "ids": chat.ids}
    out["schema"] = assistant.ask(image(0), "Describe one object.", schema=SCHEMA, max_new_tokens=SCHEMA_TOKENS)
    out["sampled"] = assistant.ask(image(0), QUESTIONS[0], max_new_tokens=N, temperature=0.8, seed=11)
    stop = recorded("python_api", "stop", lambda: {"string": out["ask"][f"image0: {QUESTIONS[0]}"].split()[2]})
    out["stop"] = {"string": stop["string"],
                   "answer": assistant.ask(image(0), QUESTIONS[0], max_new_tokens=N, stop=stop["string"])}
    return out


def test_python_api_outputs_equal_the_golden_record(python_api):
    # the Assistant takes no logprobs option (sqllava_edge.assistant.OPTIONS): logprobs are pinned through the server
    for key, pieces in python_api["stream"].items():
        assert "".join(pieces).rstrip() == python_api["ask"][key]  # streamed pieces join to the answer
    stop = python_api["stop"]
    assert stop["string"] not in stop["answer"] and len(stop["answer"]) < len(python_api["ask"][f"image0: {QUESTIONS[0]}"])
    assert python_api["sampled"] != python_api["ask"][f"image0: {QUESTIONS[0]}"]
    check("python_api", python_api)


# --------------------------------------------------------------------------------------------------------------------
# The server


def _messages(i: int, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": {"url": data_uri(image(i))}}]}]


def _post(server, path: str, body: dict) -> dict:
    import httpx

    response = httpx.post(server.url + path, json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def _stream(server, body: dict) -> dict:
    """A streamed completion: the content pieces joined, the number of chunks, the finish reason, the usage chunk."""
    import httpx

    pieces, chunks, finish, usage = [], 0, None, None
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            chunks += 1
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                pieces.append(choice["delta"].get("content") or "")
                finish = choice.get("finish_reason") or finish
    return {"content": "".join(pieces), "chunks": chunks, "finish_reason": finish, "usage": _normalise(usage)}


@pytest.fixture(scope="module")
def served(tiny_bundle) -> dict:
    """Every server request, in one fixed order on a fresh server."""
    pytest.importorskip("fastapi", reason="the server needs the serve extra (pip install '.[serve]')")
    out: dict = {"greedy": {}}
    with serving(tiny_bundle) as server:
        chat = "/v1/chat/completions"
        for i in IMAGES:
            for question in QUESTIONS:
                body = {"model": "any", "messages": _messages(i, question), "max_tokens": N}
                out["greedy"][f"image{i}: {question}"] = _normalise(_post(server, chat, body))
        out["streamed"] = _stream(server, {"model": "any", "messages": _messages(1, QUESTIONS[1]), "max_tokens": N,
                                           "stream_options": {"include_usage": True}})
        body = {"image": data_uri(image(0)), "n": 2, "seed": 5, "max_tokens": N}
        out["self_questions"] = _normalise(_post(server, "/v1/self-questions", body))
        out["self_questions_answered"] = _normalise(_post(server, "/v1/self-questions", {**body, "answer": True}))
        out["json_schema"] = _normalise(_post(server, chat, {
            "model": "any", "messages": _messages(0, "Describe one object."), "max_tokens": SCHEMA_TOKENS,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA, "strict": True}}}))
        out["logprobs"] = _normalise(_post(server, chat, {"model": "any", "messages": _messages(1, "What is it?"),
                                                          "max_tokens": 6, "logprobs": True, "top_logprobs": 2}))
        out["n2_seeded"] = _normalise(_post(server, chat, {"model": "any", "messages": _messages(0, "Tell me a story."),
                                                           "max_tokens": N, "n": 2, "temperature": 0.8, "seed": 11}))
        stop = recorded("server", "stop_string", lambda: out["greedy"][f"image0: {QUESTIONS[0]}"]["choices"][0][
            "message"]["content"].split()[2])
        out["stop_string"] = stop
        out["stop"] = _normalise(_post(server, chat, {"model": "any", "messages": _messages(0, QUESTIONS[0]),
                                                      "max_tokens": N, "stop": [stop]}))
    return out


def test_server_responses_equal_the_golden_record(served):
    assert served["stop"]["choices"][0]["finish_reason"] == "stop"
    assert served["streamed"]["content"].rstrip() == \
        served["greedy"][f"image1: {QUESTIONS[1]}"]["choices"][0]["message"]["content"]
    texts = [c["message"]["content"] for c in served["n2_seeded"]["choices"]]
    assert len(texts) == 2 and texts[0] != texts[1]
    check("server", served)


def test_server_greedy_answers_equal_the_python_apis(python_api, served):
    for key, answer in python_api["ask"].items():
        assert served["greedy"][key]["choices"][0]["message"]["content"] == answer, key
    assert served["stop_string"] == python_api["stop"]["string"]
    assert served["stop"]["choices"][0]["message"]["content"] == python_api["stop"]["answer"]
    assert json.loads(served["json_schema"]["choices"][0]["message"]["content"]) == python_api["schema"]


# --------------------------------------------------------------------------------------------------------------------
# The command line and the exported artifacts


def test_cli_ask_prints_the_golden_answer(tiny_bundle, tmp_path):
    picture = tmp_path / "photo.png"
    image(0).save(picture)
    cmd = [sys.executable, "-m", "sqllava_edge.cli", "ask", str(tiny_bundle), str(picture), QUESTIONS[0],
           "--threads", str(THREADS), "--vision-precision", "fp32", "--max-new-tokens", str(N)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    check("cli", {"ask": done.stdout})
    assert done.stdout.rstrip() == _golden()["python_api"]["ask"][f"image0: {QUESTIONS[0]}"]  # the same answer


def test_artifact_hashes_equal_the_golden_record(tiny_bundle):
    from sqllava_edge.bundle import read_manifest

    manifest = read_manifest(tiny_bundle)
    check("artifacts", {f"{a.kind}/{a.precision}": a.sha256 for a in manifest.artifacts})
