"""Shared by the server tests: a tiny random-weight bundle exported once per session, a real uvicorn server on
127.0.0.1 in a thread of the test process (so tests can read its scheduler's counters), and image data URIs.

The bundle's LLM matrices are redrawn with std 0.2 (as in test_runtime.py) so greedy answers are long and varied:
EOS, 1 of 32000 ids, is practically never the argmax, so equality checks cover every requested token.
"""
from __future__ import annotations

import contextlib
import io
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from sqllava_edge.serve.protocol import data_uri  # noqa: F401  (re-exported for the tests)

ROOT = Path(__file__).resolve().parents[1]
THREADS = 1  # see test_runtime.py: one llama.cpp thread is fastest on a shared 2-core machine


def make_tiny_bundle(folder: Path) -> Path:
    import torch

    from sqllava_edge.checkpoint import save_checkpoint
    from sqllava_edge.config import get_preset
    from sqllava_edge.model import SQLLaVA
    from sqllava_edge.tokenizer import default_tokenizer

    model = SQLLaVA.from_config(get_preset("tiny"), seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.llm.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2, generator=gen)
    ckpt = save_checkpoint(folder / "ckpt", model, default_tokenizer())
    out = folder / "bundle"
    cmd = [sys.executable, "-m", "export", str(ckpt), "--out", str(out), "--quant", "f32", "--vision-precision", "fp32",
           "--calibration-pairs", "4"]  # fidelity on 4 pairs keeps the session's export short
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return out


def image(i: int, size: tuple[int, int] | None = None) -> Image.Image:
    rng = np.random.default_rng(100 + i)
    h, w = size or (60 + 13 * i, 140 - 7 * i)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """A real uvicorn server (sockets on 127.0.0.1) serving `create_app(load, settings)`, run on a thread."""

    def __init__(self, load, settings, port: int | None = None):
        import uvicorn

        from sqllava_edge.serve.app import create_app

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(load, settings)
        self.state = self.app.state.sqllava
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)

    def start(self, wait_ready: bool = True, timeout: float = 120.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        if wait_ready and not self.state.ready.wait(timeout):
            raise RuntimeError(f"the test server's model did not load: {self.state.error}")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def serving(bundle: Path, **settings):
    """A server on `bundle` (fp32 vision, one thread) with Settings(**settings)."""
    from sqllava_edge.assistant import Assistant
    from sqllava_edge.serve.app import Settings

    sequences = settings.pop("sequences", 16)
    n_ctx = settings.pop("n_ctx", 4096)

    def load():
        return Assistant.load(bundle, vision_precision="fp32", n_threads=THREADS, n_ctx=n_ctx, sequences=sequences)

    server = ServerThread(load, Settings(**settings)).start()
    try:
        yield server
    finally:
        server.stop()
