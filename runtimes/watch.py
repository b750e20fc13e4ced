"""A standing question over a video: answer it again whenever the picture changes, at the rate the device allows.

    for answer in watch(scheduler, open_source("clip.mp4"), prompt_ids, config, fps=2):
        answer.timestamp, answer.frame_index, answer.answer, answer.latency, answer.skipped_since_last

Three parts, each usable alone (the server drives the last two with frames a browser pushes):
  reader    a thread pulling frames from the source (sqllava_edge.video); a live source is read at its own pace, a
            file as fast as answers are taken (or paced by its timestamps with realtime=True, as a camera would be)
  Gate      sampling at `fps` on the frames' timestamps, then (every_change) only frames whose 32 x 32 grey thumbnail
            differs from the last admitted one by more than `threshold` (mean absolute difference, grey levels 0-255);
            an unchanged frame is skipped and counted, and the last answer stands for it
  Mailbox   one slot between reader and answerer: a new frame replaces one still waiting (counted as dropped), so a
            source faster than the device never builds a backlog and memory stays bounded (the frame waiting, the one
            being answered, the one being read)
The answerer takes the newest frame, encodes it with the engine's vision backend, prefills the standing prompt (its
text prefix is reused from the KV cache) and decodes a short answer. Latency is per answered frame, end to end: from
the moment the reader got the frame to the answer's last token, waiting in the slot included.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from sqllava_edge.video import Frame, VideoSource, open_source

DEFAULT_THRESHOLD = 6.0  # grey levels: above sensor noise on a 32 x 32 thumbnail, below a person entering a room
THUMBNAIL = 32  # pixels per side of the grey thumbnail compared between frames
WATCH_TOKENS = 32  # default answer length: a standing question wants a short answer, fast
WATCH_DESCRIBE = 96  # longest description the self-questions on a scene change are conditioned on
JOIN_TIMEOUT = 5.0  # seconds to wait for the reader thread when the watch ends


@dataclass(frozen=True)
class FrameAnswer:
    timestamp: float  # the answered frame's time in the source, seconds
    frame_index: int  # its index in the source
    answer: str
    latency: float  # seconds from reading the frame to the end of its answer
    skipped_since_last: int  # unchanged frames since the previous answer (the previous answer stood for them)
    dropped_since_last: int = 0  # changed frames replaced by a newer one before the device was free
    questions: tuple[str, ...] = ()  # the model's own questions about this frame (watch(..., questions=...))


def thumbnail(image: np.ndarray) -> np.ndarray:
    """(THUMBNAIL, THUMBNAIL) float32 grey levels of an (H, W, 3) uint8 RGB frame (box-filtered, so noise averages)."""
    from PIL import Image

    grey = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("L")
    return np.asarray(grey.resize((THUMBNAIL, THUMBNAIL), Image.BOX), dtype=np.float32)


def difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two thumbnails, in grey levels (0 = identical, 255 = black vs white)."""
    return float(np.abs(a - b).mean())


class Gate:
    """Decides which frames of a stream are worth an answer; counts the unchanged ones it skips."""

    def __init__(self, fps: float | None = None, every_change: bool = True, threshold: float = DEFAULT_THRESHOLD):
        if fps is not None and not fps > 0:
            raise ValueError(f"fps must be > 0 (or None: every frame the device can take), got {fps}")
        if not threshold >= 0:
            raise ValueError(f"the change threshold must be >= 0 grey levels, got {threshold}")
        self.fps, self.every_change, self.threshold = fps, every_change, threshold
        self.skipped = 0  # unchanged frames, in all
        self.verdict = ""  # about the last frame offered: "admitted" | "unchanged" | "sampled out"
        self.sampled = 0  # frames that passed the rate sampling, in all
        self._slot = -1  # the last 1/fps interval a frame was sampled in
        self._reference: np.ndarray | None = None  # thumbnail of the last admitted frame

    def admit(self, timestamp: float, image: np.ndarray) -> bool:
        if self.fps is not None:
            slot = math.floor(timestamp * self.fps + 1e-6)  # one frame per 1/fps of source time
            if slot <= self._slot:
                self.verdict = "sampled out"
                return False
            self._slot = slot
        self.sampled += 1
        self.verdict = "admitted"
        if not self.every_change:
            return True
        thumb = thumbnail(image)
        if self._reference is not None and difference(thumb, self._reference) <= self.threshold:
            self.skipped += 1
            self.verdict = "unchanged"
            return False
        self._reference = thumb
        return True


@dataclass
class Pending:
    frame: Frame
    arrived: float  # time.monotonic() when the reader got it
    skipped: int  # Gate.skipped when it was admitted


class Mailbox:
    """One frame between a producer and the answerer. `put` replaces a frame still waiting (counted in `dropped`),
    or with wait=True blocks until the slot is free (a file read no faster than it is answered)."""

    def __init__(self, wait: bool = False, notify: Callable[[], None] | None = None):
        self.wait, self.notify = wait, notify  # notify(): called after each put and at close (from that thread)
        self.dropped = 0
        self._item: Any = None
        self._closed = False
        self._cond = threading.Condition()

    def put(self, item) -> bool:
        """False once closed (the answerer is gone: stop producing)."""
        with self._cond:
            while self.wait and self._item is not None and not self._closed:
                self._cond.wait()
            if self._closed:
                return False
            if self._item is not None:
                self.dropped += 1
            self._item = item
            self._cond.notify_all()
        if self.notify is not None:
            self.notify()
        return True

    def get(self, timeout: float | None = None):
        """The waiting item (the slot empties), or None when closed and empty, or after `timeout` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._item is not None or self._closed, timeout):
                return None
            item, self._item = self._item, None
            self._cond.notify_all()
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self.notify is not None:
            self.notify()

    @property
    def closed(self) -> bool:
        return self._closed


def as_source(source) -> tuple[VideoSource | Iterable[Frame], bool]:
    """(frames, opened here): a VideoSource or an iterable of Frames as given, anything else through open_source."""
    if isinstance(source, VideoSource) or (hasattr(source, "__iter__") and not isinstance(source, (str, bytes))
                                           and not hasattr(source, "__fspath__")):
        return source, False
    return open_source(source), True


def watch_frames(source, answer: Callable[[np.ndarray], str | tuple[str, tuple[str, ...]]], *, fps: float | None = None,
                 every_change: bool = True, threshold: float = DEFAULT_THRESHOLD,
                 realtime: bool | None = None) -> Iterator[FrameAnswer]:
    """FrameAnswers for `source` (a VideoSource, an iterable of Frames, or a spec for open_source), `answer(image)`
    called on each admitted frame (-> the answer, or (answer, questions)). realtime: a non-live source is read at the pace of its timestamps (as if it were a
    camera: frames the device cannot take are dropped) instead of as fast as answers are taken (None: live sources
    only). The source opens (and a bad one raises) at this call; closing the iterator stops the reader and closes a
    source opened here."""
    gate = Gate(fps, every_change, threshold)
    frames, owned = as_source(source)
    live = bool(getattr(frames, "live", False))
    realtime = live if realtime is None else realtime
    return _answers(frames, owned, answer, gate, realtime, live)


def _answers(frames, owned: bool, answer: Callable, gate: Gate, realtime: bool, live: bool) -> Iterator[FrameAnswer]:
    box = Mailbox(wait=not realtime)
    failure: list[BaseException] = []
    reader = threading.Thread(target=read_into, args=(frames, gate, box, realtime and not live, failure),
                              name="sqllava-edge-watch-reader", daemon=True)
    reader.start()
    skipped = dropped = 0
    try:
        while (item := box.get()) is not None:
            reply = answer(item.frame.image)
            text, questions = reply if isinstance(reply, tuple) else (reply, ())
            done = time.monotonic()
            yield FrameAnswer(item.frame.timestamp, item.frame.index, text, done - item.arrived,
                              item.skipped - skipped, box.dropped - dropped, tuple(questions))
            skipped, dropped = item.skipped, box.dropped
        if failure:
            raise failure[0]
    finally:
        box.close()
        reader.join(JOIN_TIMEOUT)
        if owned:
            frames.close()


def read_into(frames: Iterable[Frame], gate: Gate, box: Mailbox, pace: bool, failure: list) -> None:
    """The reader: frames through the gate into the box until the source ends or the box closes (then closes the
    box). pace: sleep until each frame's timestamp (a file played as a camera). Errors are appended to `failure`."""
    start = time.monotonic()
    try:
        for frame in frames:
            if box.closed:
                return
            if pace:  # a file played as a camera: the frame exists only from its timestamp on
                delay = start + frame.timestamp - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            if gate.admit(frame.timestamp, frame.image) and not box.put(Pending(frame, time.monotonic(), gate.skipped)):
                return
    except BaseException as exc:  # noqa: BLE001 - handed to the answerer's thread, raised there
        failure.append(exc)
    finally:
        box.close()


def watch(scheduler, source, prompt_ids, config, *, questions: Callable[[np.ndarray], Any] | None = None,
          **options) -> Iterator[FrameAnswer]:
    """`watch_frames` answering on `scheduler` (runtimes.scheduler.Scheduler, e.g. `Assistant.scheduler`): each
    admitted frame is encoded (or found in the image cache), `prompt_ids` (one image placeholder) prefilled and
    `config` decoded; `questions(image)`, if given, adds the model's own questions about the frame (SQ-LLaVA's
    self-questioning on a scene change)."""
    from runtimes.scheduler import Request
    from runtimes.tasks import pieces

    def answer(image: np.ndarray):
        text = "".join(pieces(scheduler, Request(list(prompt_ids), image, config))).strip()
        return (text, tuple(questions(image))) if questions is not None else text

    return watch_frames(source, answer, **options)
