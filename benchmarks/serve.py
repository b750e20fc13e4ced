"""Serving throughput and latency, side by side in one run: `sqllava-edge serve` at several --parallel settings,
each loaded by 1, 4, 16 ... concurrent clients.

    python -m benchmarks.serve --bundle BUNDLE [--clients 1,4,16] [--parallel 1,4] [--requests 2] [--new-tokens 32]
    python -m benchmarks.serve --preset bench-1b ...      # the random-weight bench-1b bundle (built once, cached)

For each --parallel value a server runs as its own process (`python -m sqllava_edge.serve`, on 127.0.0.1); for each
client count, that many client threads each send --requests streamed chat completions, every client about its own
image, all at once. Measured per phase: requests/s, end-to-end completion tokens/s, decode tokens/s (the server's
own decode tokens / seconds inside batched decode calls, from /metrics: what batching speeds up), time to first
token and request latency (p50 / p95, client side). Writes OUT/serve.md (also printed), OUT/serve.json (every
sample) and OUT/serve.png.

The server's threads and the clients share the machine: on a 2-core CPU give the server --threads 2 and expect the
clients' own work (JSON, SSE parsing) in the numbers, as it would be for a real local client.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.report import write_text_and_json
from benchmarks.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Sample:
    client: int
    ttft: float  # s from sending to the first content piece
    latency: float  # s from sending to [DONE]
    tokens: int  # completion tokens (usage)
    status: int


@dataclass
class Phase:
    parallel: int
    clients: int
    wall: float
    samples: list[Sample] = field(default_factory=list)
    decode_tokens: float = 0.0
    decode_seconds: float = 0.0

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.status == 200]

    def row(self) -> dict:
        ok = self.ok
        tokens = sum(s.tokens for s in ok)
        return {"parallel": self.parallel, "clients": self.clients, "requests": len(self.samples),
                "failed": len(self.samples) - len(ok), "req_per_s": len(ok) / self.wall,
                "e2e_tok_per_s": tokens / self.wall,
                "decode_tok_per_s": self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0,
                "ttft_p50": _pct([s.ttft for s in ok], 50), "ttft_p95": _pct([s.ttft for s in ok], 95),
                "latency_p50": _pct([s.latency for s in ok], 50), "latency_p95": _pct([s.latency for s in ok], 95)}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--bundle", type=Path, help="deployment bundle folder")
    what.add_argument("--preset", help="random-weight preset bundle (benchmarks.presets), e.g. bench-1b or tiny")
    parser.add_argument("--clients", type=_ints, default=[1, 4, 16], help="concurrent clients per phase (1,4,16)")
    parser.add_argument("--parallel", type=_ints, default=[1, 4], help="server --parallel values (1,4)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client per phase (default 2)")
    parser.add_argument("--new-tokens", type=int, default=32, help="max_tokens per answer (default 32)")
    parser.add_argument("--threads", type=int, help="server CPU threads (default: all cores)")
    parser.add_argument("--llm-precision", help="GGUF precision the server loads (default: automatic)")
    parser.add_argument("--vision-precision", help="vision precision the server loads (default: automatic)")
    parser.add_argument("--port", type=int, default=8797, help="server port on 127.0.0.1 (default 8797)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds a request may wait and run (client and server side; default 1800)")
    parser.add_argument("--out", type=Path, help="output folder (default benchmark-results/serve-<name>)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.requests < 1 or args.new_tokens < 1:
        print("error: --requests and --new-tokens must be >= 1", file=sys.stderr)
        return 2
    if args.preset:
        from benchmarks.presets import ensure_preset

        _, bundle = ensure_preset(args.preset)
    else:
        bundle = args.bundle
        if not (bundle / "manifest.json").is_file():
            print(f"error: {bundle} is not a bundle folder (no manifest.json); export one with python -m export",
                  file=sys.stderr)
            return 2
    out = args.out or ROOT / "benchmark-results" / f"serve-{args.preset or bundle.name}"
    out.mkdir(parents=True, exist_ok=True)
    images = _images(max(args.clients) + 1)  # the last one only warms up: no client finds its image cached
    phases: list[Phase] = []
    for parallel in args.parallel:
        with _Server(bundle, parallel, max(args.clients), args) as server:
            _request(server.url, images[-1], args.new_tokens)  # warm-up: first-call costs out of the numbers
            for clients in args.clients:
                print(f"[serve-bench] --parallel {parallel}: {clients} client(s) x {args.requests} request(s)",
                      file=sys.stderr, flush=True)
                phases.append(_phase(server.url, parallel, clients, images, args))
    report = _report(phases, bundle, args)
    print(report)
    raw = {"bundle": str(bundle), "args": {k: str(v) for k, v in vars(args).items()},
           "phases": [{**p.row(), "samples": [asdict(s) for s in p.samples]} for p in phases]}
    write_text_and_json(out, "serve", report, raw)
    _plot(phases, out / "serve.png")
    print(f"[serve-bench] wrote {out}/serve.md, serve.json, serve.png", file=sys.stderr)
    return 0


def _images(n: int) -> list[str]:
    """One image per client (distinct content: no client rides on another's image cache)."""
    import numpy as np
    from PIL import Image

    from sqllava_edge.serve.protocol import data_uri

    uris = []
    for i in range(n):
        rng = np.random.default_rng(1000 + i)
        uris.append(data_uri(Image.fromarray((rng.random((240, 320, 3)) * 255).astype(np.uint8))))
    return uris


def _Server(bundle: Path, parallel: int, clients: int, args) -> ServerProcess:
    flags = ["--parallel", str(parallel), "--queue", str(max(64, clients * 2)), "--timeout", str(args.timeout)]
    for flag, value in (("--threads", args.threads), ("--llm-precision", args.llm_precision),
                        ("--vision-precision", args.vision_precision)):
        if value is not None:
            flags += [flag, str(value)]
    return ServerProcess(bundle, args.port, flags)


def _request(url: str, image_uri: str, new_tokens: int, client: int = 0, timeout: float = 1800.0) -> Sample:
    import httpx

    body = {"model": "bench", "max_tokens": new_tokens, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Describe this image in detail."},
                                                      {"type": "image_url", "image_url": {"url": image_uri}}]}]}
    start = time.perf_counter()
    ttft, tokens = float("nan"), 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as response:
        if response.status_code != 200:
            response.read()
            return Sample(client, ttft, time.perf_counter() - start, 0, response.status_code)
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft != ttft and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return Sample(client, ttft, time.perf_counter() - start, tokens, 200)


def _metrics(url: str) -> dict[str, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def _phase(url: str, parallel: int, clients: int, images: list[str], args) -> Phase:
    before = _metrics(url)

    def client(k: int) -> list[Sample]:
        return [_request(url, images[k], args.new_tokens, k, args.timeout) for _ in range(args.requests)]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        samples = [s for batch in pool.map(client, range(clients), timeout=args.timeout) for s in batch]
    phase = Phase(parallel, clients, time.perf_counter() - start, samples)
    after = _metrics(url)
    phase.decode_tokens = after["sqllava_decode_tokens_total"] - before["sqllava_decode_tokens_total"]
    phase.decode_seconds = after["sqllava_decode_seconds_total"] - before["sqllava_decode_seconds_total"]
    return phase


def _report(phases: list[Phase], bundle: Path, args) -> str:
    from benchmarks.machine import cpu_facts

    lines = [f"# Serving benchmark: {bundle.name}", "",
             f"{args.requests} streamed request(s) per client, max_tokens {args.new_tokens}, one image per client; "
             f"server threads: {args.threads or 'all cores'}.", "",
             "| --parallel | clients | requests | failed | req/s | e2e tok/s | decode tok/s | TTFT p50 / p95 (s) | "
             "latency p50 / p95 (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for p in phases:
        r = p.row()
        lines.append(f"| {r['parallel']} | {r['clients']} | {r['requests']} | {r['failed']} | {r['req_per_s']:.2f} | "
                     f"{r['e2e_tok_per_s']:.1f} | {r['decode_tok_per_s']:.1f} | {r['ttft_p50']:.2f} / "
                     f"{r['ttft_p95']:.2f} | {r['latency_p50']:.2f} / {r['latency_p95']:.2f} |")
    by = {(p.parallel, p.clients): p.row() for p in phases}
    lines.append("")
    for clients in sorted({p.clients for p in phases}):
        base, best = by.get((1, clients)), by.get((max(q for q, _ in by), clients))
        if base and best and best is not base and base["decode_tok_per_s"]:
            lines.append(f"- {clients} client(s): decode throughput at --parallel {best['parallel']} is "
                         f"{best['decode_tok_per_s'] / base['decode_tok_per_s']:.2f}x --parallel 1; requests/s "
                         f"{best['req_per_s'] / base['req_per_s']:.2f}x")
    cpu = cpu_facts()
    lines += ["", f"Machine: {cpu['model']}, {cpu['usable_cpus']} usable CPUs ({' '.join(cpu['simd'])})."]
    return "\n".join(lines) + "\n"


def _plot(phases: list[Phase], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for parallel in sorted({p.parallel for p in phases}):
        rows = [p.row() for p in phases if p.parallel == parallel]
        clients = [r["clients"] for r in rows]
        axes[0].plot(clients, [r["decode_tok_per_s"] for r in rows], marker="o", label=f"--parallel {parallel}")
        axes[1].plot(clients, [r["ttft_p50"] for r in rows], marker="o", label=f"--parallel {parallel}")
    axes[0].set(xlabel="concurrent clients", ylabel="decode tokens/s (server)", title="Decode throughput")
    axes[1].set(xlabel="concurrent clients", ylabel="seconds", title="Time to first token (p50)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
