"""Video sources: the frames of a file, a network stream, a camera, a folder of images or a GStreamer pipeline, as
RGB arrays with timestamps.

    with open_source("clip.mp4") as source:          # a file: every frame, timed by its presentation timestamp
        for frame in source: frame.index, frame.timestamp, frame.image   # (H, W, 3) uint8 RGB
    open_source("rtsp://camera.local/stream")        # RTSP / RTMP / HTTP / UDP streams (FFmpeg's demuxers)
    open_source("/dev/video0")                       # a V4L2 (USB / CSI) camera; "camera:0" is the same device
    open_source("frames/")                           # a folder of images in name order, `rate` frames per second
    open_source("gst:nvarguscamerasrc ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! appsink")

Files, streams and cameras decode through PyAV (the `video` extra: FFmpeg's libraries in one pip wheel, no system
FFmpeg needed). PyAV rather than OpenCV's VideoCapture because it gives each frame's presentation timestamp (sampling
a file at a target rate needs it), takes FFmpeg's per-source options (RTSP over TCP, V4L2 size and rate, timeouts) and
also writes video (the tests and the demo make their clips with it); OpenCV's pip wheels are built without GStreamer
anyway. Speed does not decide it: measured 2026-12-07 on the shared 2-core test host, a 300-frame 480 x 480 MPEG-4
clip decodes to RGB arrays at 1,100-2,100 frames/s with PyAV (4,500 without the colour conversion) and 4,500 with
opencv-python-headless 5.1, both hundreds of times the rate a model answers at. A GStreamer pipeline (how Jetson cameras are usually read: nvarguscamerasrc) is the one
exception: it is passed as is to OpenCV's VideoCapture with the GStreamer backend, which JetPack's OpenCV has
(`apt install python3-opencv` there); that path is not tested here (no GStreamer, no Jetson).

A source is `live` when its frames arrive in real time (cameras, RTSP / RTMP / UDP / SRT streams, pipelines): a
consumer slower than it must drop frames (runtimes.watch does). A file or a folder is read as fast as it is consumed.
Timestamps are seconds: the presentation time for files, the time since opening for live sources, index / rate for
folders. No runtimes import here: this is core, shared by the CLI, the Python API and the server.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".ppm")
LIVE_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "udp://", "srt://", "tcp://")
STREAM_SCHEMES = LIVE_SCHEMES + ("http://", "https://")
OPEN_TIMEOUT = 10.0  # seconds to open a network stream or camera
READ_TIMEOUT = 10.0  # seconds without data before a network stream counts as ended


@dataclass(frozen=True)
class Frame:
    index: int  # position in the source, counting every frame decoded (0 = the first)
    timestamp: float  # seconds (see the module docstring)
    image: np.ndarray  # (H, W, 3) uint8 RGB


class VideoSource:
    """Frames of one source, in order. Iterate it once; close it (or use `with`) to release the device or stream."""

    live = False
    description = ""

    def frames(self) -> Iterator[Frame]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Frame]:
        return self.frames()

    def close(self) -> None:
        pass

    def __enter__(self) -> "VideoSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r}, live={self.live})"


def open_source(spec: str | os.PathLike, *, rate: float = 1.0, live: bool | None = None) -> VideoSource:
    """A source from what a user typed: a file, a stream URL, /dev/videoN or camera:N, a folder, gst:PIPELINE.
    `rate`: frames per second of a folder of images. `live`: override whether frames arrive in real time (e.g. True
    for an HTTP stream of a camera; HTTP URLs count as files by default)."""
    text = os.fspath(spec).strip()
    if not text:
        raise ValueError("the video source is empty; give a file, a folder of images, a stream URL, /dev/videoN, "
                         "camera:N or gst:PIPELINE")
    if text.startswith("gst:"):
        return GStreamerSource(text[4:].strip())
    if text.startswith("camera:"):
        index = text[7:]
        if not index.isdigit():
            raise ValueError(f"camera:{index} is not a camera number; use camera:0 for /dev/video0")
        text = f"/dev/video{index}"
    if text.startswith("/dev/video"):
        return AVSource(text, live=True, format="v4l2")
    if text.lower().startswith(STREAM_SCHEMES):
        return AVSource(text, live=text.lower().startswith(LIVE_SCHEMES) if live is None else live)
    path = Path(text)
    if path.is_dir():
        return FolderSource(path, rate)
    if not path.exists():
        raise FileNotFoundError(f"video source {text} does not exist; give a video file, a folder of images, a stream "
                                "URL (rtsp://, http://, ...), /dev/videoN or camera:N, or gst:PIPELINE")
    return AVSource(text, live=bool(live))


class AVSource(VideoSource):
    """A file, a network stream or a V4L2 camera, decoded by PyAV (FFmpeg)."""

    def __init__(self, url: str, *, live: bool, format: str | None = None, options: dict[str, str] | None = None):
        from sqllava_edge.deps import require

        av = require("av", "video", "reading video")
        self.url, self.live, self.description = url, live, url
        opts = dict(options or {})
        if url.lower().startswith(("rtsp://", "rtsps://")):
            opts.setdefault("rtsp_transport", "tcp")  # no lost UDP packets smearing frames
        try:
            self._container = av.open(url, format=format, options=opts, timeout=(OPEN_TIMEOUT, READ_TIMEOUT))
        except av.error.FileNotFoundError:
            raise FileNotFoundError(f"video source {url} does not exist") from None
        except (av.error.FFmpegError, OSError) as exc:
            what = "camera" if format == "v4l2" else "video"
            raise ValueError(f"cannot open the {what} {url}: {exc}; check the path, the URL or the device "
                             "(and that no other program holds the camera)") from None
        if not self._container.streams.video:
            self._container.close()
            raise ValueError(f"{url} has no video stream")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"  # frame- and slice-threaded decoding where the codec allows
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.rate = float(rate) if rate else None  # nominal frames per second, when the container says

    def frames(self) -> Iterator[Frame]:
        import av

        start = time.monotonic()
        index = 0
        try:
            for frame in self._container.decode(self._stream):
                if self.live:
                    timestamp = time.monotonic() - start
                elif frame.time is not None:
                    timestamp = float(frame.time)
                else:
                    timestamp = index / (self.rate or 1.0)
                yield Frame(index, timestamp, frame.to_ndarray(format="rgb24"))
                index += 1
        except av.error.FFmpegError as exc:
            if not self.live:
                raise ValueError(f"decoding {self.url} failed at frame {index}: {exc}") from None
            # a live stream that broke off ends like a finished one; the caller sees the frames it got

    def close(self) -> None:
        self._container.close()


class FolderSource(VideoSource):
    """The images of a folder in name order, `rate` frames per second."""

    def __init__(self, folder: Path, rate: float):
        if rate <= 0:
            raise ValueError(f"the frame rate of a folder must be > 0, got {rate}")
        self.paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.rate, self.description = rate, str(folder)

    def frames(self) -> Iterator[Frame]:
        from sqllava_edge.image import load_image

        for index, path in enumerate(self.paths):
            yield Frame(index, index / self.rate, np.asarray(load_image(path)))


class GStreamerSource(VideoSource):
    """A GStreamer pipeline ending in appsink, read by OpenCV's GStreamer backend (JetPack's OpenCV). Untested here."""

    live = True

    def __init__(self, pipeline: str):
        if not pipeline:
            raise ValueError("gst: needs a pipeline ending in appsink, e.g. gst:v4l2src ! videoconvert ! appsink")
        try:
            import cv2
        except ImportError:
            raise ValueError("a GStreamer pipeline is read with OpenCV built with GStreamer, which is not installed "
                             "here; on Jetson: apt install python3-opencv (JetPack's build has GStreamer)") from None
        if not re.search(r"GStreamer:\s*YES", cv2.getBuildInformation()):
            raise ValueError("this OpenCV is built without GStreamer (pip's opencv wheels are); use JetPack's "
                             "python3-opencv, or read the camera as /dev/videoN")
        self._cv2, self.description = cv2, pipeline
        self._capture = cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER)
        if not self._capture.isOpened():
            raise ValueError(f"GStreamer could not start the pipeline {pipeline!r}; try it with gst-launch-1.0 first")

    def frames(self) -> Iterator[Frame]:
        start, index = time.monotonic(), 0
        while True:
            ok, bgr = self._capture.read()
            if not ok:
                return
            yield Frame(index, time.monotonic() - start, self._cv2.cvtColor(bgr, self._cv2.COLOR_BGR2RGB))
            index += 1

    def close(self) -> None:
        self._capture.release()


def write_video(path: str | os.PathLike, images, fps: float = 10.0, codec: str | None = None) -> Path:
    """Write RGB frames ((H, W, 3) uint8 arrays or PIL images) to a video file with PyAV. The codec follows the
    suffix: .mkv lossless FFV1 (planar RGB), .y4m raw I420 (Chromium's fake camera reads it), .mp4 / .avi MPEG-4 Part 2."""
    from fractions import Fraction

    from sqllava_edge.deps import require
    from sqllava_edge.fileutil import atomic_path

    av = require("av", "video", "writing video")
    path = Path(path)
    suffix = path.suffix.lower()
    codec = codec or {".mkv": "ffv1", ".y4m": "rawvideo"}.get(suffix, "mpeg4")
    pix_fmt = {"ffv1": "bgr0", "rawvideo": "yuv420p"}.get(codec, "yuv420p")
    with atomic_path(path) as tmp:
        with av.open(str(tmp), "w") as out:  # the container follows the suffix (kept by the temporary name)
            stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
            stream.pix_fmt = pix_fmt
            if codec == "mpeg4":
                stream.options = {"qscale": "2"}  # near-lossless: a repeated frame decodes (almost) unchanged
            for i, image in enumerate(images):
                array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)
                if i == 0:
                    stream.height, stream.width = array.shape[:2]
                for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    return path
