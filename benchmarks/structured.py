"""Structured answers: what the JSON-schema mask costs, side by side in one run, and the grammar engines compared.

    python -m benchmarks.structured --preset tiny            # or bench-1b (built once, several minutes)
    python -m benchmarks.structured --bundle BUNDLE [--rounds 3] [--new-tokens 64] [--threads 2]

1. Grammar engines on the bundle's tokenizer (the 32000-token Llama-2 vocabulary): schema compile time and mask time
   per token while walking a valid answer, for llguidance (the one sqllava-edge uses) and outlines-core when
   installed (xgrammar needs torch, transformers and triton, so it cannot run in the torch-free runtime install).
2. Decode tokens/s on the bundle: the same image + question answered greedily, unconstrained and held to a nested
   schema, alternating, --rounds times each (caches cleared before every run), median of each; the ratio is the cost
   of the mask. Writes OUT/structured.md (also printed) and OUT/structured.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.report import write_text_and_json
from benchmarks.timing import rotated_rounds

# Nested: objects with enums, bounded integers and numbers, short strings, a boolean.
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["objects", "door_open"], "properties": {
    "objects": {"type": "array", "minItems": 1, "maxItems": 4, "items": {
        "type": "object", "additionalProperties": False, "required": ["label", "colour", "count"], "properties": {
            "label": {"type": "string", "maxLength": 16},
            "colour": {"enum": ["red", "green", "blue", "yellow", "black", "white"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 20},
            "box": {"type": "array", "minItems": 4, "maxItems": 4,
                    "items": {"type": "integer", "minimum": 0, "maximum": 999}}}}},
    "door_open": {"type": "boolean"},
    "caption": {"type": "string", "maxLength": 40}}}
SAMPLE = ('{"objects":[{"label":"red ball","colour":"red","count":2,"box":[10,20,110,140]},'
          '{"label":"box","colour":"blue","count":1}],"door_open":false,"caption":"two things on a table"}')


def engines(tokenizer, repeats: int) -> list[dict]:
    """Compile time (fresh, no cache) and mask time per token along SAMPLE's tokens, per installed engine."""
    ids = tokenizer.encode(SAMPLE)
    rows = [_llguidance(tokenizer, ids, repeats)]
    try:
        rows.append(_outlines(tokenizer, ids, repeats))
    except ImportError:
        rows.append({"engine": "outlines-core", "note": "not installed (pip install outlines-core)"})
    rows.append({"engine": "xgrammar", "note": "not measured: its package requires torch, transformers and triton, "
                                              "which the torch-free runtime install does not have"})
    return rows


def _llguidance(tokenizer, ids: list[int], repeats: int) -> dict:
    import llguidance

    from sqllava_edge.structured import Compiler, Grammar

    started = time.perf_counter()
    compiler = Compiler(tokenizer)
    setup = time.perf_counter() - started
    compile_s, mask_s = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        matcher = compiler._matcher(SCHEMA)  # a fresh compile, past the cache
        compile_s.append(time.perf_counter() - started)
        constraint = Grammar(SCHEMA, "", matcher, tokenizer.vocab_size).constraint()
        for token in ids:
            started = time.perf_counter()
            allowed = constraint.allowed()
            mask_s.append(time.perf_counter() - started)
            assert allowed[token]
            constraint.advance(token)
        assert constraint.allowed()[tokenizer.eos_id]
    return {"engine": f"llguidance {llguidance.__version__ if hasattr(llguidance, '__version__') else ''}".strip(),
            "tokenizer_setup_s": setup, "compile_ms": 1e3 * statistics.median(compile_s),
            "mask_ms_per_token": 1e3 * statistics.median(mask_s), "bounds_enforced": True}


def _outlines(tokenizer, ids: list[int], repeats: int) -> dict:
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    from sqllava_edge.structured import token_bytes

    started = time.perf_counter()
    pieces: dict[bytes, list[int]] = {}
    control = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id}
    for token in range(tokenizer.vocab_size):
        if token not in control:
            pieces.setdefault(token_bytes(tokenizer, token), []).append(token)
    vocabulary = outlines_core.Vocabulary(tokenizer.eos_id, pieces)
    setup = time.perf_counter() - started
    compile_s, mask_s = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        index = outlines_core.Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary)
        compile_s.append(time.perf_counter() - started)
        guide = outlines_core.Guide(index)
        for token in ids:
            started = time.perf_counter()
            mask = np.zeros(tokenizer.vocab_size, bool)
            mask[np.asarray(guide.get_tokens())] = True
            mask_s.append(time.perf_counter() - started)
            if not mask[token]:  # its regex's whitespace rules differ from our compact JSON: stop the walk here
                break
            guide.advance(token)
    return {"engine": "outlines-core", "tokenizer_setup_s": setup, "compile_ms": 1e3 * statistics.median(compile_s),
            "mask_ms_per_token": 1e3 * statistics.median(mask_s),
            "bounds_enforced": "integers only (number minimum/maximum are not in its regex)"}


def decode_run(assistant, constrained: bool, new_tokens: int, picture) -> dict:
    from sqllava_edge.conversation import answer_prompt
    from runtimes.scheduler import Request
    from runtimes.tasks import tokens as generated
    from sqllava_edge.generation import GenerationConfig
    from sqllava_edge.structured import compile_schema

    engine = assistant.engine
    engine.reset()
    config = GenerationConfig(max_new_tokens=new_tokens)
    if constrained:
        config = config.replace(grammar=compile_schema(assistant.tokenizer, SCHEMA))
    ids = answer_prompt(assistant.tokenizer, "List the objects in the image as JSON.", assistant.template)
    times, tokens = [], []
    for token in generated(assistant.scheduler, Request(ids, picture, config)):
        times.append(time.perf_counter())
        tokens.append(token)
    if len(times) < 3:
        raise RuntimeError(f"only {len(times)} tokens: cannot time decode")
    sample = {"constrained": constrained, "tokens": len(times), "tok_s": (len(times) - 1) / (times[-1] - times[0])}
    if constrained:  # the mask's own cost along this answer: a fresh parser state, each step timed, no overlap
        constraint, spent = config.grammar.constraint(), []
        for token in tokens:
            started = time.perf_counter()
            constraint.allowed()
            constraint.advance(token)
            constraint.wait()  # the next mask, which decoding overlaps with the model's step
            spent.append(time.perf_counter() - started)
        sample["mask_ms_mean"] = 1e3 * statistics.mean(spent)
        sample["mask_ms_max"] = 1e3 * max(spent)
    return sample


def measure(args, log) -> dict:
    from PIL import Image

    from benchmarks.machine import machine_facts
    from sqllava_edge.assistant import Assistant

    if args.preset:
        from benchmarks.presets import ensure_preset

        _, bundle = ensure_preset(args.preset, log=log)
    else:
        bundle = Path(args.bundle)
    assistant = Assistant.load(bundle, n_threads=args.threads)
    log(f"[structured] {bundle}: {assistant.backends}")
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, size=(240, 320, 3), dtype=np.uint8))
    try:
        log("[structured] grammar engines on the tokenizer")
        table = engines(assistant.tokenizer, args.repeats)
        decode_run(assistant, True, 8, picture)  # warm-up (and the first compile)
        samples = rotated_rounds(
            (False, True), args.rounds, lambda constrained, r: decode_run(assistant, constrained, args.new_tokens, picture),
            lambda r, constrained, sample: log(f"[structured] round {r + 1}/{args.rounds} "
                                               f"{'schema' if constrained else 'free  '}: {sample['tok_s']:.1f} tok/s "
                                               f"over {sample['tokens']} tokens"))
        backends = str(assistant.backends)
    finally:
        assistant.close()
    return {"bundle": str(bundle), "preset": args.preset, "threads": args.threads, "rounds": args.rounds,
            "new_tokens": args.new_tokens, "backends": backends, "engines": table, "samples": samples,
            "machine": machine_facts(args.threads or 0), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def render(result: dict) -> str:
    free = statistics.median(s["tok_s"] for s in result["samples"] if not s["constrained"])
    held = statistics.median(s["tok_s"] for s in result["samples"] if s["constrained"])
    mask = statistics.mean(s["mask_ms_mean"] for s in result["samples"] if s["constrained"])
    worst = max(s["mask_ms_max"] for s in result["samples"] if s["constrained"])
    lines = ["# Structured answers: the JSON-schema mask's cost", "",
             f"{result['date']}; bundle {result['bundle']}; threads {result['threads'] or 'as tuned'}; "
             f"{result['rounds']} rounds, order alternated; greedy, at most {result['new_tokens']} new tokens.", "",
             f"Backends: {result['backends']}", "",
             "| decode | tokens/s (median) | ratio |", "|---|---|---|",
             f"| unconstrained | {free:.1f} | 1.00x |", f"| nested schema | {held:.1f} | {held / free:.2f}x |", "",
             f"The mask's own work along the model's constrained answers: {mask:.3f} ms per token on average (worst "
             f"token {worst:.1f} ms), against {1e3 / free:.1f} ms per unconstrained decode step; decoding computes "
             "each next mask on a worker thread while the model runs its step.", "",
             "Grammar engines on the 32000-token Llama-2 vocabulary (nested schema; median of fresh compiles; mask "
             "time per token along a valid answer, bitmask to a numpy bool array included):", "",
             "| engine | tokenizer setup | compile | mask per token | number bounds |", "|---|---|---|---|---|"]
    for row in result["engines"]:
        if "note" in row:
            lines.append(f"| {row['engine']} | {row['note']} | | | |")
        else:
            lines.append(f"| {row['engine']} | {row['tokenizer_setup_s']:.2f} s | {row['compile_ms']:.1f} ms | "
                         f"{row['mask_ms_per_token']:.3f} ms | {row['bounds_enforced']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.structured", description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--preset", help="random-weight preset bundle (tiny, bench-1b), built once and cached")
    where.add_argument("--bundle", help="a bundle folder")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each kind (default 3)")
    parser.add_argument("--new-tokens", type=int, default=64, help="longest answer (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="compiles per grammar engine (default 5)")
    parser.add_argument("--threads", type=int, help="LLM threads (default: as tuned)")
    parser.add_argument("--out", default="benchmarks/out-structured", help="output folder")
    args = parser.parse_args(argv)
    result = measure(args, lambda message: print(message, file=sys.stderr, flush=True))
    text = render(result)
    write_text_and_json(args.out, "structured", text, result)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
