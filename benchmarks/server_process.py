"""`sqllava-edge serve` in a child process for the serving benchmarks (benchmarks.serve, benchmarks.soak): started
on 127.0.0.1, ready when /health answers 200, stopped with SIGTERM (SIGKILL after 60 s). Its stderr goes to a file
(`log`), never to a pipe nobody reads: a full pipe would block the server's logging, and with it its event loop."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class ServerProcess:
    def __init__(self, bundle: Path, port: int, flags: list[str], env: dict[str, str] | None = None,
                 ready_s: float = 600.0):
        self.url = f"http://127.0.0.1:{port}"
        self.cmd = [sys.executable, "-m", "sqllava_edge.serve", str(bundle), "--port", str(port), *flags]
        self.env, self.ready_s = env or {}, ready_s
        self.proc: subprocess.Popen | None = None
        self.log: Path | None = None  # the server's stderr

    def __enter__(self) -> "ServerProcess":
        import httpx

        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.env}
        env.pop("SQLLAVA_EDGE_API_KEY", None)
        handle, name = tempfile.mkstemp(prefix="sqllava-edge-serve-", suffix=".log")
        self.log = Path(name)
        with os.fdopen(handle, "w") as stderr:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stderr=stderr)
        deadline = time.monotonic() + self.ready_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {self.log.read_text()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.__exit__()
        raise RuntimeError(f"the server did not become ready in {self.ready_s:.0f} s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
