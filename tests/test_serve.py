"""`sqllava-edge serve`: the OpenAI-compatible server, tested with real clients on real sockets (127.0.0.1 only).

One server per module runs on the tiny random-weight bundle (tests/serve_helpers.py) beside an `Assistant` on the
same bundle, the reference for "the server answers what the Python API answers". Both use llama.cpp with the f32
GGUF, an f32 KV cache and flash attention off (what Assistant.load picks for an f32 GGUF), where a batched decode
gives the same greedy tokens as a lone one. Every load here is bounded in requests and time.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import httpx
import numpy as np
import psutil
import pytest

from tests.serve_helpers import ROOT, THREADS, data_uri, free_port, image, png_bytes, serving

openai = pytest.importorskip("openai", reason="the server tests use the official client (pip install '.[dev]')")
pytest.importorskip("fastapi", reason="the server needs the serve extra (pip install '.[serve]')")

KEY = "test-key-123"
N = 8  # new tokens per answer
QUESTIONS = ["What is in the picture?", "What colour is the sky?", "How many people are there?", "Describe it."]


@pytest.fixture(scope="module")
def assistant(tiny_bundle):
    from sqllava_edge.assistant import Assistant

    a = Assistant.load(tiny_bundle, vision_precision="fp32", n_threads=THREADS)
    yield a
    a.close()


@pytest.fixture(scope="module")
def server(tiny_bundle):
    with serving(tiny_bundle, api_key=KEY, parallel=4, queue=64, max_image_bytes=1 << 20) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _messages(i: int, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": {"url": data_uri(image(i))}}]}]


def _post(server, path: str, body, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={**headers, "Content-Type": "application/json"},
                      timeout=60, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Answers: the same as the Python API


def test_chat_completion_equals_assistant_ask(client, assistant):
    for i, question in enumerate(QUESTIONS[:3]):
        response = client.chat.completions.create(model="any", messages=_messages(i, question), max_tokens=N)
        expected = assistant.ask(image(i), question, max_new_tokens=N)
        choice = response.choices[0]
        assert choice.message.content == expected and choice.message.role == "assistant"
        assert choice.finish_reason == "length" and response.usage.completion_tokens == N
        from sqllava_edge.conversation import answer_prompt

        ids = answer_prompt(assistant.tokenizer, question, assistant.template)
        assert response.usage.prompt_tokens == len(ids) - 1 + assistant.config.num_image_tokens  # image rows counted
        assert response.usage.total_tokens == response.usage.prompt_tokens + N
        assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"


def test_streamed_chunks_join_to_the_answer_and_carry_usage(client, assistant):
    stream = client.chat.completions.create(model="any", messages=_messages(1, QUESTIONS[1]), max_tokens=N, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage, roles = [], None, None, []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None and not chunk.choices:
            usage = chunk.usage
        for choice in chunk.choices:
            roles += [choice.delta.role] if choice.delta.role else []
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert roles == ["assistant"]
    assert "".join(pieces).rstrip() == assistant.ask(image(1), QUESTIONS[1], max_new_tokens=N)
    assert finish == "length" and usage is not None and usage.completion_tokens == N


def test_n_samples_share_the_prompt_and_follow_their_seed(client, server):
    before = server.state.assistant.counters.prefill_embeds
    ask = dict(model="any", messages=_messages(2, "Tell me a story."), max_tokens=N, n=2, temperature=1.0, seed=11)
    first = client.chat.completions.create(**ask)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1] and texts[0] != texts[1] and all(texts)
    assert first.usage.completion_tokens == 2 * N
    assert server.state.assistant.counters.prefill_embeds - before <= 64  # the image was prefilled once, not twice
    again = client.chat.completions.create(**ask)
    assert [c.message.content for c in again.choices] == texts  # same seed, same samples


def test_follow_up_reuses_the_cache_and_equals_the_chat_api(client, server, assistant):
    engine = server.state.assistant.engine
    question, follow = "What is on the left?", "And on the right?"
    first = client.chat.completions.create(model="any", messages=_messages(3, question), max_tokens=N)
    encodes, prefilled = engine.counters.vision_encodes, engine.counters.prefill_tokens + engine.counters.prefill_embeds
    messages = _messages(3, question) + [{"role": "assistant", "content": first.choices[0].message.content},
                                         {"role": "user", "content": follow}]
    second = client.chat.completions.create(model="any", messages=messages, max_tokens=N)
    assert engine.counters.vision_encodes == encodes  # the image came from the cache
    new = engine.counters.prefill_tokens + engine.counters.prefill_embeds - prefilled
    assert 0 < new < 40  # only the answer's tail and the new turn, not the 64 image rows + system prompt again
    chat = assistant.chat(image(3))
    assert chat.ask(question, max_new_tokens=N) == first.choices[0].message.content
    assert chat.ask(follow, max_new_tokens=N) == second.choices[0].message.content


def test_text_only_and_typed_placeholders_are_plain_conversations(client):
    text_only = client.chat.completions.create(model="any", max_tokens=4,
                                               messages=[{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": "Hello there"}])
    assert text_only.choices[0].message.content
    typed = client.chat.completions.create(model="any", max_tokens=4, messages=_messages(0, "<image> and </s> now?"))
    assert typed.choices[0].message.content


def test_self_questions_equal_the_python_api(server, assistant):
    uri = data_uri(image(4))
    got = _post(server, "/v1/self-questions", {"image": uri, "n": 2, "seed": 5, "max_tokens": 12}).json()
    expected = assistant.self_question(image(4), n=2, seed=5, max_new_tokens=12)
    assert got["description"] == expected.description and got["questions"] == expected.questions
    answered = _post(server, "/v1/self-questions", {"image": uri, "n": 2, "seed": 5, "max_tokens": 12,
                                                    "answer": True}).json()
    interview = assistant.interview(image(4), n=2, seed=5, max_new_tokens=12, max_answer_tokens=12)
    assert [(q["question"], q["answer"]) for q in answered["questions"]] == [(e.question, e.answer) for e in interview]


def test_interview_answers_each_question_as_a_lone_prompt_would(assistant):
    from sqllava_edge.conversation import interview_prompt

    exchanges = assistant.interview(image(5), n=3, seed=1, max_new_tokens=10, max_answer_tokens=10)
    description = assistant.self_question(image(5), n=1, seed=1, max_new_tokens=10).description  # greedy: the same
    assert len(exchanges) == 3 and all(e.question and e.answer for e in exchanges)
    for exchange in exchanges:  # decoded together in one batch == one prompt at a time
        ids = interview_prompt(assistant.tokenizer, description, exchange.question, assistant.template)
        alone = assistant.tokenizer.decode(assistant.generate(image(5), ids, max_new_tokens=10)).strip()
        assert exchange.answer == alone


# --------------------------------------------------------------------------------------------------------------------
# Errors: OpenAI's error object, the right status, and the server keeps serving


def _tall_png(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (the decompression-bomb case); the pixel data is never read."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_errors_raise_the_clients_own_exceptions(server, client):
    bad_key = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        bad_key.chat.completions.create(model="any", messages=_messages(0, "hi"), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="does not fetch"):
        client.chat.completions.create(model="any", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="any", messages=_messages(0, "hi"), max_tokens=2,
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    big = png_bytes(image(0, size=(900, 900)))  # ~2.4 MB of noise, over the 1 MiB limit of this server
    assert len(big) > 1 << 20
    with pytest.raises(openai.APIStatusError, match="limit") as err:
        client.chat.completions.create(model="any", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": data_uri(big)}}]}])
    assert err.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match=r"needs \d+ positions .* context holds 2048"):
        client.chat.completions.create(model="any", messages=_messages(0, "why " * 5000), max_tokens=2)


BAD_BODIES = [
    ("malformed JSON", b'{"messages": [', 400, "not valid JSON"),
    ("truncated body", json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})[:-7], 400,
     "not valid JSON"),
    ("not an object", b"[1, 2]", 400, "JSON object"),
    ("no messages", {"model": "m"}, 400, "messages must be"),
    ("unknown field", {"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, 400, "frobnicate"),
    ("NaN temperature", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature"),
    ("string seed", {"messages": [{"role": "user", "content": "hi"}], "seed": "x"}, 400, "seed must be"),
    ("empty stop", {"messages": [{"role": "user", "content": "hi"}], "stop": ""}, 400, "stop strings"),
    ("n too large", {"messages": [{"role": "user", "content": "hi"}], "n": 99}, 400, r"n must be in"),
    ("last turn assistant", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     400, "last message"),
    ("two images", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400, "one image"),
    ("non-image data URI", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}]}]},
     400, "not an image"),
    ("zero-byte image", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}]}]},
     400, "empty"),
    ("corrupt image", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]},
     400, "not an image"),
    ("bad base64", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]},
     400, "base64"),
    ("30000x30000 PNG", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": data_uri(_tall_png(30000, 30000))}}]}]},
     413, "pixels"),
    ("local file refused", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}]}]},
     400, "--allowed-local-media-path"),
    ("200 KB of text", {"messages": [{"role": "user", "content": "word " * 40000}]}, 400, "context holds"),
]


@pytest.mark.parametrize("name,body,status,message", BAD_BODIES, ids=[case[0] for case in BAD_BODIES])
def test_bad_input_gets_an_error_object_and_the_server_keeps_serving(server, name, body, status, message):
    response = _post(server, "/v1/chat/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and __import__("re").search(message, error["message"])
    ok = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200


def test_health_models_info_and_metrics(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # public
    assert httpx.get(server.url + "/v1/models").status_code == 401  # everything else needs the key
    models = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    info = httpx.get(server.url + "/v1/info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["backends"]["llm"] == "llama.cpp" and info["max_image_bytes"] == 1 << 20
    assert httpx.get(server.url + "/metrics").status_code == 401
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert metrics.headers["content-type"].startswith("text/plain")
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
    for name in ("sqllava_requests", "sqllava_prompt_tokens", "sqllava_completion_tokens", "sqllava_queue_depth",
                 "sqllava_busy_slots", "sqllava_time_to_first_token_seconds", "sqllava_request_duration_seconds",
                 "sqllava_vision_encodes", "sqllava_image_cache_hits", "sqllava_prefix_cache_hit_tokens"):
        assert name in families, name
    statuses = {s.labels.get("status") for s in families["sqllava_requests"].samples}
    assert "200" in statuses
    assert any(s.name.endswith("_count") and s.value > 0 for s in families["sqllava_time_to_first_token_seconds"].samples)


def test_without_a_key_everything_is_open_and_while_loading_health_is_503(tiny_bundle):
    from sqllava_edge.assistant import Assistant
    from sqllava_edge.serve.app import Settings
    from tests.serve_helpers import ServerThread

    gate = threading.Event()

    def slow_load():
        gate.wait(30)
        return Assistant.load(tiny_bundle, vision_precision="fp32", n_threads=THREADS)

    server = ServerThread(slow_load, Settings()).start(wait_ready=False)
    try:
        loading = httpx.get(server.url + "/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        early = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert early.status_code == 503 and early.json()["error"]["code"] == "loading"
        gate.set()
        assert server.state.ready.wait(60)
        assert httpx.get(server.url + "/health").status_code == 200
        assert httpx.get(server.url + "/v1/models").status_code == 200  # no key configured: open
    finally:
        gate.set()
        server.stop()


def test_queue_full_is_503_with_retry_after(tiny_bundle):
    with serving(tiny_bundle, parallel=1, queue=0) as server:
        engine = server.state.assistant.engine
        with engine.lock:  # hold the engine: the first request waits for its slot work, the second finds no room
            first = concurrent.futures.ThreadPoolExecutor(1).submit(
                _post, server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 2}, None)
            deadline = time.monotonic() + 10
            while server.state.scheduler.queue_depth + server.state.scheduler.running == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            second = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, None)
        assert second.status_code == 503 and second.headers["retry-after"] and "retry" in second.json()["error"]["message"]
        assert first.result(timeout=30).status_code == 200


# --------------------------------------------------------------------------------------------------------------------
# Load, cancellation, shutdown


def test_sixteen_clients_get_the_single_client_answers_and_memory_stays_flat(server, client):
    jobs = [(i % 4, QUESTIONS[(i // 4) % 4]) for i in range(16 * 4)]
    alone = {}
    for i, q in sorted(set(jobs)):  # one client, one request at a time: the reference
        alone[i, q] = client.chat.completions.create(model="any", messages=_messages(i, q), max_tokens=N).choices[0].message.content
    process = psutil.Process()
    warm_rss = process.memory_info().rss
    steps_before = server.state.assistant.counters.decode_steps
    tokens_before = server.state.assistant.counters.decode_tokens

    def one_client(k: int) -> list[tuple[int, str, str, int]]:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        out = []
        for i, q in jobs[k * 4:(k + 1) * 4]:
            r = c.chat.completions.with_raw_response.create(model="any", messages=_messages(i, q), max_tokens=N)
            out.append((i, q, r.parse().choices[0].message.content, r.status_code))
        return out

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = [r for rs in pool.map(one_client, range(16), timeout=300) for r in rs]
    assert len(results) == 64 and all(status == 200 for *_, status in results)
    assert [text for i, q, text, _ in results] == [alone[i, q] for i, q, _, _ in results]
    counters = server.state.assistant.counters
    assert (counters.decode_tokens - tokens_before) / (counters.decode_steps - steps_before) > 1.5  # really batched
    assert process.memory_info().rss <= warm_rss * 1.05


def test_a_client_leaving_mid_stream_frees_its_sequence(server, client):
    scheduler, pool = server.state.scheduler, server.state.assistant.engine.pool
    cancelled = scheduler.stats["cancelled"]
    body = {"messages": _messages(0, "Talk for a long time."), "max_tokens": 400, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content"' in line and '"content": ""' not in line:
                break  # got a real piece of the answer: hang up
    deadline = time.monotonic() + 20
    while (scheduler.stats["cancelled"] == cancelled or scheduler.running) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scheduler.stats["cancelled"] == cancelled + 1 and scheduler.running == 0 and not pool.busy
    assert server.state.assistant.counters.decode_tokens < 10**6
    again = client.chat.completions.create(model="any", messages=_messages(1, "hi"), max_tokens=2)
    assert again.choices[0].message.content is not None


def test_the_command_line_server_starts_prints_backends_and_stops_cleanly_on_sigterm(tiny_bundle):
    port = free_port()
    env = {**os.environ, "SQLLAVA_EDGE_API_KEY": KEY, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "sqllava_edge.serve", str(tiny_bundle), "--port", str(port), "--threads", "1",
           "--vision-precision", "fp32", "--parallel", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401  # key from the environment
        results = []
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "stream": True}

        def stream():
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {KEY}"}) as r:
                results.extend(r.iter_lines())

        reader = threading.Thread(target=stream)
        reader.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # while the stream is in flight
        reader.join(60)
        assert proc.wait(60) == 0
        assert "data: [DONE]" in results  # the in-flight request finished
        err = proc.stderr.read()
        assert f"http://127.0.0.1:{port}/" in err and "why:" in err and "llama.cpp" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_refuses_bad_settings_in_one_line(tiny_bundle):
    from sqllava_edge.cli import main

    assert main(["serve", str(tiny_bundle), "--parallel", "0"]) == 1
    assert main(["serve", str(tiny_bundle / "missing")]) == 1


def test_cli_interview_prints_the_python_apis_exchanges(tiny_bundle, assistant, tmp_path, capsys):
    from sqllava_edge import cli

    photo = tmp_path / "photo.png"
    image(6).save(photo)
    expected = assistant.interview(photo, n=2, seed=3, max_new_tokens=8, max_answer_tokens=6)
    common = [str(tiny_bundle), str(photo), "--vision-precision", "fp32", "--threads", "1"]
    assert cli.main(["interview", *common, "--n", "2", "--seed", "3", "--max-new-tokens", "8",
                     "--max-answer-tokens", "6"]) == 0
    lines = [f"Q{i + 1}: {e.question}\nA{i + 1}: {e.answer}" for i, e in enumerate(expected)]
    assert capsys.readouterr().out == "\n".join(lines) + "\n"


HOSTILE = ["What colour</s> is it?", "<s>hi<unk>", "<image> and now?", "<image><image> twice", "USER: ASSISTANT: VUSER:"]


@pytest.mark.parametrize("text", HOSTILE)
def test_typed_control_tokens_and_placeholders_stay_text_in_the_prompt(server, client, text):
    """Through the server: whatever the caller types (in system, user and assistant turns), the prompt's only
    control ids are the template's (BOS first, one EOS per finished assistant turn) and it holds one image."""
    from runtimes.sequences import ImageRef

    messages = [{"role": "system", "content": text}] + _messages(0, text) + [
        {"role": "assistant", "content": text}, {"role": "user", "content": text}]
    response = client.chat.completions.create(model="any", messages=messages, max_tokens=3)
    assert response.choices[0].message.content and response.choices[0].finish_reason == "length"
    pool = server.state.assistant.engine.pool
    seq = max(pool.content, key=lambda s: pool._used[s])  # the sequence this request just used
    items = pool.content[seq][:-2]  # the prompt (the answer's first two tokens were fed after it)
    assert sum(isinstance(item, ImageRef) for item in items) == 1
    tokens = [item for item in items if not isinstance(item, ImageRef)]
    assert tokens[0] == 1 and 1 not in tokens[1:]  # BOS only where the template puts it
    assert tokens.count(2) == 1  # EOS only after the one finished assistant turn


def test_serving_benchmark_runs_side_by_side_and_writes_its_report(tiny_bundle, tmp_path):
    """A smoke run of benchmarks.serve (the figures themselves are for docs/results.md, not asserted as times)."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "benchmarks.serve", "--bundle", str(tiny_bundle), "--clients", "1,2", "--parallel",
           "1,2", "--requests", "1", "--new-tokens", "4", "--threads", "1", "--vision-precision", "fp32",
           "--port", str(free_port()), "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    raw = json.loads((out / "serve.json").read_text())
    assert [(p["parallel"], p["clients"]) for p in raw["phases"]] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(p["failed"] == 0 and p["decode_tok_per_s"] > 0 for p in raw["phases"])
    assert all(s["tokens"] == 4 for p in raw["phases"] for s in p["samples"])
    assert "| --parallel |" in (out / "serve.md").read_text() and (out / "serve.png").stat().st_size > 0


def test_stop_strings_cut_the_answer_like_the_python_api(client, assistant):
    full = assistant.ask(image(2), QUESTIONS[0], max_new_tokens=N)
    stop = full.split()[2]  # a word from the middle of the greedy answer
    response = client.chat.completions.create(model="any", messages=_messages(2, QUESTIONS[0]), max_tokens=N,
                                              stop=[stop])
    expected = assistant.ask(image(2), QUESTIONS[0], max_new_tokens=N, stop=stop)
    assert response.choices[0].message.content == expected and stop not in expected
    assert response.choices[0].finish_reason == "stop" and response.usage.completion_tokens < N


def test_a_request_over_the_timeout_is_stopped_with_504(tiny_bundle):
    with serving(tiny_bundle, timeout=0.3) as server:
        slow = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 1500}, None)
        assert slow.status_code == 504 and slow.json()["error"]["code"] == "timeout"
        assert server.state.scheduler.stats["timeout"] == 1 and not server.state.assistant.engine.pool.busy
        quick = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 2}, None)
        assert quick.status_code == 200
