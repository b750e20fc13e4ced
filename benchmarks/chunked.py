"""Chunked prefill in the scheduler: how long a running answer stalls while a new image prompt is prefilled, and what
the chunking costs the new request, side by side in one run.

    python -m benchmarks.chunked --preset bench-1b [--chunks 0,128,256,512] [--rounds 3] [--threads 2]
    python -m benchmarks.chunked --bundle BUNDLE ...

One `Assistant` and, per measurement, a `runtimes.scheduler.Scheduler` with that --prefill-chunk (0: the whole prompt
between two decode steps, as before chunking). Request A (an image + a question) decodes --new-tokens tokens; after
its 4th token, request B (another image, never seen) arrives. Measured from the scheduler's events: A's longest gap
between two tokens from B's arrival until B's first token (the freeze a person reading A sees), A's median gap over
the whole answer (steady decode), and B's time to first token. Every chunk setting runs once per round, the order
rotated from round to round, the caches cleared before every run. Writes OUT/chunked.md (also printed),
OUT/chunked.json (every sample) and OUT/chunked.png.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.report import write_text_and_json
from benchmarks.timing import rotated_rounds

WARM_TOKENS = 4  # A's tokens before B is submitted


def picture(seed: int):
    """A random RGB image (a new one per seed: the engine must encode it)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(240, 320, 3), dtype=np.uint8))


def one_run(assistant, chunk: int, seed: int, new_tokens: int) -> dict:
    from runtimes.scheduler import Request, Scheduler
    from sqllava_edge.conversation import answer_prompt
    from sqllava_edge.generation import GenerationConfig

    assistant.engine.reset()
    tok, template = assistant.tokenizer, assistant.template
    a_ids = answer_prompt(tok, "What is in this picture? Describe every object, its colour and where it is.", template)
    b_ids = answer_prompt(tok, "How many objects are there, and which one is the largest?", template)
    a_times: list[float] = []
    b_times: dict[str, float] = {}
    warm = threading.Event()

    def on_a(event):
        if event.kind == "token" and event.token >= 0:
            a_times.append(time.monotonic())
            if len(a_times) == WARM_TOKENS:
                warm.set()

    def on_b(event):
        if event.kind == "start":
            b_times.setdefault("start", time.monotonic())
        elif event.kind == "token" and event.token >= 0:
            b_times.setdefault("first", time.monotonic())

    scheduler = Scheduler(assistant.engine, parallel=2, prefill_chunk=chunk)
    try:
        a = scheduler.submit(Request(a_ids, picture(2 * seed), GenerationConfig(max_new_tokens=new_tokens),
                                     on_event=on_a))
        if not warm.wait(600):
            raise RuntimeError("request A produced no tokens in 600 s")
        submitted = time.monotonic()
        b = scheduler.submit(Request(b_ids, picture(2 * seed + 1), GenerationConfig(max_new_tokens=4), on_event=on_b))
        a.finished.wait(1200)
        b.finished.wait(1200)
    finally:
        scheduler.shutdown()
    first = b_times.get("first")
    if first is None or len(a_times) < WARM_TOKENS + 2:
        raise RuntimeError(f"run incomplete: A gave {len(a_times)} tokens, B {'a' if first else 'no'} first token")
    gaps = np.diff(a_times)
    during = [g for g, end in zip(gaps, a_times[1:]) if submitted < end and end - g < first]
    # A's last token before B's first: if A ended before B's prefill did, the freeze is not seen by A
    return {"chunk": chunk, "a_tokens": len(a_times), "a_stall_s": float(max(during)) if during else 0.0,
            "a_gap_median_s": float(np.median(gaps)), "b_ttft_s": first - submitted,
            "b_prefill_s": b_times["start"] - submitted, "a_done_before_b": a_times[-1] < first}


def measure(args, log) -> dict:
    from benchmarks.machine import machine_facts
    from sqllava_edge.assistant import Assistant

    if args.preset:
        from benchmarks.presets import ensure_preset

        _, bundle = ensure_preset(args.preset, log=log)
    else:
        bundle = Path(args.bundle)
    assistant = Assistant.load(bundle, n_threads=args.threads, sequences=8)
    log(f"[chunked] {bundle}: {assistant.backends}")
    try:
        log("[chunked] warm-up run")
        one_run(assistant, args.chunks[0], 10_000, args.new_tokens)
        samples = rotated_rounds(
            args.chunks, args.rounds, lambda chunk, r: one_run(assistant, chunk, 100 * r + chunk, args.new_tokens),
            lambda r, chunk, sample: log(f"[chunked] round {r + 1}/{args.rounds} chunk {chunk}: A stall "
                                         f"{sample['a_stall_s']:.2f} s, B TTFT {sample['b_ttft_s']:.2f} s"))
        backends = str(assistant.backends)
    finally:
        assistant.close()
    return {"bundle": str(bundle), "preset": args.preset, "threads": args.threads, "rounds": args.rounds,
            "new_tokens": args.new_tokens, "chunks": args.chunks, "backends": backends,
            "machine": machine_facts(args.threads or 0), "samples": samples}


def summary(result: dict) -> list[dict]:
    rows = []
    for chunk in result["chunks"]:
        runs = [s for s in result["samples"] if s["chunk"] == chunk]
        if runs:
            rows.append({"chunk": chunk, "n": len(runs),
                         **{key: statistics.median(s[key] for s in runs)
                            for key in ("a_stall_s", "a_gap_median_s", "b_ttft_s", "b_prefill_s")}})
    return rows


def render(result: dict) -> str:
    rows = summary(result)
    base = next((r for r in rows if r["chunk"] == 0), None)
    lines = ["# Chunked prefill: a running answer's freeze while a new image prompt is prefilled", "",
             f"Bundle: {result['bundle']}; threads {result['threads'] or 'as tuned'}; {result['rounds']} rounds, order rotated; "
             f"A decodes {result['new_tokens']} tokens, B arrives after A's {WARM_TOKENS}th.", "",
             f"Backends: {result['backends']}", "",
             "Medians over the rounds (ratios to prefill_chunk 0, the whole prompt at once, in the same rounds):", "",
             "| prefill_chunk | runs | A's longest gap while B is admitted | A's median gap | B time to first token |",
             "|---|---|---|---|---|"]
    def cell(r, key):
        ratio = f" ({r[key] / base[key]:.2f}x)" if base and base[key] else ""
        return f"{r[key]:.2f} s{ratio}"

    for r in rows:
        lines.append(f"| {r['chunk'] or '0 (off)'} | {r['n']} | {cell(r, 'a_stall_s')} | "
                     f"{r['a_gap_median_s'] * 1000:.0f} ms | {cell(r, 'b_ttft_s')} |")
    ended = sum(1 for s in result["samples"] if s["a_done_before_b"])
    if ended:
        lines += ["", f"In {ended} run(s) A finished before B's first token; their freeze is the part A saw."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary(result)
    labels = [str(r["chunk"] or "off") for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["a_stall_s"] for r in rows], 0.4, label="running answer's longest gap (s)")
    ax.bar(x + 0.2, [r["b_ttft_s"] for r in rows], 0.4, label="new request's time to first token (s)")
    for s in result["samples"]:
        i = result["chunks"].index(s["chunk"])
        ax.plot([i - 0.2], [s["a_stall_s"]], "k.", ms=3)
        ax.plot([i + 0.2], [s["b_ttft_s"]], "k.", ms=3)
    ax.set_xticks(x, labels)
    ax.set_xlabel("prefill_chunk (positions per piece)")
    ax.set_ylabel("seconds")
    ax.set_title("Chunked prefill: freeze vs new request's wait")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chunked", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="random-weight preset (e.g. bench-1b), built once and cached")
    source.add_argument("--bundle", help="deployment bundle folder")
    parser.add_argument("--chunks", default="0,128,256,512",
                        help="prefill_chunk values, comma-separated; 0 (off) is the baseline (default 0,128,256,512)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens request A decodes (default 64)")
    parser.add_argument("--threads", type=int, default=None, help="LLM / vision threads (default: the runtime's)")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results/chunked"))
    args = parser.parse_args(argv)
    try:
        args.chunks = [int(c) for c in args.chunks.split(",")]
    except ValueError:
        parser.error(f"--chunks must be comma-separated integers, got {args.chunks!r}")
    if any(c < 0 for c in args.chunks) or args.rounds < 1 or args.new_tokens < WARM_TOKENS + 2:
        parser.error(f"--chunks must be >= 0, --rounds >= 1 and --new-tokens >= {WARM_TOKENS + 2}")
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    result = measure(args, log)
    text = render(result)
    write_text_and_json(args.out, "chunked", text, result)
    plot(result, args.out / "chunked.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
