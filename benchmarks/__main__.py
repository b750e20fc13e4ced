"""Benchmark sqllava-edge backends side by side, with the baselines and the physical limit in the same run.

    python -m benchmarks --bundle BUNDLE [--checkpoint CKPT] [--backends auto|all|LIST] [--runs N]
                         [--prompt-tokens P] [--new-tokens G] [--out DIR]
    python -m benchmarks --preset bench-1b|tiny [...]      # random-weight artifacts, built once and cached

Unless --no-tune, the bundle's tuning table (runtimes.tune) is obtained first and the automatic measured choice
(`Assistant.load` with nothing given) is measured as one more row, so the report shows whether it is the fastest.

Writes DIR/report.md (also printed), DIR/results.json (every raw sample, machine facts) and DIR/chart.png. Each job's
contention is measured (benchmarks.contention); a job still shared after --retries marks the targets it feeds "not
measured: machine shared". A --preset run is also kept, with its machine fingerprint and whether it counted, in
benchmarks/results/ (--keep DIR elsewhere, --no-keep not at all); python -m benchmarks.ranges reads those files.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from benchmarks.workload import Workload
from sqllava_edge.errors import SQLLaVAError
from sqllava_edge.fileutil import atomic_write


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--from-json", type=Path, help="re-render the report from a results.json / .raw.json of a run")
    what.add_argument("--bundle", type=Path, help="deployment bundle folder (python -m export)")
    what.add_argument("--preset", help="measure a random-weight model of this preset (e.g. bench-1b, tiny); its "
                                       "checkpoint and bundle are built once under $SQLLAVA_EDGE_CACHE/bench")
    parser.add_argument("--checkpoint", type=Path, help="training checkpoint the bundle was exported from: enables "
                        "the PyTorch eager baseline and the torch backends (default: the bundle's source_checkpoint, "
                        "if that folder exists)")
    parser.add_argument("--backends", default="auto", help="auto (what the runtime selects here), all (every "
                        "vision x LLM option), or VISION+LLM pairs, e.g. onnxruntime:int8+llama.cpp:q4_k_m,torch+torch")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per measurement (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded warm-up runs before them (default 1)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="P: text tokens after the image (default 32)")
    parser.add_argument("--new-tokens", type=int, default=32, help="G: tokens generated per answer, EOS ignored (default 32)")
    parser.add_argument("--questions", type=int, default=3, help="n of self_question (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image, prompt ids and sampling (default 0)")
    parser.add_argument("--threads", type=int, help="threads for every engine (default: all usable CPUs)")
    parser.add_argument("--device", choices=("cpu", "cuda", "jetson"), help="force a device kind (default: detect)")
    parser.add_argument("--quant", nargs="+", help="with --preset: GGUF types to build (default q4_k_m)")
    parser.add_argument("--vision-precision", nargs="+", help="with --preset: vision ONNX variants (default fp32 int8)")
    parser.add_argument("--no-baselines", action="store_true", help="skip the eager and llama-cpp-python baselines")
    parser.add_argument("--no-tune", action="store_true", help="skip the tuning table (runtimes.tune) and the row of "
                        "the automatic measured choice (also off with SQLLAVA_EDGE_TUNE=0)")
    parser.add_argument("--retune", action="store_true", help="measure the tuning table again even if a matching one "
                        "is cached")
    parser.add_argument("--in-process", action="store_true", help="run jobs in this process (faster start, but memory "
                        "figures then accumulate across jobs)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="on a shared machine: before each job wait up to SECONDS for the 1-minute load average "
                             "to fall below 0.75 per CPU (the wait and the load are recorded)")
    parser.add_argument("--retries", type=int, default=2, help="measure a job again, at most this many times, when "
                        "other processes or the hypervisor took its CPUs (benchmarks.contention); still shared after "
                        "that, its targets are reported as not measured (default 2; 0 = never)")
    parser.add_argument("--bandwidth-mib", type=int, help="array size of the bandwidth test (default: 4x the L3 / 3)")
    parser.add_argument("--out", type=Path, help="output folder (default: benchmark-results/<preset or bundle name>)")
    keep = parser.add_mutually_exclusive_group()
    keep.add_argument("--keep", type=Path, metavar="DIR", help="keep the run's machine fingerprint, ratios and whether "
                      "it counted as DIR/<date>-<preset>-<machine id>.json (default with --preset: benchmarks/results, "
                      "read by python -m benchmarks.ranges)")
    keep.add_argument("--no-keep", action="store_true", help="do not keep the run in benchmarks/results")
    return parser


def _checkpoint_for(bundle: Path, given: Path | None) -> Path | None:
    from sqllava_edge.bundle import read_manifest
    from sqllava_edge.checkpoint import is_checkpoint

    if given is not None:
        if not is_checkpoint(given):
            raise ValueError(f"--checkpoint {given} is not a sqllava-edge checkpoint folder (no sqllava_edge.json)")
        return given
    source = read_manifest(bundle, verify=False).provenance.get("source_checkpoint")
    return Path(source) if source and is_checkpoint(source) else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args, argv if argv is not None else sys.argv[1:])
    except (ValueError, FileNotFoundError, SQLLaVAError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _main(args, argv: list[str]) -> int:
    from benchmarks.presets import ensure_preset
    from benchmarks.ranges import RESULTS_DIR, git_commit, keep_run, kept_record
    from benchmarks.run import RunOptions, run_benchmark
    from runtimes.tune import tuning_enabled

    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731  stdout carries the report
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
        results.pop("analysis", None)
        name = args.from_json.name
        default = args.from_json.parent if name == "results.json" else args.from_json.with_name(name.removesuffix(".raw.json"))
        _write(args.out or default, results, log)
        return 0
    workload = Workload(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, runs=args.runs,
                        warmup=args.warmup, seed=args.seed, questions=args.questions)
    if args.retries < 0:
        raise ValueError(f"--retries must be >= 0, got {args.retries}")
    if args.preset:
        checkpoint, bundle = ensure_preset(args.preset, args.quant, args.vision_precision, log=log)
        checkpoint = args.checkpoint or checkpoint
    else:
        bundle, checkpoint = args.bundle, _checkpoint_for(args.bundle, args.checkpoint)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    options = RunOptions(bundle=bundle, checkpoint=checkpoint, backends=args.backends, workload=workload,
                         threads=args.threads, device=args.device, isolate=not args.in_process,
                         bandwidth_bytes=args.bandwidth_mib * 2**20 if args.bandwidth_mib else None,
                         baselines=not args.no_baselines, preset=args.preset, wait_idle=args.wait_idle, retries=args.retries,
                         tune=tuning_enabled(False if args.no_tune else None), retune=args.retune,
                         command="python -m benchmarks " + shlex.join(argv))
    if checkpoint is None and options.baselines:
        log("[bench] no checkpoint found: the PyTorch eager baseline is skipped (pass --checkpoint)")
    out = args.out or Path("benchmark-results") / (args.preset or bundle.name)
    commit = git_commit()  # of the code that runs, not of whatever is checked out when it ends
    results = run_benchmark(options, log=log)
    raw = out.with_name(out.name + ".raw.json")  # kept only if the report cannot be written: re-render with --from-json
    with atomic_write(raw, "w") as handle:
        json.dump(results, handle, default=float)
    paths = _write(out, results, log)
    raw.unlink()
    keep = None if args.no_keep else (args.keep or (RESULTS_DIR if args.preset else None))
    if keep is not None:
        from benchmarks.analysis import analyze

        analysis = analyze(results)
        kept = keep_run(kept_record(results, analysis, commit), keep)
        log(f"[bench] kept {kept} ({'counts' if analysis['contention']['counted'] else 'does not count'} in "
            "python -m benchmarks.ranges)")
    return 0


def _write(out: Path, results: dict, log) -> dict[str, Path]:
    from benchmarks.analysis import analyze
    from benchmarks.report import render_markdown, write_outputs

    analysis = analyze(results)
    paths = write_outputs(out, results, analysis)
    print(render_markdown(results, analysis))
    log(f"[bench] wrote {paths['report']}, {paths['json']}, {paths['chart']}")
    return paths


if __name__ == "__main__":
    raise SystemExit(main())
