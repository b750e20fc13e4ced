"""One benchmark run: machine facts and bandwidth, the plan, every job in its own process, bandwidth again.

    results = run_benchmark(RunOptions(bundle=..., checkpoint=..., backends="auto", workload=Workload()))

The raw results dict is what `results.json` holds; benchmarks.analysis turns it into figures and target ratios.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from benchmarks.machine import machine_facts, measure_bandwidth
from benchmarks.workload import Workload

SCHEMA = 1
N_BATCH = 512  # llama.cpp n_batch, the runtime's default (the chunk size for image rows)
MAX_CTX = 2048


@dataclass
class RunOptions:
    bundle: Path
    checkpoint: Path | None = None  # needed for the PyTorch eager baseline and the torch backends
    backends: str = "auto"
    workload: Workload = field(default_factory=Workload)
    threads: int | None = None  # None: every CPU this process may use
    device: str | None = None  # None: detect; "cpu" ignores any GPU
    isolate: bool = True  # each job in a fresh process (memory figures per job; no shared thread pools)
    bandwidth_bytes: int | None = None  # per-array size of the bandwidth test (None: 4x the last-level cache)
    baselines: bool = True
    wait_idle: float = 0.0  # seconds each job may wait for a quiet machine (0 = start at once)
    command: str = ""
    preset: str | None = None
    retries: int = 2  # a job measured while the machine was shared is measured again at most this many times
    tune: bool = True  # run the tuning table (runtimes.tune) and measure the automatic choice beside the other rows
    retune: bool = False  # measure the tuning table again even if a matching one is cached


def default_threads() -> int:
    from runtimes.device_facts import usable_cores

    return usable_cores()


def _n_ctx(config, workload: Workload) -> int:
    """Positions the runs need (answer + follow-up on one sequence, or the n self-questions sharing a prefix)."""
    image = config.num_image_tokens
    need = max(workload.positions_needed(image), image + workload.prompt_tokens + workload.questions * workload.new_tokens)
    limit = min(MAX_CTX, config.llm.max_position_embeddings)
    if need > limit:
        raise ValueError(f"the workload needs {need} positions but the model allows {limit}; lower --prompt-tokens / "
                         "--new-tokens")
    return limit  # the runtime's usual context: KV cache size and attention work as a user would have them


IDLE_LOAD_PER_CPU = 0.75  # --wait-idle: start a job once the 1-minute load average is below this per usable CPU


def wait_for_idle(max_seconds: float, log: Callable[[str], None], poll: float = 5.0) -> dict[str, float]:
    """Wait (at most max_seconds) until the 1-minute load average drops below IDLE_LOAD_PER_CPU x usable CPUs.
    -> {"waited_s", "load_at_start"}: on a shared machine, when each job started and how busy the CPUs still were."""
    limit = IDLE_LOAD_PER_CPU * default_threads()
    start = time.monotonic()
    announced = False
    while hasattr(os, "getloadavg") and os.getloadavg()[0] > limit and time.monotonic() - start < max_seconds:
        if not announced:
            log(f"[bench] waiting for the CPUs to quieten (load {os.getloadavg()[0]:.1f} > {limit:.1f}, "
                f"at most {max_seconds:.0f} s)")
            announced = True
        time.sleep(poll)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"waited_s": round(time.monotonic() - start, 1), "load_at_start": load}


def _execute(job: dict, isolate: bool, work: Path, log: Callable[[str], None], wait_idle: float = 0.0,
             retries: int = 0) -> dict:
    """Run a job; measure contention over it (benchmarks.contention) and, while contended, measure it again (at most
    `retries` more times, each after waiting up to `wait_idle` s for a quiet machine). The last attempt is kept, with
    the evidence of the discarded ones under "discarded_attempts"."""
    from benchmarks.contention import Probe, describe

    discarded = []
    for attempt in range(retries + 1):
        waited = wait_for_idle(wait_idle, log) if wait_idle > 0 else None
        probe = Probe.start()
        result = _execute_now(job, isolate, work, log)
        contention = probe.finish(job.get("threads") or default_threads())
        if waited is not None:
            result["idle_wait"] = waited
        result["contention"] = contention
        if not contention["contended"] or result.get("error"):
            break
        log(f"[bench] {job['label']}: machine shared ({'; '.join(contention['reasons'])}; {describe(contention)})"
            + (f": measuring again ({attempt + 1} of {retries})" if attempt < retries else
               ": kept, and every target it feeds is reported as not measured"))
        if attempt < retries:
            discarded.append(contention)
    if discarded:
        result["discarded_attempts"] = discarded
    return result


def _execute_now(job: dict, isolate: bool, work: Path, log: Callable[[str], None]) -> dict:
    log(f"[bench] job {job['label']}")
    if not isolate:
        from benchmarks.jobs import run_job

        try:
            return run_job(job)
        except Exception as exc:  # keep going: the report shows the failure
            return {"kind": job["kind"], "label": job["label"], "error": f"{type(exc).__name__}: {exc}"}
    index = len(list(work.glob("job-*.json")))
    job_file, result_file = work / f"job-{index}.json", work / f"result-{index}.json"
    job_file.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.worker", str(job_file), str(result_file)],
                          cwd=Path(__file__).resolve().parents[1])
    if not result_file.is_file():
        return {"kind": job["kind"], "label": job["label"], "error": _death(proc.returncode)}
    return json.loads(result_file.read_text())


def _death(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = "; was it killed for memory?" if name == "SIGKILL" else ""
        return f"the process died with {name}{hint}"
    return f"the process exited with code {code} without a result"


def _jobs(options: RunOptions, combos, vision_only, manifest, mode: str, n_ctx: int, reference: Path) -> list[dict]:
    threads = options.threads or default_threads()
    common = {"workload": options.workload.to_dict(), "threads": threads, "mode": mode, "device": options.device,
              "bundle": str(options.bundle), "n_ctx": n_ctx,
              "checkpoint": str(options.checkpoint) if options.checkpoint else None, "reference_path": str(reference)}
    jobs = []
    if options.baselines and options.checkpoint is not None:
        jobs.append({**common, "kind": "eager", "label": "PyTorch eager fp32"})
    jobs += [{**common, "kind": "vision", "label": spec.label, "vision": spec.to_dict()} for spec in vision_only]
    llama = next((c for c in combos if c.llm.kind == "llama.cpp"), None)
    if options.baselines and llama is not None:
        gguf = manifest.resolve(options.bundle, manifest.find("llm_gguf", llama.llm.precision))
        overhead = {"gguf": str(gguf), "precision": llama.llm.precision, "n_batch": N_BATCH}
        jobs.append({**common, **overhead, "kind": "high_level_defaults",
                     "label": f"llama-cpp-python high-level API with its defaults ({llama.llm.label})"})
        jobs.append({**common, "kind": "llamacpp_overhead", "label": f"llama-cpp-python high-level vs ours ({llama.llm.label})",
                     **overhead, "prompt_positions": manifest.num_image_tokens + options.workload.prompt_tokens})
    jobs += [{**common, "kind": "combo", "label": c.label, "vision": c.vision.to_dict(), "llm": c.llm.to_dict(),
              "tuned": c.tuned} for c in combos]
    return jobs


def _roofline_bytes(options: RunOptions, combos, manifest) -> dict[str, Any]:
    from benchmarks.roofline import gguf_bytes_per_token

    out = {}
    for precision in dict.fromkeys(c.llm.precision for c in combos if c.llm.kind == "llama.cpp"):
        path = manifest.resolve(options.bundle, manifest.find("llm_gguf", precision))
        out[f"llama.cpp:{precision}"] = gguf_bytes_per_token(path, manifest.config.llm.vocab_size)
    return out


def tuning_record(options: RunOptions, device, log: Callable[[str], None]) -> dict[str, Any]:
    """The bundle's tuning table (cached, or measured now: each probe in a child process) and the automatic choice
    for first-answer latency -> {"how", "prefer", "table", "text", "pick", "vision_reason", "llm_reason"}, or
    {"skipped" | "error": why}. Never raises: a failed tune is reported, and the rule-based rows are still measured."""
    from dataclasses import asdict

    from runtimes import quality
    from runtimes.model_source import ModelSource
    from runtimes.tune import choose, format_table, tuned_table

    if device.kind != "cpu":
        return {"skipped": f"measured selection covers CPU runs only ({device.kind} uses the rule-based order)"}
    log("[bench] tuning table for the bundle (runtimes.tune: cached per machine, bundle and software)")
    try:
        source = ModelSource.open(options.bundle, verify=False)
        table, how = tuned_table(source, force=options.retune)
        floor = quality.DEFAULT_FLOOR  # the floor Assistant.load applies by default
        pick = choose(table, "latency", allowed=quality.allowed(source.manifest, "llm_gguf", floor),
                      vision_allowed=quality.allowed(source.manifest, "vision_onnx", floor))
    except Exception as exc:  # noqa: BLE001  the benchmark goes on with the rule-based rows
        return {"error": f"{type(exc).__name__}: {exc}"}
    complete = pick.vision is not None and pick.llm is not None
    points = quality.combinations(source.manifest, table, floor)  # speed vs quality of every pairing (report chart)
    for point in points:
        point["automatic"] = complete and (point["vision"], point["llm"]) == (pick.vision.precision, pick.llm.precision)
    return {"how": how, "prefer": "latency", "table": table, "text": format_table(table),
            "pick": asdict(pick) if complete else None, "vision_reason": pick.vision_reason,
            "llm_reason": pick.llm_reason, "floor": str(floor), "quality_points": points}


def _bandwidth(threads: int, array_bytes: int | None) -> dict[str, Any]:
    """measure_bandwidth, with the contention over it (other processes' memory traffic lowers it, and a lower
    bandwidth flatters the roofline share)."""
    from benchmarks.contention import Probe

    probe = Probe.start()
    result = measure_bandwidth(threads, array_bytes)
    result["contention"] = probe.finish(threads)
    return result


def run_benchmark(options: RunOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    from benchmarks.plan import Combo, Spec, plan
    from runtimes.devices import resolve_device
    from sqllava_edge.bundle import read_manifest

    threads = options.threads or default_threads()
    manifest = read_manifest(options.bundle, verify=False)  # jobs verify what they load
    config, mode = manifest.config, manifest.preprocessing["mode"]
    n_ctx = _n_ctx(config, options.workload)
    device = resolve_device(options.device)
    combos, vision_only, notes = plan(options.backends, options.bundle, options.checkpoint, device)
    tuning = tuning_record(options, device, log) if options.tune else {"skipped": "--no-tune or $SQLLAVA_EDGE_TUNE=0"}
    if tuning.get("pick"):
        pick = tuning["pick"]
        combos.append(Combo(Spec("onnxruntime", pick["vision"]["precision"]), Spec("llama.cpp", pick["llm"]["precision"]),
                            tuned=True))
    log(f"[bench] {len(combos)} combination(s): {', '.join(c.label for c in combos)}; vision alone: "
        f"{', '.join(v.label for v in vision_only) or 'none'}")
    facts = machine_facts(threads)
    if options.wait_idle > 0:
        wait_for_idle(options.wait_idle, log)
    log("[bench] measuring memory bandwidth")
    bandwidth = {"start": _bandwidth(threads, options.bandwidth_bytes)}
    with tempfile.TemporaryDirectory(prefix="sqllava-bench-") as tmp:
        work = Path(tmp)
        jobs = _jobs(options, combos, vision_only, manifest, mode, n_ctx, work / "reference.npy")
        results = [_execute(job, options.isolate, work, log, options.wait_idle, options.retries) for job in jobs]
    bandwidth["end"] = _bandwidth(threads, options.bandwidth_bytes)
    facts["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"schema": SCHEMA, "command": options.command, "preset": options.preset, "bundle": str(options.bundle),
            "checkpoint": str(options.checkpoint) if options.checkpoint else None, "machine": facts,
            "bandwidth": bandwidth, "workload": options.workload.to_dict(), "n_ctx": n_ctx, "n_batch": N_BATCH,
            "preprocessing_mode": mode, "model": {"name": config.name, "image_tokens": config.num_image_tokens,
                                                   "llm_hidden": config.llm.hidden_size, "llm_layers": config.llm.num_layers},
            "plan": {"combos": [c.label for c in combos], "vision_only": [v.label for v in vision_only], "notes": notes},
            "tuning": tuning,
            "roofline_bytes": _roofline_bytes(options, combos, manifest), "jobs": results}
