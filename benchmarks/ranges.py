"""Every benchmark run kept with the machine it ran on, and the range of each ratio over the machines measured.

    python -m benchmarks.ranges                        # min / median / max of each ratio over the kept runs that count
    python -m benchmarks.ranges --preset bench-1b --markdown     # the same as a Markdown table (docs/results.md)
    python -m benchmarks.ranges --limits               # each figure against the machine type's physical limits

`python -m benchmarks --preset NAME` writes one small JSON per run to benchmarks/results/
(<date>-<preset>-<machine id>.json): the machine fingerprint (CPU vendor, family / model / stepping, flags hash,
cores, the memory bandwidth measured in the run, software versions), whether the run counted (every job the targets
are computed from was measured on a quiet machine, benchmarks.contention) and the run's ratios and figures. Raw
samples stay in the run's own results.json. A fact not recorded is null, never filled in; a run that did not count is
listed with why, and left out of the ranges.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_label
from sqllava_edge.fileutil import atomic_write

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCHEMA = 1
# (key, what, direction): "higher" = a larger ratio is better for us, "lower" = a smaller one is
RATIOS = (
    ("vision_int8_vs_eager", "vision encode, onnxruntime int8 vs PyTorch eager fp32 (speed-up)", "higher"),
    ("vision_onnx_fp32_vs_eager", "vision encode, onnxruntime fp32 vs PyTorch eager fp32 (speed-up)", "higher"),
    ("ttft_ratio", "time to first token / PyTorch eager fp32's", "lower"),
    ("e2e_speedup", "end-to-end (+ 32 new tokens) vs PyTorch eager fp32 (speed-up)", "higher"),
    ("prefill_speedup", "prefill tok/s, llama.cpp (automatic choice) vs PyTorch eager fp32", "higher"),
    ("llamacpp_vs_high_level", "our llama.cpp decode vs llama-cpp-python's high-level API", "higher"),
    ("roofline_share", "decode tok/s as a share of the bandwidth roofline", "higher"),
    ("followup_ttft_ratio", "cached follow-up TTFT / first question's", "lower"),
    ("self_question_speedup", "self_question(n) sequential / shared prefix", "higher"),
)
TARGET_RATIOS = ("ttft_ratio", "e2e_speedup", "llamacpp_vs_high_level", "roofline_share", "followup_ttft_ratio",
                 "self_question_speedup")


def git_commit(root: Path = RESULTS_DIR.parent.parent) -> str | None:
    """The checkout's short commit, "-dirty" when tracked files differ from it; None outside a git checkout."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return None
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine_fingerprint(results: dict, bandwidth_gbps: float | None) -> dict[str, Any]:
    """The machine of a run's results.json: identity (what the kept files and ranges group by), size, software."""
    from runtimes.device_facts import fingerprint_id, flags_sha256

    m = results["machine"]
    cpu = m["cpu"]
    flags_hash = cpu.get("flags_sha256") or (flags_sha256(cpu["flags"]) if cpu.get("flags") else None)
    identity = {"vendor": cpu.get("vendor"), "family": cpu.get("family"), "model": cpu.get("model_number"),
                "stepping": cpu.get("stepping"), "model_name": cpu.get("model"), "flags_sha256": flags_hash}
    bandwidth = results.get("bandwidth", {})
    return {"id": fingerprint_id(identity, cpu.get("logical_cpus")), **identity,
            "simd": cpu.get("simd"), "logical_cpus": cpu.get("logical_cpus"), "usable_cpus": cpu.get("usable_cpus"),
            "threads_used": m.get("threads_used"), "mhz_reported": cpu.get("mhz_reported"),
            "hypervisor": cpu.get("hypervisor"), "l2_cache": cpu.get("l2_cache"), "l3_cache": cpu.get("l3_cache"),
            "memory_total_bytes": (m.get("memory") or {}).get("total_bytes"),
            "bandwidth_gbps": bandwidth_gbps,
            "bandwidth_kernel": (bandwidth.get("start") or {}).get("roofline_kernel"),
            "os": m.get("os"), "software": m.get("libraries")}


def _median(summary: dict | None) -> float | None:
    return None if summary is None else summary["median"]


def run_figures(analysis: dict) -> dict[str, Any]:
    """The run's ratios and the absolute figures they come from (medians), from benchmarks.analysis."""
    targets = {t["id"]: t for t in analysis["targets"]}
    vision = {r["label"]: r for r in analysis["vision"]}
    eager = (analysis.get("eager") or {}).get("figures")
    combos = analysis["combos"]
    user = next((c for c in combos if c.get("tuned")), None) or (
        min(combos, key=lambda c: c["figures"]["e2e_ms"]["median"]) if combos else None)
    uf = user["figures"] if user else None
    ratios: dict[str, float | None] = {key: None for key, _, _ in RATIOS}
    for key in TARGET_RATIOS:
        ratios[key] = targets.get(key, {}).get("measured")
    ratios["vision_int8_vs_eager"] = (vision.get("onnxruntime:int8") or {}).get("speedup_vs_eager")
    ratios["vision_onnx_fp32_vs_eager"] = (vision.get("onnxruntime:fp32") or {}).get("speedup_vs_eager")
    if eager and uf and _median(eager.get("prefill_tok_s")) and _median(uf.get("prefill_tok_s")):
        ratios["prefill_speedup"] = _median(uf["prefill_tok_s"]) / _median(eager["prefill_tok_s"])
    figures = {"row": user["label"] if user else None,
               "vision_ms": {"eager_fp32": _median(eager["encode_ms"]) if eager else None,
                             **{label: _median(r["encode_ms"]) for label, r in vision.items()}},
               "ttft_ms": {"row": _median(uf["ttft_ms"]) if uf else None,
                           "eager_fp32": _median(eager["ttft_ms"]) if eager else None},
               "e2e_ms": {"row": _median(uf["e2e_ms"]) if uf else None,
                          "eager_fp32": _median(eager["e2e_ms"]) if eager else None},
               "prefill_tok_s": {"row": _median(uf["prefill_tok_s"]) if uf else None,
                                 "eager_fp32": _median(eager["prefill_tok_s"]) if eager else None},
               "prefill_positions": uf.get("prefill_positions") if uf else None,
               "decode_tok_s": {"row": _median(uf["decode_tok_s"]) if uf else None},
               "decode_bytes_per_token": (uf.get("roofline") or {}).get("bytes_per_token") if uf else None}
    return {"ratios": ratios, "figures": figures}


def kept_record(results: dict, analysis: dict, commit: str | None = None) -> dict[str, Any]:
    """The small JSON kept per run (see the module docstring)."""
    contention = analysis.get("contention") or {}
    counted = contention.get("counted")
    why = ([t["evidence"] for t in analysis["targets"] if t.get("evidence")][:1] if counted is False else
           ["contention was not checked in this run"] if counted is None else [])
    jobs = {j["label"]: {k: j["contention"].get(k) for k in ("contended", "own_cpu_share", "others_share",
                                                              "steal_share", "wall_s", "reasons")}
            for j in results["jobs"] if j.get("contention")}
    return {"schema": SCHEMA, "date": results["machine"]["time_utc"][:10], "time_utc": results["machine"]["time_utc"],
            "commit": commit, "preset": results.get("preset"), "command": results.get("command"),
            "workload": results.get("workload"), "counted": counted, "not_counted_because": why,
            "machine": machine_fingerprint(results, analysis.get("bandwidth_gbps")),
            **run_figures(analysis),
            "targets": [{"id": t["id"], "measured": t["measured"], "status": t.get("status")} for t in analysis["targets"]],
            "contention": jobs, "source": "measured by python -m benchmarks (raw samples in the run's results.json)"}


def import_run(results_json: Path, commit: str | None, declared_quiet: str | None) -> dict[str, Any]:
    """A kept record from a run's results.json. A run recorded before the per-job contention check has no verdict;
    `declared_quiet` (who says the machine was quiet, and how they know) makes it count, and is kept beside it."""
    from benchmarks.analysis import analyze

    results = json.loads(Path(results_json).read_text())
    results.pop("analysis", None)
    record = kept_record(results, analyze(results), commit)
    record["source"] = f"{Path(results_json).name}: imported by python -m benchmarks.ranges --import-run"
    if record["counted"] is None and declared_quiet:
        record.update(counted=True, not_counted_because=[], counted_because=declared_quiet)
    return record


def keep_run(record: dict, folder: Path = RESULTS_DIR) -> Path:
    """Write the record as folder/<date>-<preset>-<machine id>.json (-2, -3... when that name is taken)."""
    stem = f"{record['date'] or 'undated'}-{record['preset'] or 'bundle'}-{record['machine']['id'] or 'unknown'}"
    path = folder / f"{stem}.json"
    n = 2
    while path.exists():
        path, n = folder / f"{stem}-{n}.json", n + 1
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as handle:
        json.dump(record, handle, indent=1)
        handle.write("\n")
    return path


def load_runs(folder: Path = RESULTS_DIR) -> list[dict]:
    """Every kept run in folder (sorted by file name), each with "file"; a file that is not a kept run is an error."""
    runs = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); fix or remove it") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("ratios"), dict) \
                or not isinstance(data.get("machine"), dict):
            raise ValueError(f"{path} is not a schema-{SCHEMA} kept run (needs 'schema', 'machine' and 'ratios')")
        runs.append({**data, "file": path.name})
    return runs


def ranges(runs: list[dict], preset: str | None = None) -> dict[str, dict[str, Any]]:
    """Per ratio over the runs that count (of one preset if given): {n, min, median, max, min_run, max_run}."""
    use = [r for r in runs if r.get("counted") and (preset is None or r.get("preset") == preset)]
    out = {}
    for key, what, direction in RATIOS:
        have = [(r["ratios"][key], r) for r in use if r["ratios"].get(key) is not None]
        if not have:
            continue
        low, high = min(have, key=lambda x: x[0]), max(have, key=lambda x: x[0])
        out[key] = {"what": what, "direction": direction, "n": len(have),
                    "min": low[0], "median": statistics.median(v for v, _ in have), "max": high[0],
                    "min_run": low[1], "max_run": high[1]}
    return out


def _x(value: float, key: str = "") -> str:
    return f"{value:.0%}" if key == "roofline_share" else f"{value:.2f}x"


def render_text(runs: list[dict], preset: str | None, folder: Path = RESULTS_DIR) -> str:
    found = ranges(runs, preset)
    lines = [f"Kept runs{' of ' + preset if preset else ''}: "
             f"{sum(1 for r in runs if preset is None or r.get('preset') == preset)} in {folder}"]
    for r in runs:
        if preset is not None and r.get("preset") != preset:
            continue
        state = "counts" if r.get("counted") else ("does NOT count: " + "; ".join(r.get("not_counted_because") or [])
                                                    if r.get("counted") is False else "not checked, left out")
        lines.append(f"  {r['file']}: {machine_label(r)}: {state}")
    lines.append("")
    for key, rng in found.items():
        lines.append(f"{rng['what']} ({rng['n']} run(s)): min {_x(rng['min'], key)} on {machine_label(rng['min_run'])}; "
                     f"median {_x(rng['median'], key)}; max {_x(rng['max'], key)} on {machine_label(rng['max_run'])}")
    return "\n".join(lines)


def render_markdown(runs: list[dict], preset: str | None) -> str:
    """The ranges as a Markdown table naming each run by its kept file, then the files with their machines."""
    found = ranges(runs, preset)
    ref = lambda run: f"`{Path(run['file']).stem}`"  # noqa: E731
    lines = ["| figure | runs | min (run) | median | max (run) |", "|---|---|---|---|---|"]
    for key, rng in found.items():
        lines.append(f"| {rng['what']} | {rng['n']} | {_x(rng['min'], key)} ({ref(rng['min_run'])}) | "
                     f"{_x(rng['median'], key)} | {_x(rng['max'], key)} ({ref(rng['max_run'])}) |")
    lines.append("")
    for run in runs:
        if preset is None or run.get("preset") == preset:
            state = ("counts" if run.get("counted") else "left out: " + "; ".join(run.get("not_counted_because") or
                                                                                 ["contention not checked"]))
            lines.append(f"- {ref(run)}: {machine_label(run)}; {state}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ranges", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=RESULTS_DIR, help=f"kept runs (default {RESULTS_DIR})")
    parser.add_argument("--preset", help="only runs of this preset (e.g. bench-1b)")
    parser.add_argument("--markdown", action="store_true", help="print the ranges as a Markdown table")
    parser.add_argument("--import-run", type=Path, metavar="RESULTS_JSON", help="keep a run from its results.json "
                        "(e.g. one recorded before the per-job contention check) in --dir")
    parser.add_argument("--commit", help="with --import-run: the commit the run measured")
    parser.add_argument("--declared-quiet", metavar="WHY", help="with --import-run, for a run without a contention "
                        "record: count it, stating who observed the machine quiet and how (kept in the record)")
    parser.add_argument("--limits", action="store_true", help="print each figure against the physical limits of "
                        "its machine (benchmarks.roofline)")
    args = parser.parse_args(argv)
    if args.import_run is not None:
        if not args.import_run.is_file():
            print(f"error: {args.import_run} does not exist; pass a run's results.json", file=sys.stderr)
            return 1
        print(keep_run(import_run(args.import_run, args.commit, args.declared_quiet), args.dir))
        return 0
    try:
        runs = load_runs(args.dir)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not runs:
        print(f"no kept runs in {args.dir}: run `python -m benchmarks --preset NAME` first", file=sys.stderr)
        return 1
    if args.limits:
        from benchmarks.roofline import render_limits

        print(render_limits([r for r in runs if args.preset is None or r.get("preset") == args.preset],
                            markdown=args.markdown))
    elif args.markdown:
        print(render_markdown(runs, args.preset))
    else:
        print(render_text(runs, args.preset, args.dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
