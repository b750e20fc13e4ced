"""Video: sources (sqllava_edge.video), the watch loop (runtimes.watch), Assistant.watch and `sqllava-edge watch`.

The clips are frames of the synthetic shapes dataset (training.synthetic.scene_clip) written with PyAV: a few scenes,
each held for several frames, so the scene changes are known. The answer-level tests run the tiny random-weight
bundle at greedy: its answers are a deterministic function of the image (identical frames give identical answers),
and different scenes give different answers, so "the answers change exactly at the scene changes" is checkable
without a trained model. The trained demo bundle (demo_out/bundle, written by `make demo`) runs the same check when
it is there.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from tests.serve_helpers import ROOT, THREADS

pytest.importorskip("av", reason="video sources need PyAV (pip install '.[video]')")

from runtimes.watch import FrameAnswer, Gate, Mailbox, watch_frames  # noqa: E402
from sqllava_edge.video import Frame, VideoSource, open_source, write_video  # noqa: E402
from training.synthetic import scene_clip  # noqa: E402

SCENES, HOLD, FPS = 4, 6, 10.0  # 4 scenes of 6 frames at 10 frames/s: cuts at frames 0, 6, 12, 18
TOKENS = 6  # answer length (random weights never emit EOS, so every answer runs to it)
QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def clip():
    frames, starts = scene_clip(SCENES, HOLD, size=112, seed=0)
    return frames, starts


@pytest.fixture(scope="module")
def clip_files(clip, tmp_path_factory):
    """The clip as MPEG-4 (lossy), FFV1 (lossless) and Y4M (raw I420, what Chromium's fake camera reads)."""
    folder = tmp_path_factory.mktemp("clips")
    frames, _ = clip
    return {suffix: write_video(folder / f"clip{suffix}", frames, fps=FPS) for suffix in (".mp4", ".mkv", ".y4m")}


@pytest.fixture(scope="module")
def assistant(tiny_bundle):
    from sqllava_edge.assistant import Assistant

    with Assistant.load(tiny_bundle, vision_precision="fp32", n_threads=THREADS) as a:
        yield a


# --------------------------------------------------------------------------------------------------------------------
# Sources


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".y4m"])
def test_a_written_clip_reads_back_frame_for_frame(clip, clip_files, suffix):
    frames, _ = clip
    with open_source(clip_files[suffix]) as source:
        read = list(source)
    assert not source.live
    assert [f.index for f in read] == list(range(len(frames)))
    assert [round(f.timestamp, 3) for f in read] == [round(i / FPS, 3) for i in range(len(frames))]
    assert all(f.image.shape == (112, 112, 3) and f.image.dtype == np.uint8 for f in read)
    worst = max(np.abs(f.image.astype(int) - np.asarray(frames[f.index], dtype=int)).mean() for f in read)
    assert worst < (0.01 if suffix == ".mkv" else 8.0)  # FFV1 is lossless; the others lose colour detail (4:2:0)
    if suffix == ".mkv":
        assert all(np.array_equal(f.image, np.asarray(frames[f.index])) for f in read)


def test_a_folder_of_images_plays_in_name_order_at_its_rate(clip, tmp_path):
    frames, _ = clip
    for i, image in enumerate(frames[:5]):
        image.save(tmp_path / f"{i:03d}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    read = list(open_source(tmp_path, rate=2.0))
    assert [f.timestamp for f in read] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert all(np.array_equal(f.image, np.asarray(frames[f.index])) for f in read)


@pytest.mark.parametrize("spec, error, words", [
    ("missing.mp4", FileNotFoundError, "does not exist"),
    ("", ValueError, "empty"),
    ("camera:front", ValueError, "camera:0"),
    ("gst:", ValueError, "appsink"),
    ("not-a-video.txt", ValueError, "cannot open"),
    ("empty-folder", ValueError, "no images"),
])
def test_bad_sources_say_what_to_give(spec, error, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "not-a-video.txt").write_text("hello")
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(error, match=words):
        open_source(spec)


def test_a_gstreamer_pipeline_needs_opencv_with_gstreamer(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # no OpenCV: JetPack's python3-opencv is named
    with pytest.raises(ValueError, match="python3-opencv"):
        open_source("gst:v4l2src ! videoconvert ! appsink")
    import types

    pip_build = types.SimpleNamespace(getBuildInformation=lambda: "  Video I/O:\n    GStreamer:   NO\n")
    monkeypatch.setitem(sys.modules, "cv2", pip_build)  # pip's wheels are built without GStreamer
    with pytest.raises(ValueError, match="built without GStreamer"):
        open_source("gst:v4l2src ! videoconvert ! appsink")


# --------------------------------------------------------------------------------------------------------------------
# The gate and the mailbox


def test_unchanged_frames_are_skipped_and_counted(clip, clip_files):
    """Lossy MPEG-4 frames of one scene differ by compression noise, far below the threshold; every cut passes."""
    _, starts = clip
    gate = Gate()
    admitted = [f.index for f in open_source(clip_files[".mp4"]) if gate.admit(f.timestamp, f.image)]
    assert admitted == starts
    assert gate.skipped == SCENES * HOLD - SCENES and gate.sampled == SCENES * HOLD
    every = Gate(every_change=False)
    assert sum(every.admit(f.timestamp, f.image) for f in open_source(clip_files[".mp4"])) == SCENES * HOLD


def test_sampling_takes_one_frame_per_interval_of_source_time(clip, clip_files):
    gate = Gate(fps=2.5, every_change=False)  # one frame per 0.4 s of a 10 frames/s clip
    admitted = [f.index for f in open_source(clip_files[".mkv"]) if gate.admit(f.timestamp, f.image)]
    assert admitted == list(range(0, SCENES * HOLD, 4))
    with pytest.raises(ValueError, match="fps"):
        Gate(fps=0)


def test_the_mailbox_keeps_the_newest_frame_and_counts_the_dropped():
    box = Mailbox()
    for i in range(5):
        assert box.put(i)
    assert box.get() == 4 and box.dropped == 4
    assert box.get(timeout=0.05) is None  # empty: nothing old comes back
    waiting = Mailbox(wait=True)
    waiting.put("a")
    later = threading.Thread(target=waiting.put, args=("b",))
    later.start()
    time.sleep(0.05)
    assert later.is_alive()  # a file is read no faster than it is answered
    assert waiting.get() == "a"
    later.join(2)
    assert waiting.get() == "b" and waiting.dropped == 0
    waiting.close()
    assert not waiting.put("c") and waiting.get() is None


class FastCamera(VideoSource):
    """A live source far faster than the answerer (a frame every millisecond); counts the frames still alive."""

    live = True

    def __init__(self, count: int):
        self.count, self.alive, self.most_alive = count, 0, 0
        self._lock = threading.Lock()

    def _gone(self) -> None:
        with self._lock:
            self.alive -= 1

    def frames(self):
        start = time.monotonic()
        for i in range(self.count):
            image = np.full((48, 64, 3), (i * 37) % 256, dtype=np.uint8)  # every frame a change
            frame = Frame(i, time.monotonic() - start, image)
            with self._lock:
                self.alive += 1
                self.most_alive = max(self.most_alive, self.alive)
            weakref.finalize(frame, self._gone)
            yield frame
            del frame, image
            time.sleep(0.001)


def test_a_source_faster_than_the_device_drops_frames_instead_of_queueing():
    camera = FastCamera(600)
    answered: list[FrameAnswer] = []
    for answer in watch_frames(camera, lambda image: (time.sleep(0.03), str(int(image[0, 0, 0])))[1]):
        answered.append(answer)
    dropped = sum(a.dropped_since_last for a in answered)
    assert len(answered) < 600 / 5 and dropped > 0
    assert len(answered) + dropped + answered[-1].skipped_since_last <= 600
    assert camera.most_alive <= 4  # the one read, the one waiting, the one answered (+1 in hand-over)
    # no backlog: an answer is never about a frame older than one answer's time plus the slot's wait
    assert max(a.latency for a in answered) < 0.5
    assert [a.answer for a in answered] == [str((a.frame_index * 37) % 256) for a in answered]


def test_a_file_played_as_a_camera_drops_what_the_device_cannot_take(clip_files):
    slow = lambda image: (time.sleep(0.25), "x")[1]  # noqa: E731 - 4 answers/s on a 10 frames/s clip
    answers = list(watch_frames(open_source(clip_files[".mkv"]), slow, every_change=False, realtime=True))
    assert sum(a.dropped_since_last for a in answers) > 0 and len(answers) < SCENES * HOLD
    unpaced = list(watch_frames(open_source(clip_files[".mkv"]), lambda image: "x", every_change=False))
    assert [a.frame_index for a in unpaced] == list(range(SCENES * HOLD))  # a file, unpaced: nothing dropped


def test_a_failing_source_raises_in_the_caller():
    def frames():
        yield Frame(0, 0.0, np.zeros((8, 8, 3), np.uint8))
        raise ValueError("decoding clip.mp4 failed at frame 1")

    answers = watch_frames(frames(), lambda image: "a")
    assert next(answers).frame_index == 0
    with pytest.raises(ValueError, match="frame 1"):
        next(answers)


# --------------------------------------------------------------------------------------------------------------------
# Answers from a model


def _check_scene_changes(assistant, clip, clip_files):
    _, starts = clip
    encodes = assistant.counters.vision_encodes
    changed = list(assistant.watch(clip_files[".mp4"], QUESTION, max_new_tokens=TOKENS))
    assert [a.frame_index for a in changed] == starts
    assert [a.skipped_since_last for a in changed] == [0] + [HOLD - 1] * (SCENES - 1)
    assert all(a.answer for a in changed) and all(x.answer != y.answer for x, y in zip(changed, changed[1:]))
    assert all(a.latency > 0 for a in changed)
    assert assistant.counters.vision_encodes - encodes == SCENES
    # every frame of the lossless clip: identical frames give the cached answer's tokens, a cut re-encodes
    every = list(assistant.watch(clip_files[".mkv"], QUESTION, every_change=False, max_new_tokens=TOKENS))
    assert [a.frame_index for a in every] == list(range(SCENES * HOLD))
    cuts = [a.frame_index for prev, a in zip([None] + every, every) if prev is None or a.answer != prev.answer]
    assert cuts == starts
    return changed


def test_answers_change_exactly_at_scene_changes(assistant, clip, clip_files):
    _check_scene_changes(assistant, clip, clip_files)


def test_answers_change_at_scene_changes_with_the_trained_demo_model(clip, clip_files):
    bundle = ROOT / "demo_out" / "bundle"
    if not (bundle / "manifest.json").exists():
        pytest.skip("the trained demo bundle is not built here (make demo writes demo_out/bundle)")
    from sqllava_edge.assistant import Assistant

    with Assistant.load(bundle, n_threads=THREADS) as trained:
        _, starts = clip
        changed = list(trained.watch(clip_files[".mp4"], "How many shapes are there?", max_new_tokens=TOKENS))
        assert [a.frame_index for a in changed] == starts
        every = list(trained.watch(clip_files[".mkv"], "How many shapes are there?", every_change=False,
                                   max_new_tokens=TOKENS))
        for a in every:  # within a scene the answer never moves
            scene = max(i for i, s in enumerate(starts) if s <= a.frame_index)
            assert a.answer == every[starts[scene]].answer


def test_self_questions_come_with_each_scene_change(assistant, clip, clip_files):
    """Optional: the model's own questions about each new scene, equal to self_question on that frame."""
    frames, starts = clip
    two_scenes = [Frame(i, i / FPS, np.asarray(image)) for i, image in enumerate(frames[:2 * HOLD])]
    answers = list(assistant.watch(two_scenes, QUESTION, self_questions=2, max_new_tokens=TOKENS))
    assert [a.frame_index for a in answers] == starts[:2]
    for a in answers:
        assert len(a.questions) == 2 and all(q.strip() for q in a.questions)
    from runtimes.watch import WATCH_DESCRIBE, WATCH_TOKENS

    image = frames[starts[1]]
    description = assistant.describe(image, max_new_tokens=WATCH_DESCRIBE)
    expected = assistant.self_question(image, 2, seed=0, description=description, max_new_tokens=WATCH_TOKENS)
    assert answers[1].questions == tuple(expected.questions)
    assert all(a.questions == () for a in assistant.watch(two_scenes, QUESTION, max_new_tokens=TOKENS))


def test_watch_refuses_an_empty_question_before_opening_anything(assistant):
    with pytest.raises(ValueError, match="empty"):
        assistant.watch("missing.mp4", "  ")
    with pytest.raises(FileNotFoundError):
        assistant.watch("missing.mp4", QUESTION)


def test_cli_watch_prints_one_line_per_answer(tiny_bundle, clip, clip_files):
    _, starts = clip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "sqllava_edge.cli", "watch", str(tiny_bundle), str(clip_files[".mp4"]), QUESTION,
            "--max-new-tokens", str(TOKENS), "--vision-precision", "fp32", "--threads", str(THREADS)]
    jsonl = subprocess.run(base + ["--jsonl"], env=env, capture_output=True, text=True, timeout=120)
    assert jsonl.returncode == 0, jsonl.stderr
    rows = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert [r["frame_index"] for r in rows] == starts
    assert set(rows[0]) == {"timestamp", "frame_index", "answer", "latency", "skipped_since_last", "dropped_since_last",
                            "questions"}
    plain = subprocess.run(base + ["--max-answers", "2", "--self-questions", "1"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.splitlines()
    assert len(lines) == 4 and f"frame {starts[1]}" in lines[2] and f"({HOLD - 1} unchanged)" in lines[2]
    assert rows[1]["answer"] in lines[2]
    assert [line.startswith("    VUSER: ") for line in lines] == [False, True, False, True]
    missing = subprocess.run(base[:5] + ["missing.mp4", QUESTION], env=env, capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 1 and "missing.mp4 does not exist" in missing.stderr


def test_benchmark_puts_every_loop_side_by_side(tiny_bundle, tmp_path, capsys):
    from benchmarks import video

    argv = ["--bundle", str(tiny_bundle), "--scenes", "2", "--hold", "3", "--tokens", "4", "--rounds", "1",
            "--threads", str(THREADS), "--out", str(tmp_path)]
    assert video.main(argv) == 0
    text = (tmp_path / "video.md").read_text()
    assert text in capsys.readouterr().out and "shared machine" in text and "load average" in text
    assert all(f"| {loop} |" in text for loop in video.LOOPS)
    samples = json.loads((tmp_path / "video.json").read_text())["results"][0]["samples"]
    answered = {s["loop"]: s["answered"] for s in samples}
    assert answered["naive"] == answered["watch, every"] == 6 and answered["watch, changes"] == 2


# --------------------------------------------------------------------------------------------------------------------
# The server: POST /v1/live (serve/live.py)


def _events(lines):
    """(event, data) pairs of a text/event-stream."""
    name, data = None, []
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif not line and name is not None:
            yield name, json.loads("\n".join(data))
            name, data = None, []


@pytest.fixture(scope="module")
def clip_server(clip_files):
    """The clip files over HTTP (what an allowed network source looks like to the server)."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(clip_files[".mkv"].parent))
    handler.log_message = lambda *args: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


@pytest.fixture(scope="module")
def live_server(tiny_bundle, clip_server):
    pytest.importorskip("fastapi", reason="the server needs the serve extra (pip install '.[serve]')")
    from tests.serve_helpers import serving

    with serving(tiny_bundle, parallel=2, live_sources=(clip_server, "/dev/video7")) as server:
        yield server


def test_live_endpoint_answers_pushed_frames_and_ends_on_disconnect(live_server, assistant, clip):
    import httpx

    from tests.serve_helpers import data_uri, png_bytes

    frames, starts = clip
    scheduler = live_server.state.scheduler
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        with client.stream("POST", "/v1/live", json={"question": QUESTION, "max_tokens": TOKENS}) as stream:
            assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
            events = _events(stream.iter_lines())
            kind, session = next(events)
            assert kind == "session" and session["source"] is None
            statuses, answers = [], []
            for i, image in enumerate(frames[:2 * HOLD]):  # two scenes, pushed one frame at a time
                reply = client.post(session["frames"], json={"image": data_uri(png_bytes(image)), "timestamp": i / FPS})
                assert reply.status_code == 202, reply.text
                statuses.append(reply.json()["status"])
                if statuses[-1] == "queued":
                    answers.append(next(events))
            assert statuses == (["queued"] + ["unchanged"] * (HOLD - 1)) * 2
            assert [kind for kind, _ in answers] == ["answer", "answer"]
            assert [a["frame_index"] for _, a in answers] == [0, HOLD]
            assert [a["skipped_since_last"] for _, a in answers] == [0, HOLD - 1]
            for (_, a), start in zip(answers, starts):  # the scheduler's answer is Assistant.ask's, token for token
                assert a["answer"] == assistant.ask(frames[start], QUESTION, max_new_tokens=TOKENS)
            # a new scene, then the client goes away before its answer
            client.post(session["frames"], json={"image": data_uri(png_bytes(frames[starts[2]]))})
        deadline = time.monotonic() + 15
        while client.post(session["frames"], json={"image": data_uri(png_bytes(frames[0]))}).status_code != 404:
            assert time.monotonic() < deadline, "the session outlived its event stream"
            time.sleep(0.1)
        while scheduler.running or scheduler.queue_depth:
            assert time.monotonic() < deadline, "the answer of a closed session kept running"
            time.sleep(0.05)
        gone = client.post(session["frames"], json={"image": data_uri(png_bytes(frames[0]))})
        assert gone.json()["error"]["code"] == "session_not_found"


def test_a_client_pushing_faster_than_the_server_answers_gets_its_frames_dropped(live_server, clip):
    import httpx

    from tests.serve_helpers import data_uri, png_bytes

    frames, starts = clip
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        with client.stream("POST", "/v1/live", json={"question": QUESTION, "max_tokens": 48,
                                                     "every_change": False}) as stream:
            events = _events(stream.iter_lines())
            _, session = next(events)
            pushed = [client.post(session["frames"], json={"image": data_uri(png_bytes(frames[i % len(frames)]))})
                      for i in range(12)]
            assert all(r.status_code == 202 and r.json()["status"] == "queued" for r in pushed)
            dropped = pushed[-1].json()["dropped"]
            answered = []
            while len(answered) < 12 - dropped:
                kind, answer = next(events)
                answered.append(answer)
            assert dropped > 0 and answered[-1]["frame_index"] == 11  # the newest frame, never a backlog
            assert sum(a["dropped_since_last"] for a in answered) == dropped


def test_live_sources_are_only_those_the_operator_allowed(live_server, clip_server, clip):
    import httpx

    _, starts = clip
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        for source in ("/etc/passwd", "/dev/video0", "http://example.com/clip.mkv", "camera:7"):
            refused = client.post("/v1/live", json={"question": QUESTION, "source": source})
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "source_not_allowed"
            assert clip_server in refused.json()["error"]["message"]
        for body, param in (({"question": " "}, "question"), ({"question": QUESTION, "fps": 0}, "fps"),
                            ({"question": QUESTION, "colour": 1}, "colour")):
            bad = client.post("/v1/live", json=body)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == param
        with client.stream("POST", "/v1/live", json={"question": QUESTION, "max_tokens": TOKENS,
                                                     "source": clip_server + "clip.mkv"}) as stream:
            assert stream.status_code == 200
            events = list(_events(stream.iter_lines()))
    assert events[0][0] == "session" and events[-1] == ("end", {"reason": "source ended"})
    answered = [data["frame_index"] for kind, data in events if kind == "answer"]
    assert answered and set(answered) <= set(starts)  # played in real time: a scene may pass while busy, never noise


# --------------------------------------------------------------------------------------------------------------------
# The page's Live mode in headless Chromium, on its fake camera playing a .y4m of the synthetic scenes


def _chromium_with_fake_camera(y4m: Path, profile: Path):
    import shutil

    pytest.importorskip("selenium", reason="the browser test drives Chromium with Selenium (pip install '.[dev]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("the browser test needs Debian's chromium and chromium-driver: apt-get install -y chromium "
                    "chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--hide-scrollbars",
                 "--force-color-profile=srgb", "--window-size=1100,1000", f"--user-data-dir={profile}",
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                 f"--use-file-for-fake-video-capture={y4m}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_path), options=options)


def test_the_page_live_mode_answers_the_fake_camera_and_stops(live_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    frames, _ = scene_clip(3, 12, size=224, seed=1)  # 3 scenes of 1.2 s, looped by Chromium
    y4m = write_video(tmp_path / "camera.y4m", frames, fps=FPS)
    driver = _chromium_with_fake_camera(y4m, tmp_path / "profile")
    try:
        driver.get(live_server.url + "/")
        by_id = lambda name: driver.find_element(By.ID, name)  # noqa: E731
        WebDriverWait(driver, 30).until(lambda d: by_id("live").is_displayed())
        question = by_id("liveQuestion")
        question.clear()
        question.send_keys("What colour is the big shape?")
        by_id("liveStart").click()
        WebDriverWait(driver, 60, poll_frequency=0.1).until(
            lambda d: by_id("liveAnswer").text and by_id("liveStats").text.startswith(("3 answers", "4 answers")))
        stats = by_id("liveStats").text
        assert " unchanged" in stats and not stats.startswith("0 answers")
        assert int(stats.split(" frames sent, ")[1].split(" ")[0]) > 0, stats  # some frames skipped as unchanged
        sessions = live_server.state.live_sessions
        assert len(sessions) == 1
        if os.environ.get("SQLLAVA_EDGE_SCREENSHOTS") == "1":
            driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", by_id("live"))
            (ROOT / "docs" / "web-live.png").write_bytes(driver.get_screenshot_as_png())
        by_id("liveStop").click()
        deadline = time.monotonic() + 15
        while sessions:  # the page closed its event stream: the server ended the session
            assert time.monotonic() < deadline, "the live session outlived the page's Stop"
            time.sleep(0.1)
        assert by_id("liveStart").is_displayed() and not by_id("liveError").is_displayed()
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()
