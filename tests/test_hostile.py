"""`sqllava-edge serve` under hostile and careless clients: requests that are legal JSON and small on the wire, but
would freeze, starve or kill the server. For each, the hostile request gets its 4xx (or a correct answer) within a
few seconds and, while it runs, a legal request is answered and /health answers within 1 s.

One server per module (tests/serve_helpers.py: the tiny random-weight bundle, uvicorn on 127.0.0.1); every request
here is bounded in time.
"""
from __future__ import annotations

import json
import random
import socket
import threading
import time
import types

import httpx
import pytest

from tests.serve_helpers import data_uri, image, png_bytes, serving

pytest.importorskip("fastapi", reason="the server needs the serve extra (pip install '.[serve]')")

LEGAL = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
JSON = {"Content-Type": "application/json"}


FRONT = "http://front.example:3000"  # the one web origin the module's server allows (--cors-origin)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A media folder with two images (one with a space in its name), a symlink out of it, and a secret beside it."""
    root = tmp_path_factory.mktemp("media")
    (root / "inside").mkdir()
    image(0).save(root / "inside" / "cat.png")
    image(1).save(root / "inside" / "a b.png")
    image(2).save(root / "secret.png")
    (root / "inside" / "link.png").symlink_to(root / "secret.png")
    return root


@pytest.fixture(scope="module")
def server(tiny_bundle, media):
    with serving(tiny_bundle, parallel=2, queue=4, max_image_bytes=1 << 20, media_paths=(str(media / "inside"),),
                 cors_origins=(FRONT,)) as s:
        yield s


def _post(server, body, path: str = "/v1/chat/completions", headers=None, timeout: float = 10.0) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={**JSON, **(headers or {})}, timeout=timeout)


def _assert_alive(server) -> None:
    """/health within 1 s, and a legal 2-token question answered within a few seconds."""
    started = time.monotonic()
    health = httpx.get(server.url + "/health", timeout=1.0)
    assert health.status_code == 200, health.text
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    answer = _post(server, LEGAL, timeout=8.0)
    assert answer.status_code == 200, answer.text
    assert time.monotonic() - started < 8.0


def _during(server, hostile, within: float = 10.0):
    """Run hostile() on a thread; while it runs, the server stays alive. -> hostile's result (within `within` s)."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(hostile()), daemon=True)
    thread.start()
    time.sleep(0.1)
    _assert_alive(server)
    thread.join(within)
    assert not thread.is_alive(), f"the hostile request took over {within} s"
    return result[0]


def _gauges_settle(server, timeout: float = 5.0) -> None:
    """No request left running, no sequence left busy."""
    scheduler = server.state.scheduler
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if scheduler.running == 0 and scheduler.queue_depth == 0 and not server.state.assistant.engine.pool.busy:
            return
        time.sleep(0.05)
    raise AssertionError(f"left busy: running {scheduler.running}, queued {scheduler.queue_depth}, "
                         f"busy sequences {server.state.assistant.engine.pool.busy}")


# --------------------------------------------------------------------------------------------------------------------
# 1. Stop strings


class _CharTokenizer:
    """Token id i is the character chr(i): decode is exact, one character per token."""

    def decode(self, ids):
        return "".join(map(chr, ids))


def _naive_stream(text: str, stops: tuple[str, ...]) -> tuple[str, bool, list[str]]:
    """The rule a stop-string stream follows, written the obvious (quadratic) way: pieces, final text, stopped."""
    pieces, emitted, out = [], 0, ""
    for n in range(1, len(text) + 1):
        seen = text[:n]
        cuts = [seen.find(s) for s in stops if s in seen]
        if cuts:
            out = seen[:min(cuts)]
            pieces.append(out[emitted:])
            return out, True, pieces
        hold = max([k for s in stops for k in range(1, len(s)) if seen.endswith(s[:k])], default=0)
        pieces.append(seen[emitted:n - hold])
        emitted = n - hold
        out = seen
    return out, False, pieces


def test_stop_strings_match_like_the_naive_rule():
    from runtimes.engine import TextStream

    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(1, 40)))
        stops = tuple("".join(rng.choice("ab c") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3)))
        stream = TextStream(_CharTokenizer(), stops)
        pieces = []
        for char in text:
            pieces.append(stream.push(ord(char)))
            if stream.stopped:
                break
        want_text, want_stopped, want_pieces = _naive_stream(text, stops)
        if not want_stopped:
            pieces.append(stream.finish())
            want_pieces.append(want_text[sum(map(len, want_pieces)):])
        assert (stream.text, stream.stopped) == (want_text, want_stopped), (text, stops)
        assert "".join(pieces) == "".join(want_pieces).strip(), (text, stops)  # pieces add up to the stripped text


def test_long_stop_strings_cost_linear_time():
    """4 stop strings of 8000 characters that the text keeps almost matching: a per-token scan of every prefix of
    every stop string costs O(L^2) per token (seconds for these 40 tokens); matching costs O(1) per character."""
    from runtimes.engine import TextStream

    stops = tuple("a" * 7999 + c for c in "bcde")
    started = time.perf_counter()
    stream = TextStream(_CharTokenizer(), stops)
    for _ in range(40):
        stream.push(ord("a"))
    assert time.perf_counter() - started < 0.5
    assert not stream.stopped and stream.finish() == "a" * 40


def test_stop_string_length_and_count_are_limited(server):
    def hostile():
        return _post(server, {**LEGAL, "stop": ["a" * 1_000_000]})

    response = _during(server, hostile, within=5)
    assert response.status_code == 400 and "--max-stop-chars" in response.json()["error"]["message"]
    response = _post(server, {**LEGAL, "stop": ["x", "y", "z", "w", "v"]})
    assert response.status_code == 400 and "--max-stop" in response.json()["error"]["message"]
    _gauges_settle(server)


# --------------------------------------------------------------------------------------------------------------------
# 2. Images


def _flat_png(width: int, height: int) -> bytes:
    from PIL import Image

    return png_bytes(Image.new("RGB", (width, height), (200, 30, 30)))  # compresses to a few KB


def _image_body(png: bytes) -> dict:
    return {**LEGAL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": data_uri(png)}}]}]}


class _PeakRSS:
    """This process's resident memory sampled every 5 ms on a thread: `growth` is the peak over the start."""

    def __enter__(self):
        import psutil

        self.process, self.running = psutil.Process(), True
        self.start = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.growth = self.peak - self.start


def test_wide_image_is_resized_before_padding(server):
    """16000x800 (12.8 MP, ratio 20:1, allowed): padding first would allocate a 16000^2 canvas (1 GB)."""
    png = _flat_png(16000, 800)
    with _PeakRSS() as rss:
        response = _during(server, lambda: _post(server, _image_body(png), timeout=20), within=20)
    assert response.status_code == 200, response.text
    assert rss.growth < 200 * 2**20, f"the server grew by {rss.growth / 2**20:.0f} MB"


def test_image_limits_name_their_flags(server):
    response = _post(server, _image_body(_flat_png(4200, 200)))  # 21:1
    assert response.status_code == 413 and "--max-aspect-ratio" in response.json()["error"]["message"]
    response = _post(server, _image_body(_flat_png(8000, 8000)))  # 64 MP, over the default 50
    assert response.status_code == 413 and "--max-image-mpix" in response.json()["error"]["message"]


def test_large_canvas_paths_stay_close_to_the_exact_preprocessing():
    """Above CANVAS_SIDE, "pad" scales down before padding and "crop" cuts the centre first: the pixels stay close
    to the exact (canvas-first) result."""
    from PIL import Image

    from sqllava_edge.config import VisionConfig
    from sqllava_edge.image import _center_crop, _normalize, _resize_shortest_edge, pad_color, pad_to_square, preprocess

    vision = VisionConfig(image_size=56, patch_size=14)
    img = image(3, size=(300, 5000))  # (h, w)
    exact_pad = _normalize(_center_crop(_resize_shortest_edge(pad_to_square(img, pad_color(vision.image_mean)), 56), 56),
                           vision.image_mean, vision.image_std)
    exact_crop = _normalize(_center_crop(_resize_shortest_edge(img, 56), 56), vision.image_mean, vision.image_std)
    assert abs(preprocess(img, vision, "pad") - exact_pad).mean() < 0.05
    assert abs(preprocess(img, vision, "crop") - exact_crop).mean() < 0.05
    assert preprocess(Image.new("RGB", (64000, 4)), vision, "crop").shape == (3, 56, 56)


def test_memory_error_while_decoding_is_a_413():
    from sqllava_edge.serve.app import APIError, Settings, _pixels

    def pixels(source, **limits):
        raise MemoryError()

    state = types.SimpleNamespace(settings=Settings(), assistant=types.SimpleNamespace(
        engine=types.SimpleNamespace(pixels=pixels)))
    with pytest.raises(APIError) as caught:
        _pixels(state, data_uri(_flat_png(10, 10)), "messages")
    assert caught.value.status == 413 and "--max-image-mpix" in caught.value.message


# --------------------------------------------------------------------------------------------------------------------
# 3. Bodies: deep JSON, many messages, long text, the queue check first


def test_deeply_nested_json_is_a_400(server):
    response = _during(server, lambda: _post(server, b"[" * 200_000), within=5)
    assert response.status_code == 400 and "nest" in response.json()["error"]["message"]


def test_many_messages_do_not_hold_the_event_loop(server):
    messages = [{"role": "user", "content": "a"}] * 60_000  # 1.9 MB: within the body limit
    response = _during(server, lambda: _post(server, {**LEGAL, "messages": messages}, timeout=10), within=10)
    assert response.status_code == 400 and "--max-messages" in response.json()["error"]["message"]


def test_text_over_the_character_limit_is_refused(server):
    response = _during(server, lambda: _post(server, {**LEGAL, "messages": [{"role": "user", "content": "ab " * 70_000}]}),
                       within=10)
    assert response.status_code == 400 and "--max-text-chars" in response.json()["error"]["message"]


def _raw(server, head: bytes, body: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(head + body)
    return sock


def _hold(server, n: int) -> list[socket.socket]:
    """n long streamed requests on raw sockets; returns once they are running or queued (close them to cancel)."""
    socks = [_raw(server, _request_bytes(server, {**LEGAL, "stream": True, "max_tokens": 1800})) for _ in range(n)]
    scheduler, deadline = server.state.scheduler, time.monotonic() + 10
    while scheduler.running + scheduler.queue_depth < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return socks


def test_full_queue_refuses_before_reading_the_body(server):
    """With every slot and queue place taken, a POST gets its 503 while its body has not even been sent."""
    held = _hold(server, 2 + 4)  # --parallel 2, --queue 4
    try:
        sock = _raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            b"Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n")
        with sock:
            status = sock.recv(200).split(b"\r\n")[0]
        assert b" 503 " in status, status
        assert httpx.get(server.url + "/health", timeout=1.0).status_code == 200
    finally:
        for sock in held:
            sock.close()
    _gauges_settle(server, 10)


def test_uvicorn_limits_are_set():
    import argparse

    from sqllava_edge.serve import add_arguments, uvicorn_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = uvicorn_config(object(), parser.parse_args(["bundle", "--max-connections", "7"]))
    assert config.limit_concurrency == 7 and config.h11_max_incomplete_event_size == 16 * 1024


# --------------------------------------------------------------------------------------------------------------------
# 4. Disconnects


def _request_bytes(server, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (server.port, len(data))) + data


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_cancels_its_request(server, stream, caplog):
    scheduler = server.state.scheduler
    _gauges_settle(server)
    cancelled = scheduler.stats["cancelled"]
    sock = _raw(server, _request_bytes(server, {**LEGAL, "max_tokens": 1800, "stream": stream}))
    time.sleep(0.5)
    assert scheduler.running == 1
    sock.close()
    deadline = time.monotonic() + 3
    while scheduler.stats["cancelled"] == cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert scheduler.stats["cancelled"] == cancelled + 1
    _gauges_settle(server, 3)
    _assert_alive(server)
    assert "Exception in ASGI application" not in caplog.text


def test_a_client_that_leaves_while_sending_its_body_is_dropped_quietly(server, caplog):
    """Half a body, then the connection closes: no traceback in the log (the soak showed one per such client), no
    queue place kept, and the server keeps answering."""
    data = json.dumps({**LEGAL, "max_tokens": 4}).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (server.port, len(data) + 1000))
    sock = _raw(server, head + data)  # 1000 bytes short of what it declared
    time.sleep(0.3)
    sock.close()
    time.sleep(0.5)
    _gauges_settle(server, 3)
    _assert_alive(server)
    assert "Exception in ASGI application" not in caplog.text
    assert "ClientDisconnect" not in caplog.text


# --------------------------------------------------------------------------------------------------------------------
# 5. KV policy


def test_a_request_within_its_share_is_never_cut_short(tiny_bundle):
    """n_ctx 512, --parallel 2: each request is guaranteed 256 positions. A long request (107 prompt positions + 380)
    is 180 tokens in when a short one (107 + 140) arrives; when the cache fills up, the long one (over its share)
    stops, and the short one gets every token it asked for. (Before: the sequence with the higher id stopped.)"""
    with serving(tiny_bundle, parallel=2, queue=2, n_ctx=512, sequences=8) as small:
        long_body = {**LEGAL, "messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": 380,
                     "stream": True, "stream_options": {"include_usage": True}}
        result: dict = {}

        def run_long():
            reasons, tokens = [], 0
            with httpx.stream("POST", small.url + "/v1/chat/completions", json=long_body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        reasons += [c["finish_reason"] for c in chunk["choices"] if c["finish_reason"]]
                        tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
            result["long"] = (reasons, tokens, line)

        thread = threading.Thread(target=run_long, daemon=True)
        thread.start()
        scheduler, deadline = small.state.scheduler, time.monotonic() + 20
        while scheduler.stats["decode_tokens"] < 180 and time.monotonic() < deadline:
            time.sleep(0.005)
        short = _post(small, {**LEGAL, "max_tokens": 140}, timeout=60)
        thread.join(60)
        assert short.status_code == 200, short.text
        assert short.json()["usage"]["completion_tokens"] == 140
        assert short.json()["choices"][0]["finish_reason"] == "length"
        reasons, tokens, last = result["long"]
        assert reasons == ["length"] and tokens < 380, last
        assert scheduler.stats["over_share_stops"] == 1
        _gauges_settle(small)


# --------------------------------------------------------------------------------------------------------------------
# 6. Local files


def _file_body(url: str) -> dict:
    return {**LEGAL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]}]}


def test_local_files_only_under_the_named_folders(server, media):
    inside = media / "inside"
    for url in (f"file://{inside}/cat.png", f"file://localhost{inside}/cat.png", f"file://{inside}/a%20b.png",
                "cat.png", str(inside / "cat.png")):
        response = _post(server, _file_body(url))
        assert response.status_code == 200, (url, response.text)
    refused = set()
    for url in (f"file://{media}/secret.png", f"file://{inside}/link.png", f"file://{inside}/../secret.png",
                f"file://{inside}/%2e%2e/secret.png", "file:///etc/hostname", "/etc/passwd", f"file://{inside}/nope.png",
                f"file://other-host{inside}/cat.png", "../secret.png", f"file://{inside}"):
        response = _post(server, _file_body(url))
        assert response.status_code == 400, (url, response.text)
        refused.add(response.json()["error"]["message"])
    assert len(refused) == 1 and "--allowed-local-media-path" in refused.pop()


# --------------------------------------------------------------------------------------------------------------------
# 7. Browsers


def test_foreign_host_headers_are_refused(server):
    for host in ("evil.example", f"evil.example:{server.port}", "127.0.0.1.evil.example"):
        response = httpx.get(server.url + "/v1/models", headers={"Host": host})
        assert response.status_code == 421 and "--allowed-hosts" in response.json()["error"]["message"], host
        response = _post(server, LEGAL, headers={"Host": host})
        assert response.status_code == 421
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", f"[::1]:{server.port}", "127.0.0.2"):
        assert httpx.get(server.url + "/health", headers={"Host": host}).status_code == 200, host


def test_posts_must_be_json(server):
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": content_type} if content_type else {}
        response = httpx.post(server.url + "/v1/chat/completions", content=json.dumps(LEGAL), headers=headers,
                              timeout=10)
        assert response.status_code == 415, (content_type, response.text)
    assert _post(server, LEGAL, headers={"Content-Type": "application/json; charset=utf-8"}).status_code == 200


def test_cors_only_for_the_named_origin(server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    foreign = httpx.options(server.url + "/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight})
    assert foreign.status_code >= 400 and "access-control-allow-origin" not in foreign.headers
    allowed = httpx.options(server.url + "/v1/chat/completions", headers={"Origin": FRONT, **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == FRONT
    answer = _post(server, LEGAL, headers={"Origin": "http://evil.example"})
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers
    answer = _post(server, LEGAL, headers={"Origin": FRONT})
    assert answer.headers["access-control-allow-origin"] == FRONT


def test_no_cors_headers_by_default(tiny_bundle):
    from sqllava_edge.serve.app import Settings, create_app
    from starlette.testclient import TestClient

    app = create_app(lambda: None, Settings())
    with TestClient(app, base_url="http://127.0.0.1") as client:
        preflight = client.options("/v1/chat/completions", headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers


# --------------------------------------------------------------------------------------------------------------------
# 9. Compatibility and error hygiene


@pytest.mark.parametrize("extra", [{"response_format": {"type": "text"}}, {"tools": []}, {"logit_bias": {}},
                                   {"tool_choice": "none", "tools": []}, {"top_p": 0}, {"temperature": 5e-324}])
def test_legal_no_op_fields_are_accepted_and_answer_greedily(server, extra):
    greedy = _post(server, {**LEGAL, "max_tokens": 6}).json()["choices"][0]["message"]["content"]
    response = _post(server, {**LEGAL, "max_tokens": 6, **extra})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == greedy


def test_sampler_with_a_subnormal_temperature_is_greedy():
    import numpy as np

    from sqllava_edge.generation import GenerationConfig, Sampler

    logits = np.random.default_rng(0).normal(size=100).astype(np.float32)
    assert Sampler(GenerationConfig(temperature=5e-324), seed=0)(logits) == int(np.argmax(logits))


def test_stream_options_need_stream(server):
    response = _post(server, {**LEGAL, "stream_options": {"include_usage": True}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream_options"


def test_model_by_id(server):
    model_id = server.state.settings.model_id
    response = httpx.get(f"{server.url}/v1/models/{model_id}")
    assert response.status_code == 200 and response.json()["id"] == model_id
    assert httpx.get(f"{server.url}/v1/models/other").status_code == 404


def test_streamed_and_whole_answers_are_the_same_text(server):
    body = {**LEGAL, "max_tokens": 12, "messages": [{"role": "user", "content": "Tell me"}]}
    whole = _post(server, body).json()["choices"][0]["message"]["content"]
    pieces = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=10) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    pieces.append(choice["delta"].get("content") or "")
    assert "".join(pieces) == whole


def test_max_tokens_over_the_context_is_a_400(server):
    response = _post(server, {**LEGAL, "max_tokens": 1 << 19})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"


def test_internal_errors_carry_a_request_id_not_the_exception(server, monkeypatch, caplog):
    import sqllava_edge.serve.app as app_module

    def broken(*args):
        raise RuntimeError("secret-internal-detail")

    monkeypatch.setattr(app_module, "_chat_prompt", broken)
    response = _post(server, LEGAL)
    message = response.json()["error"]["message"]
    assert response.status_code == 500 and "secret-internal-detail" not in message
    request_id = message.split("request id ")[1].split(")")[0]
    assert request_id in caplog.text and "secret-internal-detail" in caplog.text


def test_a_failed_load_is_not_shown_to_clients():
    from sqllava_edge.serve.app import Settings
    from tests.serve_helpers import ServerThread

    def load():
        raise RuntimeError("/home/someone/secret-bundle: broken")

    server = ServerThread(load, Settings()).start(wait_ready=False)
    try:
        deadline = time.monotonic() + 10
        while server.state.error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        health = httpx.get(server.url + "/health")
        chat = _post(server, LEGAL)
        assert health.status_code == 503 and chat.status_code == 503
        assert "secret" not in health.text and "secret" not in chat.text
    finally:
        server.stop()


def test_streamed_errors_are_counted_with_their_status(server):
    """A streamed request that ends in an error (here: the per-request timeout) is counted under its real status."""
    scheduler = server.state.scheduler

    def count(status: str) -> float:
        text = httpx.get(server.url + "/metrics").text
        line = [l for l in text.splitlines() if l.startswith("sqllava_requests_total{") and
                'endpoint="/v1/chat/completions"' in l and f'status="{status}"' in l]
        return float(line[0].split()[-1]) if line else 0.0

    before = count("504")
    original = scheduler.submit

    def submit(request):
        request.timeout = 0.3
        return original(request)

    scheduler.submit = submit
    try:
        with httpx.stream("POST", server.url + "/v1/chat/completions",
                          json={**LEGAL, "stream": True, "max_tokens": 1800}, timeout=10) as r:
            text = r.read().decode()
    finally:
        del scheduler.submit
    assert '"code": "timeout"' in text
    assert count("504") == before + 1
