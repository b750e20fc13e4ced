"""A bounded soak of `sqllava-edge serve` under legal and hostile load, on 127.0.0.1 only; it stops by itself.

    python -m benchmarks.soak [--bundle BUNDLE | --preset tiny] [--seconds 60] [--clients 6] [--hostile 2]

One server process (--parallel 2, --queue 4, so the legal clients reach the queue's limit). Two phases of --seconds
each on the same server: "clean" (the legal clients alone), then "hostile" (the same legal clients, plus --hostile
threads sending abandoned connections and hostile bodies). Legal clients loop over a mix of streamed image questions
(four images, so most hit the image cache), non-streamed text questions and cache-hit follow-ups (a second turn on a
conversation already answered). Reports per phase: requests served, 4xx / 5xx, 503s at the queue's limit, p50 / p99
latency of the legal requests that were served; the server's RSS over time (a plot); the gauges after the load
(running requests, queue, busy slots: anything left is a leak). Writes benchmarks/results-soak.json,
benchmarks/soak.md and docs/soak-rss.png (or under --out).
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.report import write_text_and_json
from benchmarks.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
LEGAL_KINDS = ("stream-image", "text", "follow-up")
HOSTILE_KINDS = ("abandon-stream", "abandon-whole", "half-body", "long-stop", "deep-json", "many-messages",
                 "wide-image", "huge-image", "text-plain", "foreign-host")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--bundle", type=Path, help="deployment bundle folder")
    what.add_argument("--preset", default="tiny", help="random-weight preset bundle (benchmarks.presets; default tiny)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each phase (default 60)")
    parser.add_argument("--clients", type=int, default=6, help="legal client threads (default 6)")
    parser.add_argument("--hostile", type=int, default=2, help="hostile client threads in the second phase (2)")
    parser.add_argument("--new-tokens", type=int, default=16, help="max_tokens of the legal requests (16)")
    parser.add_argument("--port", type=int, default=8798, help="server port on 127.0.0.1 (default 8798)")
    parser.add_argument("--threads", type=int, default=1, help="server CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks",
                        help="folder for results-soak.json and soak.md (default benchmarks/)")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "soak-rss.png", help="RSS plot (docs/soak-rss.png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.bundle:
        bundle = args.bundle
    else:
        from benchmarks.presets import ensure_preset

        _, bundle = ensure_preset(args.preset)
    server = _Server(bundle, args)
    with server:
        sampler = _RSS(server.proc.pid)
        sampler.start()
        client = _Clients(server.url, args)
        client.legal_once()  # warm-up: first-call costs out of the numbers
        sampler.mark("warm")
        phases = {}
        for name, hostile in (("clean", 0), ("hostile", args.hostile)):
            print(f"[soak] {name}: {args.clients} legal + {hostile} hostile clients for {args.seconds:g} s",
                  file=sys.stderr, flush=True)
            sampler.mark(name)
            phases[name] = client.phase(args.seconds, hostile)
        sampler.mark("end")
        leftover = _settle(server.url)
        sampler.stop()
    result = _result(bundle, args, phases, sampler, leftover)
    report = _report(result)
    print(report)
    write_text_and_json(args.out, "soak", report, result)
    os.replace(args.out / "soak.json", args.out / "results-soak.json")
    _plot(sampler, args.plot)
    print(f"[soak] wrote {args.out}/soak.md, {args.out}/results-soak.json, {args.plot}", file=sys.stderr)
    return 0


def _Server(bundle: Path, args) -> ServerProcess:
    flags = ["--parallel", "2", "--queue", "4", "--threads", str(args.threads), "--timeout", "120"]
    return ServerProcess(bundle, args.port, flags, env={"SQLLAVA_EDGE_TUNE": "0"}, ready_s=300)


class _RSS:
    """The server's resident memory every 0.5 s, with named marks (phase boundaries)."""

    def __init__(self, pid: int):
        import psutil

        self.process = psutil.Process(pid)
        self.samples: list[tuple[float, float]] = []  # (s since start, MB)
        self.marks: dict[str, float] = {}
        self.t0 = time.monotonic()
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            self.samples.append((time.monotonic() - self.t0, self.process.memory_info().rss / 2**20))
            time.sleep(0.5)

    def mark(self, name: str) -> None:
        self.marks[name] = time.monotonic() - self.t0

    def stop(self) -> None:
        self.running = False
        self.thread.join()

    def between(self, start: str, stop: str) -> list[float]:
        return [mb for t, mb in self.samples if self.marks[start] <= t <= self.marks[stop]]


class _Clients:
    def __init__(self, url: str, args):
        from PIL import Image

        from sqllava_edge.serve.protocol import data_uri

        self.url, self.args = url, args
        host, port = url.removeprefix("http://").split(":")
        self.address = (host, int(port))
        rng = random.Random(0)
        self.images = [data_uri(Image.new("RGB", (160 + 16 * i, 120), tuple(rng.randrange(256) for _ in range(3))))
                       for i in range(4)]
        self.wide = data_uri(_png(40 * 800, 800))  # 40:1, over --max-aspect-ratio
        self.huge = data_uri(_png(8000, 8000))  # 64 MP, over --max-image-mpix

    # -- one phase

    def phase(self, seconds: float, hostile: int) -> dict:
        stop = time.monotonic() + seconds
        legal: list[dict] = []
        bad: list[dict] = []
        threads = [threading.Thread(target=self._legal_loop, args=(stop, i, legal), daemon=True)
                   for i in range(self.args.clients)]
        threads += [threading.Thread(target=self._hostile_loop, args=(stop, i, bad), daemon=True)
                    for i in range(hostile)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + 180)
        return {"seconds": time.monotonic() - started, "legal": legal, "hostile": bad}

    def legal_once(self) -> None:
        self._legal("stream-image", random.Random(0))

    def _legal_loop(self, stop: float, index: int, out: list) -> None:
        rng = random.Random(index)
        while time.monotonic() < stop:
            out.append(self._legal(LEGAL_KINDS[rng.randrange(len(LEGAL_KINDS))], rng))

    def _legal(self, kind: str, rng: random.Random) -> dict:
        import httpx

        question = {"role": "user", "content": f"Question {rng.randrange(1000)}: what do you see?"}
        if kind == "stream-image":
            question = {"role": "user", "content": [{"type": "text", "text": "Describe the picture."},
                                                    {"type": "image_url", "image_url": {"url": rng.choice(self.images)}}]}
        messages = [question]
        if kind == "follow-up":
            first = {"model": "soak", "messages": messages, "max_tokens": self.args.new_tokens}
            try:
                answer = httpx.post(self.url + "/v1/chat/completions", json=first, timeout=120)
            except httpx.HTTPError as exc:
                return {"kind": kind, "status": 0, "latency": None, "error": type(exc).__name__}
            if answer.status_code != 200:
                return {"kind": kind, "status": answer.status_code, "latency": None}
            messages = messages + [{"role": "assistant", "content": answer.json()["choices"][0]["message"]["content"]},
                                   {"role": "user", "content": "And then?"}]
        body = {"model": "soak", "messages": messages, "max_tokens": self.args.new_tokens,
                "stream": kind == "stream-image"}
        started = time.perf_counter()
        try:
            if body["stream"]:
                with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=120) as response:
                    status = response.status_code
                    text = "".join(response.iter_text())
                    if status == 200 and '"error"' in text:
                        status = 599  # an error inside the stream
            else:
                status = httpx.post(self.url + "/v1/chat/completions", json=body, timeout=120).status_code
        except httpx.HTTPError as exc:
            return {"kind": kind, "status": 0, "latency": None, "error": type(exc).__name__}
        return {"kind": kind, "status": status, "latency": time.perf_counter() - started}

    # -- hostile

    def _hostile_loop(self, stop: float, index: int, out: list) -> None:
        rng = random.Random(100 + index)
        while time.monotonic() < stop:
            kind = HOSTILE_KINDS[rng.randrange(len(HOSTILE_KINDS))]
            try:
                status = getattr(self, "_" + kind.replace("-", "_"))()
            except OSError as exc:
                status = f"{type(exc).__name__}"
            out.append({"kind": kind, "status": status})

    def _send(self, head_extra: bytes, body: bytes, content_type: bytes = b"application/json",
              host: bytes | None = None) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=30)
        host = host or f"{self.address[0]}:{self.address[1]}".encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: " + content_type +
                     b"\r\nContent-Length: %d\r\n" % len(body) + head_extra + b"\r\n" + body)
        return sock

    def _status(self, sock: socket.socket) -> int | str:
        with sock:
            head = sock.recv(64)
        parts = head.split(b" ")
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else "no answer"

    def _json(self, body: dict, **kwargs) -> int | str:
        return self._status(self._send(b"", json.dumps(body).encode(), **kwargs))

    def _abandon_stream(self) -> str:
        body = {"messages": [{"role": "user", "content": "Talk"}], "max_tokens": 400, "stream": True}
        sock = self._send(b"", json.dumps(body).encode())
        time.sleep(0.3)
        sock.close()
        return "closed"

    def _abandon_whole(self) -> str:
        body = {"messages": [{"role": "user", "content": "Talk"}], "max_tokens": 400}
        sock = self._send(b"", json.dumps(body).encode())
        time.sleep(0.3)
        sock.close()
        return "closed"

    def _half_body(self) -> str:
        sock = socket.create_connection(self.address, timeout=30)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n{\"messages\": [")
        time.sleep(1.0)
        sock.close()
        return "closed"

    def _long_stop(self):
        return self._json({"messages": [{"role": "user", "content": "hi"}], "stop": ["a" * 1_000_000]})

    def _deep_json(self):
        return self._status(self._send(b"", b"[" * 200_000))

    def _many_messages(self):
        return self._json({"messages": [{"role": "user", "content": "a"}] * 60_000})

    def _wide_image(self):
        return self._json({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": self.wide}}]}]})

    def _huge_image(self):
        return self._json({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": self.huge}}]}]})

    def _text_plain(self):
        return self._json({"messages": [{"role": "user", "content": "hi"}]}, content_type=b"text/plain")

    def _foreign_host(self):
        return self._json({"messages": [{"role": "user", "content": "hi"}]}, host=b"evil.example")


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def _settle(url: str, timeout: float = 60.0) -> dict[str, float]:
    """Wait for the server to go idle -> its gauges (all 0 unless something leaked)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        gauges = {}
        for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
            name, _, value = line.partition(" ")
            if name in ("sqllava_running_requests", "sqllava_queue_depth", "sqllava_busy_slots"):
                gauges[name.removeprefix("sqllava_")] = float(value)
        if not any(gauges.values()) or time.monotonic() > deadline:
            return gauges
        time.sleep(0.5)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _summary(phase: dict) -> dict:
    legal, bad = phase["legal"], phase["hostile"]
    served = [r["latency"] for r in legal if r["status"] == 200]
    statuses = collections.Counter(str(r["status"]) for r in legal)
    hostile = collections.Counter(str(r["status"]) for r in bad)
    five = sum(n for s, n in (statuses + hostile).items() if s.startswith("5") and s != "503")
    return {"seconds": round(phase["seconds"], 1), "legal_requests": len(legal), "legal_served": len(served),
            "legal_503_queue_full": statuses.get("503", 0), "legal_statuses": dict(statuses),
            "hostile_requests": len(bad), "hostile_statuses": dict(hostile),
            "hostile_by_kind": {k: dict(collections.Counter(str(r["status"]) for r in bad if r["kind"] == k))
                                for k in sorted({r["kind"] for r in bad})},
            "5xx_other_than_503": five,
            "p50_s": _percentile(served, 0.50), "p99_s": _percentile(served, 0.99),
            "median_s": statistics.median(served) if served else None}


def _result(bundle, args, phases: dict, sampler: _RSS, leftover: dict) -> dict:
    from benchmarks.machine import machine_facts

    summaries = {name: _summary(phase) for name, phase in phases.items()}
    warm = sampler.between("warm", "end")
    after_warm = sampler.between("clean", "end")
    first, last = (after_warm[0], after_warm[-1]) if after_warm else (None, None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    clean, hostile = summaries["clean"], summaries["hostile"]
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit.strip(),
            "machine": machine_facts(int(args.threads)), "load_average": os.getloadavg(), "bundle": str(bundle),
            "args": {k: str(v) for k, v in vars(args).items()}, "phases": summaries,
            "p99_ratio_hostile_over_clean": (hostile["p99_s"] / clean["p99_s"]
                                             if clean["p99_s"] and hostile["p99_s"] else None),
            "rss_mb": {"after_warm_up": first, "end": last, "max": max(warm) if warm else None,
                       "growth_after_warm_up_pct": 100 * (last - first) / first if first else None},
            "rss_samples": sampler.samples, "marks": sampler.marks, "gauges_after": leftover}


def _report(result: dict) -> str:
    rss = result["rss_mb"]
    lines = [f"# Soak: `sqllava-edge serve` under legal and hostile load ({result['date']}, commit {result['commit']})",
             "",
             f"Bundle `{Path(result['bundle']).name}`, --parallel 2 --queue 4, {result['args']['clients']} legal clients, "
             f"{result['args']['hostile']} hostile threads in the second phase; load average at the end "
             f"{', '.join(f'{x:.1f}' for x in result['load_average'])} (a shared machine).", "",
             "| phase | legal sent | served (200) | 503 at the queue limit | p50 s | p99 s | hostile sent | other 5xx |",
             "|---|---|---|---|---|---|---|---|"]
    for name, p in result["phases"].items():
        fmt = (lambda v: f"{v:.3f}" if v is not None else "-")
        lines.append(f"| {name} | {p['legal_requests']} | {p['legal_served']} | {p['legal_503_queue_full']} | "
                     f"{fmt(p['p50_s'])} | {fmt(p['p99_s'])} | {p['hostile_requests']} | {p['5xx_other_than_503']} |")
    ratio = result["p99_ratio_hostile_over_clean"]
    lines += ["", f"Legal p99 with the hostile load / without: {ratio:.2f}x." if ratio else "",
              f"Server RSS: {rss['after_warm_up']:.0f} MB after warm-up, {rss['end']:.0f} MB at the end "
              f"({rss['growth_after_warm_up_pct']:+.1f}%), peak {rss['max']:.0f} MB.",
              f"Gauges after the load (leaks if not 0): {result['gauges_after']}.", "",
              "Hostile requests by kind and status: " + json.dumps(result["phases"]["hostile"]["hostile_by_kind"]), ""]
    return "\n".join(lines)


def _plot(sampler: _RSS, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([t for t, _ in sampler.samples], [mb for _, mb in sampler.samples])
    for name in ("clean", "hostile", "end"):
        if name in sampler.marks:
            ax.axvline(sampler.marks[name], color="grey", linestyle=":")
            ax.text(sampler.marks[name], ax.get_ylim()[1], f" {name}", va="top", fontsize=8)
    ax.set_xlabel("s")
    ax.set_ylabel("server RSS (MB)")
    ax.set_title("sqllava-edge serve: RSS during the soak")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
