"""A standing question over a video: the watch loop (runtimes.watch) against the naive loop, side by side in one run.

    python -m benchmarks.video                       # the tiny random-weight preset (built once and cached), and
                                                     # bench-1b too when it is already cached (never built here)
    python -m benchmarks.video --bundle BUNDLE [--scenes 6] [--hold 10] [--tokens 16] [--rounds 2]

The clip: --scenes scenes of the synthetic shapes dataset, each held --hold frames, 10 frames/s, 224 px, written as
MPEG-4 with PyAV and decoded by every loop (decoding is part of the work). Loops, on one Assistant, caches cleared
before each run, the order rotated from round to round:
  naive            every frame through Assistant.ask (decode, encode, prefill, answer; one after the other)
  watch, every     Assistant.watch(every_change=False): every frame answered, decoding overlapped with answering
  watch, changes   Assistant.watch(): only frames that changed (the scene cuts) answered, the others skipped
  watch, camera    the same, the file played at its own pace as a camera would deliver it (realtime=True)
Reported per loop (medians over the rounds): wall time for the clip, answered frames, answered frames/s, video
frames covered per second (clip frames / wall time; for the camera loop the clip's own rate bounds it), and the latency
per answered frame, p50 / p95 (frame read -> answer done; the naive loop's is its ask). Writes OUT/video.md (also
printed) and OUT/video.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.report import write_text_and_json
from benchmarks.timing import percentile, rotated_rounds

QUESTION = "What colour is the big shape?"
FPS = 10.0
LOOPS = ("naive", "watch, every", "watch, changes", "watch, camera")


def make_clip(folder: Path, scenes: int, hold: int) -> Path:
    from sqllava_edge.video import write_video
    from training.synthetic import scene_clip

    frames, _ = scene_clip(scenes, hold, size=224, seed=0)
    return write_video(folder / f"clip-{scenes}x{hold}.mp4", frames, fps=FPS)


def run_loop(assistant, loop: str, clip: Path, tokens: int) -> dict:
    from sqllava_edge.video import open_source

    assistant.engine.reset()
    encodes = assistant.counters.vision_encodes
    latencies: list[float] = []
    start = time.perf_counter()
    if loop == "naive":
        frames = 0
        with open_source(clip) as source:
            for frame in source:
                began = time.perf_counter()
                assistant.ask(frame.image, QUESTION, max_new_tokens=tokens)
                latencies.append(time.perf_counter() - began)
                frames += 1
        skipped = dropped = 0
    else:
        answers = list(assistant.watch(clip, QUESTION, every_change=loop != "watch, every",
                                       realtime=loop == "watch, camera", max_new_tokens=tokens))
        latencies = [a.latency for a in answers]
        skipped = sum(a.skipped_since_last for a in answers)
        dropped = sum(a.dropped_since_last for a in answers)
        frames = None
    wall = time.perf_counter() - start
    return {"loop": loop, "wall_s": wall, "answered": len(latencies), "skipped": skipped, "dropped": dropped,
            "latencies_s": latencies, "vision_encodes": assistant.counters.vision_encodes - encodes,
            "frames_read": frames}


def measure(bundle: Path, args, log) -> dict:
    from sqllava_edge.assistant import Assistant

    assistant = Assistant.load(bundle, n_threads=args.threads)
    log(f"[video] {bundle}: {assistant!r}")
    try:
        run_loop(assistant, "watch, changes", args.clip, args.tokens)  # warm-up: first-call costs out of the way
        samples = rotated_rounds(
            LOOPS, args.rounds, lambda loop, r: run_loop(assistant, loop, args.clip, args.tokens),
            lambda r, loop, sample: log(f"[video] round {r + 1}/{args.rounds} {loop}: {sample['answered']} answers "
                                        f"in {sample['wall_s']:.2f} s"))
        backends = str(assistant.backends)
    finally:
        assistant.close()
    return {"bundle": str(bundle), "backends": backends, "samples": samples}


def summary(result: dict, frames: int) -> list[dict]:
    rows = []
    for loop in LOOPS:
        runs = [s for s in result["samples"] if s["loop"] == loop]
        latencies = [x for s in runs for x in s["latencies_s"]]
        wall = statistics.median(s["wall_s"] for s in runs)
        answered = statistics.median(s["answered"] for s in runs)
        rows.append({"loop": loop, "runs": len(runs), "wall_s": wall, "answered": answered,
                     "answers_per_s": answered / wall, "frames_per_s": frames / wall,
                     "p50_ms": 1000 * percentile(latencies, 50), "p95_ms": 1000 * percentile(latencies, 95),
                     "not_answered": frames - answered,
                     "dropped": statistics.median(s["dropped"] for s in runs),
                     "encodes": statistics.median(s["vision_encodes"] for s in runs)})
    return rows


def render(results: list[dict], meta: dict) -> str:
    frames = meta["scenes"] * meta["hold"]
    lines = ["# Live video: a standing question over a clip, the watch loop against the naive loop", "",
             f"Clip: {meta['scenes']} synthetic scenes x {meta['hold']} frames = {frames} frames at {FPS:g} frames/s "
             f"({frames / FPS:g} s), 224 px MPEG-4; question {QUESTION!r}, {meta['tokens']}-token greedy answers; "
             f"{meta['rounds']} round(s), order rotated; medians.",
             f"Measured {meta['date']} at commit {meta['commit']}, load average {meta['load']} before the run "
             f"(a shared machine: other jobs ran beside it); {meta['cpu']}.", ""]
    for result in results:
        rows = summary(result, frames)
        naive = rows[0]
        lines += [f"## {result['bundle']}", "", "```", result["backends"], "```", "",
                  "| loop | answered | not answered (dropped while busy) | vision encodes | wall | answers/s | "
                  "video frames/s (x naive) | latency p50 | p95 |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['loop']} | {r['answered']:g} | {r['not_answered']:g} ({r['dropped']:g}) | {r['encodes']:g} "
                         f"| {r['wall_s']:.2f} s | {r['answers_per_s']:.1f} | {r['frames_per_s']:.1f} "
                         f"({r['frames_per_s'] / naive['frames_per_s']:.1f}x) | {r['p50_ms']:.0f} ms "
                         f"| {r['p95_ms']:.0f} ms |")
        lines.append("")
    lines += ["Frames not answered were unchanged (the last answer stood for them) or, for the camera loop, replaced "
              "while the model was busy. Vision encodes count cache misses: the naive loop's identical decoded frames "
              "hit the engine's image cache too. The watch latencies run from reading the frame, so they include its "
              "wait for the answer before it (a file is read one frame ahead); the camera loop's is what a live camera "
              "sees, and it cannot cover more than the clip's own 10 frames/s.", ""]
    return "\n".join(lines)


def _bundles(args, log) -> list[Path]:
    if args.bundle:
        return [Path(args.bundle)]
    from benchmarks.presets import _cached, cache_root, ensure_preset, preset_key, EXPORTS

    bundles = [ensure_preset("tiny", log=log)[1]]
    spec = EXPORTS["bench-1b"]
    key = preset_key("bench-1b", spec["quants"], spec["vision_precisions"])
    cached = cache_root() / f"bench-1b-{key[:16]}"
    if _cached(cached, key):
        bundles.append(cached / "bundle")
    else:
        log("[video] bench-1b is not cached here; skipped (python -m benchmarks --preset bench-1b builds it)")
    return bundles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.video", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", help="a bundle folder (default: the tiny preset, and bench-1b if cached)")
    parser.add_argument("--scenes", type=int, default=6, help="scenes in the clip (default 6)")
    parser.add_argument("--hold", type=int, default=10, help="frames each scene is held (default 10)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per answer (default 16)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, loop order rotated (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="LLM / vision threads (default: the runtime's)")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results/video"))
    args = parser.parse_args(argv)
    if min(args.scenes, args.hold, args.tokens, args.rounds) < 1:
        parser.error("--scenes, --hold, --tokens and --rounds must be >= 1")
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    from benchmarks.machine import cpu_facts

    args.out.mkdir(parents=True, exist_ok=True)
    args.clip = make_clip(args.out, args.scenes, args.hold)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.strip() or "unknown"
    cpu = cpu_facts()
    meta = {"scenes": args.scenes, "hold": args.hold, "tokens": args.tokens, "rounds": args.rounds,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
            "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            "cpu": f"{cpu['model'] or cpu['arch']}, {cpu['usable_cpus']} usable of {cpu['logical_cpus']} logical CPUs"}
    results = [measure(bundle, args, log) for bundle in _bundles(args, log)]
    text = render(results, meta)
    write_text_and_json(args.out, "video", text, {"meta": meta, "results": results})
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
