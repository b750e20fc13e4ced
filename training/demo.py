"""The CPU demo end to end: synthetic data, stage 1, stage 2 (sq_r 0.5 and the answer-only ablation sq_r 0),
held-out evaluation, one JSON summary.

    python -m training.demo OUT [--skip-ablation] [--threads N]

Each stage runs as its own `python -m training` process with the tiny-demo recipe (training/recipes.py), exactly as
a user would type it; wall-clock and CPU time of each are recorded. Numbers: training/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

DEMO_DATA = ["--n-train", "6000", "--n-eval", "200", "--seed", "0"]


def run(cmd: list[str], log: Path) -> dict[str, float]:
    """Run a command, tee its output to `log`, return wall and CPU seconds (user + system of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    with log.open("w") as handle:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            handle.write(line)
            sys.stdout.write(line)
        if proc.wait() != 0:
            raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(time.time() - start, 1), "cpu_s": round(cpu, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="working folder (data, runs, reports)")
    parser.add_argument("--skip-ablation", action="store_true", help="do not train the sq_r 0 ablation")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    parser.add_argument("--stage1-args", default="", help="extra flags for stage 1 (space separated)")
    parser.add_argument("--stage2-args", default="", help="extra flags for both stage-2 runs (space separated)")
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m"]
    threads = ["--threads", str(args.threads)] if args.threads else []
    data = out / "data"
    summary: dict = {"timing": {}}
    if not data.exists():
        summary["timing"]["synthetic"] = run(py + ["training.synthetic", str(data), *DEMO_DATA], out / "synthetic.log")
    s1 = out / "stage1"
    summary["timing"]["stage1"] = run(py + ["training", "--stage", "1", "--data", str(data / "stage1.json"),
                                            "--out", str(s1), *threads, *args.stage1_args.split()], out / "stage1.log")
    variants = [("sq", "0.5")] + ([] if args.skip_ablation else [("answer_only", "0")])
    for name, sq_r in variants:
        run_dir = out / f"stage2_{name}"
        summary["timing"][f"stage2_{name}"] = run(
            py + ["training", "--stage", "2", "--data", str(data / "stage2.json"), "--init", str(s1), "--out",
                  str(run_dir), "--sq-r", sq_r, *threads, *args.stage2_args.split()], out / f"stage2_{name}.log")
        report = out / f"eval_{name}.json"
        run(py + ["training.evaluate", str(run_dir), "--data", str(data / "eval.json"), "--out", str(report),
                  "--no-progress", *threads], out / f"eval_{name}.log")
        summary[name] = json.loads(report.read_text())
        total = summary["timing"]["stage1"]["wall_s"] + summary["timing"][f"stage2_{name}"]["wall_s"]
        summary["timing"][f"train_total_{name}_wall_s"] = round(total, 1)
    for name, _ in variants:
        for key in ("qa", "self_questioning"):
            summary[name][key].pop("examples", None)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary["timing"], indent=2))
    return summary


if __name__ == "__main__":
    main()
