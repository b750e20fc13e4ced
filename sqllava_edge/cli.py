"""`sqllava-edge` command line: one argparse parser with a subcommand per task.

    sqllava-edge inspect BUNDLE [--json] [--no-verify]   print a bundle's manifest and verify every artifact's sha256
    sqllava-edge ask MODEL IMAGE "question"              answer one question (streamed to stdout)
    sqllava-edge self-question MODEL IMAGE [--n 3]       describe the image, then sample questions about it
    sqllava-edge chat MODEL IMAGE                        multi-turn chat; questions from stdin, one per line
    sqllava-edge interview MODEL IMAGE [--n 3]           the model's own questions, each with its answer
    sqllava-edge serve MODEL [--port 8080] ...           the OpenAI-compatible HTTP server (sqllava_edge.serve)
    sqllava-edge tune BUNDLE [--prefer latency] [--force] time every backend option here, print the table + choice
MODEL is a bundle folder or a training checkpoint folder.

Each subcommand is a `register_<name>(subparsers)` function that adds its parser and sets `func`; `func(args)`
returns the exit code. More subcommands (ask, self-question, chat) are registered the same way.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def register_inspect(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="print a bundle's manifest and verify its artifacts' hashes",
                                   description="Print a deployment bundle's manifest and check every artifact file "
                                               "against its recorded sha256. Exit code 1 if any file is missing or changed.")
    parser.add_argument("bundle", help="bundle folder (written by python -m export)")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON instead of a summary")
    parser.add_argument("--no-verify", action="store_true", help="skip hashing the artifact files")
    parser.set_defaults(func=run_inspect)


def run_inspect(args) -> int:
    from sqllava_edge.bundle import read_manifest
    from sqllava_edge.errors import BundleError

    manifest = read_manifest(args.bundle, verify=False)
    failures: dict[str, str] = {}
    if not args.no_verify:
        for artifact in manifest.artifacts:
            try:
                artifact.verify(args.bundle)
            except BundleError as exc:
                failures[artifact.path] = str(exc)
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2))
    else:
        print(_summary(manifest, failures, verified=not args.no_verify))
    for message in failures.values():
        print(f"error: {message}", file=sys.stderr)
    return 1 if failures else 0


def _summary(manifest, failures: dict[str, str], verified: bool) -> str:
    model, pre, prov = manifest.model, manifest.preprocessing, manifest.provenance
    lines = [
        f"bundle schema {manifest.schema_version}: model {model.get('name')} (template {manifest.template})",
        f"  image: {pre.get('image_size')} px, {pre.get('mode')}, {pre.get('resample')}; "
        f"{manifest.num_image_tokens} image tokens x {manifest.embed_dim}",
        f"  special tokens: {', '.join(f'{k}={v}' for k, v in manifest.special_tokens.items())}",
        f"  source: {prov.get('source_checkpoint', '?')} (sha256 {str(prov.get('source_sha256', '?'))[:16]}...), "
        f"created {prov.get('created', '?')}",
        f"  artifacts ({len(manifest.artifacts)}):",
    ]
    for artifact in manifest.artifacts:
        status = "not verified" if not verified else ("MODIFIED/MISSING" if artifact.path in failures else "sha256 ok")
        lines.append(f"    {artifact.kind:<16} {artifact.precision or '-':<7} {artifact.size / 2**20:9.2f} MiB  "
                     f"{artifact.path}  [{status}]")
        numbers = _validation_line(artifact.validation)
        if numbers:
            lines.append(f"      validation: {numbers}")
        lines += [f"      {line}" for line in _fidelity_lines(artifact.validation.get("fidelity"))]
        if artifact.target:
            lines.append(f"      target: {', '.join(f'{k}={v}' for k, v in artifact.target.items() if k in ('gpu', 'compute_capability', 'tensorrt', 'jetson'))}")
    sim_beta = prov.get("sim_beta")
    if isinstance(sim_beta, dict):  # a converted merged SQ-LLaVA folder (sqllava_edge.convert --sim-beta)
        lines.append(f"  projector sim_beta: {sim_beta.get('used')} (--sim-beta {sim_beta.get('choice')}; the release "
                     f"file holds {sim_beta.get('file')}, the official code computes with {sim_beta.get('official')})")
    tools = prov.get("tools", {})
    if tools:
        lines.append(f"  tools: {', '.join(f'{k} {v}' for k, v in tools.items())}")
    return "\n".join(lines)


def _validation_line(validation: dict) -> str:
    keys = ("max_abs_diff", "cosine_min", "cosine_mean", "dispatch_mismatches", "top1_agreement", "argmax_agreement", "skipped")
    parts = [f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in validation.items() if k in keys]
    return ", ".join(parts)


def _fidelity_lines(fidelity) -> list[str]:
    """The fidelity vs fp32 PyTorch recorded at export (export/fidelity.py), as inspect shows it."""
    if not isinstance(fidelity, dict) or "kl_mean" not in fidelity:
        return []
    from runtimes.quality import numbers

    lines = [f"fidelity vs fp32: {numbers(fidelity)} over {fidelity['positions']} answer positions of "
             f"{fidelity['pairs']} calibration pairs"]
    for precision, pairing in (fidelity.get("with_vision") or {}).items():
        lines.append(f"  with vision {precision}: KL {pairing['kl_mean']:.4f} nats, top-1 {pairing['top1_agreement']:.1%}")
    end = fidelity.get("end_to_end")
    if end:
        lines.append(f"  end to end with vision {end['vision']}: {end['greedy_agreement']:.1%} of {end['answers']} greedy "
                     "answers identical to fp32 PyTorch")
    return lines


def register_tune(subparsers) -> None:
    parser = subparsers.add_parser("tune", help="time every backend option of a bundle on this machine",
                                   description="Time a short prefill and decode for every GGUF precision x llama.cpp "
                                               "weight repacking x thread count, and an encode for every vision "
                                               "precision, each in a child process; cache the table (what "
                                               "Assistant.load uses on this machine) and print it with the choice.")
    parser.add_argument("bundle", help="bundle folder (written by python -m export)")
    parser.add_argument("--prefer", choices=("latency", "throughput", "memory"), default="latency",
                        help="the objective the choice shown optimises (default: latency)")
    parser.add_argument("--force", action="store_true", help="measure again even if a matching table is cached")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per probe (default 600)")
    parser.set_defaults(func=run_tune)


def run_tune(args) -> int:
    from runtimes.model_source import ModelSource
    from runtimes.tune import choose, format_table, tuned_table
    from sqllava_edge.errors import BundleError

    source = ModelSource.open(args.bundle)
    if not source.is_bundle:
        raise BundleError(f"{args.bundle} is a training checkpoint; tune measures a bundle: python -m export CHECKPOINT --out BUNDLE")
    table, how = tuned_table(source, force=args.force, timeout=args.timeout)
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    pick = choose(table, args.prefer)
    print(format_table(table))
    print(f"({how})")
    print(f"choice for prefer={args.prefer}:\n  vision: {pick.vision_reason}\n  llm: {pick.llm_reason}")
    return 0 if pick.llm is not None and pick.vision is not None else 1


# --- ask / self-question / chat (runtime) ------------------------------------------------------------------------


def _add_model_args(parser, task: str) -> None:
    from sqllava_edge.options import add_backend_arguments

    parser.add_argument("model", help="bundle folder (python -m export) or training checkpoint folder")
    parser.add_argument("image", help="image file (PNG, JPEG, WebP, ...)")
    group = parser.add_argument_group("backends")
    add_backend_arguments(group)
    group.add_argument("--show-backends", action="store_true", help="print the chosen backends and why to stderr")
    sampling = parser.add_argument_group(f"sampling (defaults: the spec's {task} settings)")
    sampling.add_argument("--max-new-tokens", type=int, help="maximum tokens generated")
    sampling.add_argument("--temperature", type=float, help="0 = greedy")
    sampling.add_argument("--top-k", type=int, help="0 = off")
    sampling.add_argument("--top-p", type=float, help="1 = off")
    sampling.add_argument("--seed", type=int, help="random seed for sampling")
    sampling.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--json-schema", metavar="FILE",
                        help="answer as JSON that follows this JSON-schema file (constrained decoding)")


def _open_assistant(args):
    from sqllava_edge.assistant import Assistant

    from sqllava_edge.options import load_options

    assistant = Assistant.load(args.model, **load_options(args))
    if args.show_backends:
        print(assistant.backends, file=sys.stderr)
    return assistant


def _options(args, with_seed: bool = True) -> dict:
    names = ["max_new_tokens", "temperature", "top_k", "top_p", "stop"] + (["seed"] if with_seed else [])
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _schema(args):
    """The --json-schema file's schema (compiled on use), or None."""
    if args.json_schema is None:
        return None
    from sqllava_edge.structured import SchemaError

    try:
        with open(args.json_schema, encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        raise SystemExit(f"sqllava-edge: cannot read --json-schema {args.json_schema}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise SchemaError(f"--json-schema {args.json_schema} is not valid JSON ({exc})") from None


def _print_stream(pieces) -> None:
    for piece in pieces:
        print(piece, end="", flush=True)
    print()


def register_ask(subparsers) -> None:
    parser = subparsers.add_parser("ask", help="answer one question about an image",
                                   description="Answer a question about an image; the answer streams to stdout.")
    _add_model_args(parser, "answer")
    parser.add_argument("question", help="the question")
    parser.set_defaults(func=run_ask)


def run_ask(args) -> int:
    with _open_assistant(args) as assistant:
        _print_stream(assistant.stream(args.image, args.question, schema=_schema(args), **_options(args)))
    return 0


def _self_questioning_parser(subparsers, name: str, summary: str, description: str, run):
    """A subcommand in which the model asks its own questions: the model arguments (sampling defaults of the
    questions) and --n."""
    parser = subparsers.add_parser(name, help=summary, description=description)
    _add_model_args(parser, "self_question")
    parser.add_argument("--n", type=int, default=3, help="number of questions (default 3)")
    parser.set_defaults(func=run)
    return parser


def register_self_question(subparsers) -> None:
    _self_questioning_parser(subparsers, "self-question", "describe an image, then sample questions about it",
                             "Visual self-questioning (docs/spec.md 5.1): a greedy description, then N questions "
                             "sampled in parallel (question i with seed + i).", run_self_question)


def run_self_question(args) -> int:
    if args.json_schema is not None:
        raise ValueError("--json-schema applies to the answers: use it with ask, chat or interview")
    with _open_assistant(args) as assistant:
        result = assistant.self_question(args.image, n=args.n, seed=args.seed, **_options(args, with_seed=False))
    print(f"description: {result.description}")
    for i, question in enumerate(result.questions):
        print(f"VUSER:{i}: {question}")
    print(f"(seed {result.seed})", file=sys.stderr)
    return 0


def register_interview(subparsers) -> None:
    parser = _self_questioning_parser(subparsers, "interview", "the model's own questions about an image, each with "
                                      "its answer", "Self-questioning, then the model answers each of its questions "
                                      "in the same conversation (all answers decoded in one batch).", run_interview)
    parser.add_argument("--max-answer-tokens", type=int, help="longest answer (default 512)")


def run_interview(args) -> int:
    with _open_assistant(args) as assistant:
        exchanges = assistant.interview(args.image, n=args.n, seed=args.seed, max_answer_tokens=args.max_answer_tokens,
                                        schema=_schema(args), **_options(args, with_seed=False))
    for i, exchange in enumerate(exchanges):
        answer = exchange.answer if args.json_schema is None else json.dumps(exchange.answer, ensure_ascii=False)
        print(f"Q{i + 1}: {exchange.question}\nA{i + 1}: {answer}")
    return 0


def register_chat(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="multi-turn chat about an image (questions from stdin)",
                                   description="Chat about one image: each line of stdin is a question, answered "
                                               "with the earlier turns as context. The image is encoded once. "
                                               "End with EOF (Ctrl-D) or a line 'exit'.")
    _add_model_args(parser, "answer")
    parser.set_defaults(func=run_chat)


def run_chat(args) -> int:
    interactive = sys.stdin.isatty()
    with _open_assistant(args) as assistant:
        chat = assistant.chat(args.image)
        while True:
            if interactive:
                print("you> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line or line.strip() in ("exit", "quit"):
                break
            if not line.strip():
                continue
            if interactive:
                print("assistant> ", end="", file=sys.stderr, flush=True)
            _print_stream(chat.stream(line.strip(), schema=_schema(args), **_options(args)))
    return 0


def register_serve(subparsers) -> None:
    from sqllava_edge.serve import register_serve as register

    register(subparsers)


def register_watch(subparsers) -> None:
    from sqllava_edge.cli_watch import register_watch as register

    register(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sqllava-edge", description="SQ-LLaVA on edge devices")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register_inspect(subparsers)
    register_ask(subparsers)
    register_self_question(subparsers)
    register_chat(subparsers)
    register_interview(subparsers)
    register_serve(subparsers)
    register_tune(subparsers)
    register_watch(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from sqllava_edge.errors import SQLLaVAError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SQLLaVAError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:  # an optional dependency this command needs: name the extra, in one line
        from sqllava_edge.deps import explain

        message = explain(exc, f"sqllava-edge {args.command}")
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
