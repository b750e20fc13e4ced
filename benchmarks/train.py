"""Training throughput, side by side in one run: steps of the tiny recipe's stage 0 (LLM and vision stand-ins),
stage 1 and stage 2, with each speed-up on and off.

    python -m benchmarks.train [--data DIR] [--stages 0-llm,0-vision,1,2] [--steps 6] [--warmup 2] [--rounds 2]

Every variant of a stage is the demo's own command (scripts/demo.py's flags) run as a child process for
--warmup + --steps optimizer steps; the time of a step is read from the run's metrics.jsonl (the trainer's own
`elapsed`), so start-up and data preparation are not counted. The variants of all stages are interleaved, round after
round, so a load that comes and goes hits them alike; the table gives the median wall and CPU seconds per step over
every measured step of every round (CPU time, the trainer's own, is what other processes on the machine disturb
least; with spare cores the two agree), tokens/s (trained tokens for stage 0's LLM, LLM positions for stages 1 and 2, images for the
vision stand-in), and the ratio to the stage's baseline (every speed-up off) and to the default (every speed-up on).
The ratios are what carry from host to host (training/RESULTS.md); "demo" multiplies the seconds per step by the
demo's step counts.

Without --data a small synthetic set is built (200 training images; a step costs what it costs on the demo's set,
whose samples have the same lengths). Stage 1 needs base weights and stage 2 a stage-1 checkpoint: a short stage-0
run makes them (their values do not change a step's cost, but the stage-0 LLM's head has the zero rows the demo's
has). Writes OUT/train-bench.md (also printed), OUT/train-bench.json and OUT/train-bench.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.report import write_text_and_json
from training import demo_budget

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Switch:
    """A speed-up: the flag that turns it off (the default is on) and what it changes."""

    name: str
    off: str
    what: str


@dataclass(frozen=True)
class Candidate:
    """A setting measured beside the default but not on by default (the reason says why)."""

    name: str
    flags: tuple[str, ...]
    why_not_default: str


FUSED = Switch("fused AdamW", "--no-fused-adamw", "PyTorch's one-pass AdamW kernel instead of the multi-tensor one")
SWITCHES: dict[str, tuple[Switch, ...]] = {
    "0-llm": (Switch("compact vocabulary", "--no-compact-vocab",
                     "train the ~150 embedding/head rows the corpus uses, not all 32000 (exact)"), FUSED),
    "0-vision": (FUSED,),
    "1": (Switch("skip zero head rows", "--no-skip-zero-rows",
                 "loss through the frozen head's non-zero rows, the zero rows as one term (exact)"), FUSED),
    "2": (Switch("skip zero head rows", "--no-skip-zero-rows",
                 "loss through the frozen head's non-zero rows, the zero rows as one term (exact)"), FUSED),
}
BF16 = Candidate("bf16 autocast", ("--bf16",), "rounds the frozen base and the matmuls to bf16, and on the 2-core "
                                               "AVX512-BF16 host it was measured on it was no faster (training/RESULTS.md)")
CANDIDATES: dict[str, tuple[Candidate, ...]] = {"1": (BF16,), "2": (BF16,)}
STAGE_TITLES = {"0-llm": "stage 0, LLM stand-in", "0-vision": "stage 0, vision stand-in", "1": "stage 1",
                "2": "stage 2"}


def demo_steps() -> dict[str, int]:
    """The step counts of `make demo` (training/demo_budget.py)."""
    return dict(demo_budget.STEPS)


@dataclass
class Paths:
    data: Path
    work: Path
    llm: Path | None = None
    vision: Path | None = None
    stage1: Path | None = None


def command(stage: str, paths: Paths, out: Path, steps: int, threads: int | None) -> list[str]:
    """The demo's command for `stage` (scripts/demo.py), cut to `steps` steps, writing to `out`."""
    py, data = sys.executable, paths.data
    thread_flag = ["--threads", str(threads)] if threads else []
    if stage == "0-llm":
        return [py, "-m", "training.pretrain_llm", "--data", str(data / "stage2.json"), "--caption-data",
                str(data / "stage1.json"), "--scenes", "--scene-facts", "--bind-attention", "1:0,2:0", "--preset",
                "tiny", "--out", str(out), "--max-steps", str(steps), "--no-progress", *thread_flag]
    if stage == "0-vision":
        return [py, "-m", "training.pretrain_vision", "--data", str(data / "stage2.json"), "--preset", "tiny",
                "--out", str(out), "--max-steps", str(steps), "--gray-share", str(demo_budget.VISION_GRAY_SHARE),
                "--no-progress", *thread_flag]
    if stage == "1":
        return [py, "-m", "training", "--stage", "1", "--preset", "tiny", "--llm-base", str(paths.llm),
                "--vision-base", str(paths.vision), "--data", str(data / "stage1.json"), "--image-folder",
                str(data / "images"), "--out", str(out), "--max-steps", str(steps), "--no-progress", *thread_flag]
    if stage == "2":
        return [py, "-m", "training", "--stage", "2", "--init", str(paths.stage1), "--data", str(data / "stage2.json"),
                "--image-folder", str(data / "images"), "--out", str(out), "--max-steps", str(steps), "--no-progress",
                *thread_flag]
    raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(SWITCHES)}")


def variants(stage: str, with_candidates: bool = True) -> dict[str, list[str]]:
    """name -> extra flags: every speed-up on (the default), each one off, all off (the baseline), candidates."""
    switches = SWITCHES[stage]
    out = {"default (all on)": []}
    if len(switches) > 1:
        out.update({f"without {s.name}": [s.off] for s in switches})
    out["baseline (all off)"] = [s.off for s in switches]
    if with_candidates:
        out.update({f"default + {c.name}": list(c.flags) for c in CANDIDATES.get(stage, ())})
    return out


def run(argv: list[str], out: Path) -> list[dict]:
    """Run one trainer; its per-step records (those with a loss)."""
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[1:4])} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def step_times(records: list[dict], warmup: int) -> list[tuple[float, float, float]]:
    """(wall seconds, CPU seconds, tokens) of each step after the first `warmup`, from the trainer's cumulative
    `elapsed` and `cpu_s` (the process's CPU time: what other processes on the machine change least)."""
    out = []
    for before, this in zip(records, records[1:]):
        if this["step"] <= warmup:
            continue
        seconds = this["elapsed"] - before["elapsed"]
        if "tok_per_s" in this:  # stages 1 and 2: LLM positions of the step / the step's own time
            tokens = this["tok_per_s"] * seconds
        else:
            tokens = this.get("trained_tokens", this.get("images", 0))
        out.append((seconds, this["cpu_s"] - before["cpu_s"], tokens))
    return out


def prepare(paths: Paths, stages: list[str], threads: int | None, log) -> None:
    """Data if none was given; base weights for stage 1 and a stage-1 checkpoint for stage 2 (short runs)."""
    if not (paths.data / "stage2.json").is_file():
        from training.synthetic import build

        log(f"building a synthetic set in {paths.data}")
        build(paths.data, n_train=200, n_eval=4, seed=0)
    if "1" in stages or "2" in stages:
        for stage, attr, sub in (("0-llm", "llm", "llm"), ("0-vision", "vision", "vision")):
            out = paths.work / f"base-{stage}"
            log(f"short {STAGE_TITLES[stage]} run for stage 1's base")
            run(command(stage, paths, out, 2, threads), out)
            setattr(paths, attr, out / sub)
    if "2" in stages:
        out = paths.work / "base-stage1"
        log("short stage 1 run for stage 2's start")
        run(command("1", paths, out, 2, threads), out)
        paths.stage1 = out


@dataclass
class Result:
    stage: str
    variant: str
    flags: list[str]
    steps: list[tuple[float, float, float]] = field(default_factory=list)  # (wall s, CPU s, tokens) per step

    @property
    def seconds(self) -> float:
        return statistics.median(s for s, _, _ in self.steps)

    @property
    def cpu_seconds(self) -> float:
        return statistics.median(c for _, c, _ in self.steps)

    @property
    def tokens_per_s(self) -> float:
        return sum(t for _, _, t in self.steps) / sum(s for s, _, _ in self.steps)


def measure(stages: list[str], paths: Paths, steps: int, warmup: int, rounds: int, threads: int | None,
            with_candidates: bool = True) -> list[Result]:
    from tqdm import tqdm

    results = {(st, name): Result(st, name, flags) for st in stages
               for name, flags in variants(st, with_candidates).items()}
    bar = tqdm(total=rounds * len(results), desc="training benchmark", unit="run")
    for r in range(rounds):
        for i, ((stage, name), result) in enumerate(results.items()):
            bar.set_postfix_str(f"round {r + 1}: {STAGE_TITLES[stage]}, {name}")
            out = paths.work / f"round{r}-run{i}"
            records = run(command(stage, paths, out, warmup + steps, threads) + result.flags, out)
            result.steps += step_times(records, warmup)
            bar.update(1)
    bar.close()
    return list(results.values())


def table(results: list[Result], demo: dict[str, int]) -> str:
    lines = ["| stage | variant | wall s/step | CPU s/step | tokens/s | vs baseline (wall / CPU) | vs default (wall / CPU) "
             "| demo stage (est., wall) |", "|---|---|---|---|---|---|---|---|"]
    for stage in dict.fromkeys(r.stage for r in results):
        rows = [r for r in results if r.stage == stage]
        base = next(r for r in rows if r.variant.startswith("baseline"))
        default = next(r for r in rows if r.variant.startswith("default ("))
        unit = "images/s" if stage == "0-vision" else ""
        for r in rows:
            lines.append(f"| {STAGE_TITLES[stage]} | {r.variant} | {r.seconds:.3f} | {r.cpu_seconds:.3f} | "
                         f"{r.tokens_per_s:,.0f} {unit} | {base.seconds / r.seconds:.2f}x / "
                         f"{base.cpu_seconds / r.cpu_seconds:.2f}x | {default.seconds / r.seconds:.2f}x / "
                         f"{default.cpu_seconds / r.cpu_seconds:.2f}x | "
                         f"{r.seconds * demo[stage] / 60:.1f} min ({demo[stage]} steps) |")
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(r.stage for r in results))
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.6), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rows = [r for r in results if r.stage == stage]
        ax.barh([r.variant for r in rows], [r.seconds for r in rows], color="#4878a8")
        ax.set_title(STAGE_TITLES[stage], fontsize=10)
        ax.set_xlabel("seconds per step (median)")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle("training step time, speed-ups on and off (one run, interleaved)", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def report(results: list[Result], args, started: float, load: tuple[float, float, float]) -> str:
    demo = demo_steps()
    switches = "\n".join(f"- **{s.name}** (`{s.off}` turns it off): {s.what}"
                         for s in dict.fromkeys(s for st in SWITCHES.values() for s in st))
    candidates = "\n".join(f"- {c.name} (`{' '.join(c.flags)}`): measured, not default: {c.why_not_default}"
                           for c in dict.fromkeys(c for cs in CANDIDATES.values() for c in cs))
    return (f"# Training benchmark\n\n`python -m benchmarks.train {' '.join(args.argv)}`: {args.steps} measured steps "
            f"after {args.warmup} warm-up steps per run, {args.rounds} interleaved rounds, "
            f"{args.threads or 'default'} threads; load average at the start {load[0]:.2f}; "
            f"{(time.time() - started) / 60:.1f} min in all.\n\n{table(results, demo)}\n\n"
            f"Speed-ups (on by default):\n{switches}\n\nCandidates:\n{candidates}\n")


def write(out: Path, text: str, raw: dict) -> None:
    """OUT/train-bench.md and OUT/train-bench.json (every step's times), each written whole or not at all."""
    write_text_and_json(out, "train-bench", text, raw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="a synthetic set (python -m training.synthetic); default: build a small one")
    parser.add_argument("--stages", default="0-llm,0-vision,1,2", help="comma-separated: 0-llm, 0-vision, 1, 2")
    parser.add_argument("--steps", type=int, default=6, help="measured optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps per run before the measured ones")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over every variant")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads of every run (default: torch's)")
    parser.add_argument("--no-candidates", dest="candidates", action="store_false",
                        help="measure only the speed-ups, not the candidates that are off by default")
    parser.add_argument("--out", type=Path, default=Path("train-bench-out"), help="where the report goes")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in SWITCHES]
    if unknown or not stages:
        parser.error(f"--stages: unknown {unknown or 'none given'}; valid: {', '.join(SWITCHES)}")
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        parser.error("--steps, --warmup and --rounds must be >= 1 (the first step's time is not measurable)")
    if args.data is not None and not (args.data / "stage2.json").is_file():
        parser.error(f"--data {args.data}: no stage2.json there; make one with python -m training.synthetic")
    started, load = time.time(), os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sqllava-train-bench-") as tmp:
        paths = Paths(args.data or Path(tmp) / "data", Path(tmp))
        prepare(paths, stages, args.threads, lambda m: print(f"[train-bench] {m}", file=sys.stderr, flush=True))
        results = measure(stages, paths, args.steps, args.warmup, args.rounds, args.threads, args.candidates)
    text = report(results, args, started, load)
    write(args.out, text, {"argv": args.argv, "load_at_start": load, "results": [
        {"stage": r.stage, "variant": r.variant, "flags": r.flags, "steps": r.steps, "median_s": r.seconds,
         "median_cpu_s": r.cpu_seconds, "tokens_per_s": r.tokens_per_s} for r in results]})
    plot(results, args.out / "train-bench.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
