"""`sqllava-edge watch MODEL SOURCE "question"`: a standing question over a video file, a stream or a camera, one
line per answer (or one JSON object per line with --jsonl). Registered by sqllava_edge.cli."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict


def register_watch(subparsers) -> None:
    from runtimes.watch import DEFAULT_THRESHOLD, WATCH_TOKENS
    from sqllava_edge.options import add_backend_arguments

    parser = subparsers.add_parser(
        "watch", help="answer a standing question over a video file, a stream or a camera",
        description="Answer a question about a video again whenever the picture changes: frames are sampled at "
                    "--fps, unchanged ones are skipped (the last answer stands), and a frame arriving while the "
                    "model is busy replaces the one waiting, so a live source never builds a backlog. One line per "
                    "answer: source time, frame index, latency, skipped / dropped frames, the answer.")
    parser.add_argument("model", help="bundle folder (python -m export) or training checkpoint folder")
    parser.add_argument("source", help="video file, folder of images, stream URL (rtsp://, http://, ...), /dev/videoN "
                                       "or camera:N, or gst:PIPELINE (OpenCV with GStreamer, e.g. on Jetson)")
    parser.add_argument("question", help="the standing question")
    video = parser.add_argument_group("video")
    video.add_argument("--fps", type=float, help="frames sampled per second of video (default: every frame the "
                                                 "device takes)")
    video.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                       help=f"change needed for a new answer: mean grey-level difference of 32x32 thumbnails "
                            f"(default {DEFAULT_THRESHOLD})")
    video.add_argument("--every-frame", action="store_true", help="answer every sampled frame, changed or not")
    video.add_argument("--realtime", action="store_true",
                       help="play a file at its own pace, as a camera would deliver it: frames the model cannot "
                            "take in time are dropped (live sources always are)")
    video.add_argument("--max-answers", type=int, help="stop after this many answers (default: the end of the source)")
    video.add_argument("--jsonl", action="store_true", help="one JSON object per answer")
    video.add_argument("--self-questions", type=int, default=0, metavar="N",
                       help="also print N of the model's own questions about each answered frame (a new scene): "
                            "SQ-LLaVA's visual self-questioning (default 0)")
    group = parser.add_argument_group("backends")
    add_backend_arguments(group)
    group.add_argument("--show-backends", action="store_true", help="print the chosen backends and why to stderr")
    parser.add_argument("--max-new-tokens", type=int, default=WATCH_TOKENS,
                        help=f"longest answer in tokens (default {WATCH_TOKENS}); answers are greedy")
    parser.set_defaults(func=run_watch)


def run_watch(args) -> int:
    from sqllava_edge.assistant import Assistant
    from sqllava_edge.options import load_options
    from sqllava_edge.video import open_source

    if args.max_answers is not None and args.max_answers < 1:
        raise ValueError("--max-answers must be >= 1")
    with open_source(args.source) as source, Assistant.load(args.model, **load_options(args)) as assistant:
        if args.show_backends:  # the source opens first: a wrong path fails before the model loads
            print(assistant.backends, file=sys.stderr)
        answers = assistant.watch(source, args.question, fps=args.fps, every_change=not args.every_frame,
                                  threshold=args.threshold, realtime=args.realtime or None,
                                  self_questions=args.self_questions, max_new_tokens=args.max_new_tokens)
        try:
            for count, answer in enumerate(answers, 1):
                print(json.dumps(asdict(answer)) if args.jsonl else format_answer(answer), flush=True)
                if count == args.max_answers:
                    break
        except KeyboardInterrupt:
            pass  # Ctrl-C ends a camera watch; the answers so far stand
        finally:
            answers.close()
    return 0


def format_answer(answer) -> str:
    extra = f", {answer.dropped_since_last} dropped" if answer.dropped_since_last else ""
    line = (f"{answer.timestamp:8.2f} s  frame {answer.frame_index:<5} {answer.latency * 1000:6.0f} ms  "
            f"({answer.skipped_since_last} unchanged{extra})  {answer.answer}")
    return "\n".join([line] + [f"    VUSER: {question}" for question in answer.questions])
