"""Runs that count and runs that do not: contention measured per job from fake /proc/stat readings, targets never
"met" when a job they come from was shared, kept runs with their machine, ranges over machines, compute limits."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.analysis import NOT_MEASURED_SHARED, analyze
from benchmarks.contention import Probe, contention_record, read_stat

ROOT = Path(__file__).resolve().parents[1]
# The bench-1b run of 2026-12-03 (commit 1b6a329, quiet 2-core AMD EPYC), as benchmarks/results-bench-1b.json held it:
# the analysis tests judge a fixed record, not whatever run is newest.
RECORDED_RUN = ROOT / "tests" / "fixtures" / "bench-1b-2026-12-03.json"
HZ = 100


def _stat(busy: int, idle: int, steal: int = 0, cpus: int = 2) -> dict:
    return {"busy": busy, "idle": idle, "steal": steal, "total": busy + idle + steal, "cpus": cpus}


def _record(others_s: float, steal_s: float = 0.0, own_s: float = 18.0, wall: float = 10.0, threads: int = 2,
            cpus: int = 2) -> dict:
    """A job of `wall` s on `cpus` CPUs that used own_s CPU seconds while others took others_s, steal steal_s."""
    start = _stat(1000, 5000, 0, cpus)
    capacity = cpus * wall * HZ
    busy = (own_s + others_s) * HZ
    end = _stat(int(1000 + busy), int(5000 + capacity - busy - steal_s * HZ), int(steal_s * HZ), cpus)
    return contention_record(start, end, own_s, wall, threads, ticks_per_second=HZ)


def test_quiet_job_counts_and_shared_or_stolen_jobs_do_not():
    quiet = _record(others_s=0.5)
    assert quiet["contended"] is False and quiet["reasons"] == []
    assert quiet["own_cpu_share"] == pytest.approx(0.9) and quiet["others_share"] == pytest.approx(0.025)
    shared = _record(others_s=8.0, own_s=11.0)  # another process on most of one core
    assert shared["contended"] is True and shared["others_share"] == pytest.approx(0.4)
    assert "other processes took 40%" in shared["reasons"][0]
    stolen = _record(others_s=0.0, steal_s=2.0)
    assert stolen["contended"] is True and stolen["steal_share"] == pytest.approx(0.1)
    assert "stole" in stolen["reasons"][0]


def test_others_on_cpus_the_job_left_free_do_not_contend():
    # 1-thread job on 2 CPUs: another process using the second CPU does not take the job's core
    free = _record(others_s=9.5, own_s=9.5, threads=1)
    assert free["contended"] is False and free["others_share"] == 0.0 and free["others_busy_share"] > 0.4
    beyond = _record(others_s=12.0, own_s=8.0, threads=1)  # more than the free CPU: 2 s on the job's core
    assert beyond["contended"] is True and beyond["others_share"] == pytest.approx(0.2)


def test_low_own_cpu_share_alone_is_evidence_not_a_verdict():
    # serial phases keep a job's CPU share low on an idle machine too: the verdict comes from the others and steal
    serial = _record(others_s=0.2, own_s=10.0)
    assert serial["own_cpu_share"] == pytest.approx(0.5) and serial["contended"] is False


def test_unreadable_stat_is_not_checked_rather_than_quiet():
    record = contention_record(None, None, 5.0, 10.0, 2)
    assert record["contended"] is None and "not checked" in record["reasons"][0]


def test_probe_reads_proc_stat_files(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 10 0 0 0 0 0\ncpu0 50 0 25 400 5 0 0 0 0 0\ncpu1 50 0 25 400 5 0 0 0 0 0\n")
    assert read_stat(stat) == {"busy": 150, "idle": 810, "steal": 0, "total": 960, "cpus": 2}
    probe = Probe.start(stat, tmp_path / "no-cgroup")
    stat.write_text("cpu  100000 0 50 800 10 0 0 900 0 0\ncpu0 1 0 0 0 0 0 0 0\ncpu1 1 0 0 0 0 0 0 0\n")
    record = probe.finish(threads=2)
    assert record["contended"] is True and record["steal_share"] > 0 and record["cpus"] == 2
    assert read_stat(tmp_path / "missing") is None
    (tmp_path / "bad").write_text("intr 1 2 3\n")
    assert read_stat(tmp_path / "bad") is None


# --- targets: a contended job record never yields "met" -------------------------------------------------------


def _recorded_run(shared: set[str] = frozenset()) -> dict:
    """The recorded bench-1b run of 2026-12-03 with a per-job contention record: quiet, or shared for `shared`."""
    results = json.loads(RECORDED_RUN.read_text())
    results.pop("analysis", None)
    for job in results["jobs"]:
        job["contention"] = _record(others_s=8.0, own_s=11.0) if job["label"] in shared else _record(others_s=0.3)
    return results


def _by_id(analysis: dict) -> dict:
    return {t["id"]: t for t in analysis["targets"]}


def test_a_quiet_record_can_still_meet_its_targets():
    analysis = analyze(_recorded_run())
    targets = _by_id(analysis)
    assert analysis["contention"] == {"checked": True, "shared_jobs": [], "counted": True}
    assert all(t["status"] == "met" and t["met"] is True for t in targets.values())
    assert targets["vision_speedup"]["sources"][0] == "PyTorch eager fp32"


def test_a_contended_job_marks_every_target_it_feeds_not_measured():
    from benchmarks.report import render_markdown

    results = _recorded_run({"PyTorch eager fp32"})
    analysis = analyze(results)
    targets = _by_id(analysis)
    fed = {"vision_speedup", "vision_fp32_speedup", "ttft_ratio", "e2e_speedup"}  # the eager baseline feeds these
    for tid in fed:
        assert targets[tid]["met"] is None and targets[tid]["status"] == NOT_MEASURED_SHARED
        assert "PyTorch eager fp32: other processes took 40%" in targets[tid]["evidence"]
        assert targets[tid]["measured"] > 0  # the ratio stays on record, it just does not count
    assert all(targets[t]["met"] is True for t in set(targets) - fed)  # the jobs of the others were quiet
    assert analysis["contention"]["counted"] is False
    report = render_markdown(results, analysis)
    assert "Machine shared: 1 of" in report and "own CPU 55% of 2 thread(s) x 10 s" in report
    rows = [line for line in report.split("## Targets")[1].split("\n## ")[0].splitlines() if line.startswith("| ")]
    shared_rows = [r for r in rows if NOT_MEASURED_SHARED in r]
    assert len(shared_rows) == len(fed) and not any("| yes |" in r for r in shared_rows)


def test_a_contended_fp32_vision_job_marks_both_vision_targets_not_measured():
    analysis = analyze(_recorded_run({"onnxruntime:fp32"}))
    targets = _by_id(analysis)
    fed = {"vision_speedup", "vision_fp32_speedup"}  # fp32 is one of the rows the best is chosen among
    assert {t for t, v in targets.items() if v["status"] == NOT_MEASURED_SHARED} == fed
    assert targets["vision_fp32_speedup"]["sources"] == ["PyTorch eager fp32", "onnxruntime:fp32"]
    assert targets["vision_fp32_speedup"]["measured"] == pytest.approx(_encode_ms("PyTorch eager fp32", "pipeline")
                                                                        / _encode_ms("onnxruntime:fp32", "single"))


def test_fp32_vision_target_is_judged_against_one():
    results = _recorded_run()
    fp32 = next(j for j in results["jobs"] if j["label"] == "onnxruntime:fp32")
    for run in fp32["single"]["timed"]:
        run["encode_ms"] *= 3  # slower than eager now
    target = _by_id(analyze(results))["vision_fp32_speedup"]
    ratio = _encode_ms("PyTorch eager fp32", "pipeline") / (3 * _encode_ms("onnxruntime:fp32", "single"))
    assert ratio < 1 and target["status"] == "not met" and target["measured"] == pytest.approx(ratio)


def _encode_ms(label: str, side: str) -> float:
    """The recorded run's median batch-1 encode time of one job (its "pipeline" or "single" timed runs)."""
    import statistics

    job = next(j for j in json.loads(RECORDED_RUN.read_text())["jobs"] if j["label"] == label)
    return statistics.median(r["encode_ms"] for r in job[side]["timed"])


def test_every_job_contended_leaves_no_target_met():
    results = _recorded_run({j["label"] for j in json.loads(
        RECORDED_RUN.read_text())["jobs"]})
    analysis = analyze(results)
    assert not any(t["met"] for t in analysis["targets"])
    assert {t["status"] for t in analysis["targets"]} == {NOT_MEASURED_SHARED}


def test_a_run_without_contention_records_is_judged_as_measured_and_says_so():
    from benchmarks.report import render_markdown

    results = json.loads(RECORDED_RUN.read_text())
    results.pop("analysis", None)
    analysis = analyze(results)
    assert analysis["contention"]["counted"] is None and _by_id(analysis)["vision_speedup"]["met"] is True
    assert "Contention was not checked for this run" in render_markdown(results, analysis)


def test_a_contended_job_is_measured_again_at_most_retries_times(monkeypatch, tmp_path):
    from benchmarks import contention, run

    verdicts = iter([True, True, False])

    class FakeProbe:
        @classmethod
        def start(cls):
            return cls()

        def finish(self, threads):
            shared = next(verdicts)
            return _record(others_s=8.0 if shared else 0.1, own_s=11.0 if shared else 18.0)

    calls = []
    monkeypatch.setattr(contention, "Probe", FakeProbe)
    monkeypatch.setattr(run, "_execute_now", lambda job, isolate, work, log: calls.append(1) or {"label": job["label"]})
    job = {"label": "x", "threads": 2, "kind": "vision"}
    result = run._execute(job, True, tmp_path, lambda _: None, retries=2)
    assert len(calls) == 3 and result["contention"]["contended"] is False and len(result["discarded_attempts"]) == 2
    verdicts = iter([True] * 5)
    calls.clear()
    result = run._execute(job, True, tmp_path, lambda _: None, retries=1)
    assert len(calls) == 2 and result["contention"]["contended"] is True and len(result["discarded_attempts"]) == 1
    verdicts = iter([True])
    calls.clear()
    assert run._execute(job, True, tmp_path, lambda _: None, retries=0)["contention"]["contended"] is True
    assert len(calls) == 1


# --- one cpuinfo parser -----------------------------------------------------------------------------------------

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1
cpu MHz\t\t: 2596.144
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni

processor\t: 1
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni
"""
ARM = "processor\t: 0\nFeatures\t: fp asimd asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU part\t: 0xd0c\n"


def test_cpuinfo_parser_identity_and_fingerprint(tmp_path):
    from runtimes.device_facts import cpu_identity, fingerprint_id, parse_cpuinfo, read_cpuinfo

    fields = parse_cpuinfo(X86)
    assert fields["processors"] == "2" and fields["cpu MHz"] == "2596.144"
    ident = cpu_identity(fields)
    assert (ident["vendor"], ident["family"], ident["model"], ident["stepping"], ident["model_name"]) == \
        ("AuthenticAMD", 25, 17, 1, "AMD EPYC")
    assert ident["flags"] == ["fpu", "sse2", "avx2", "avx512f", "avx512_vnni"] and len(ident["flags_sha256"]) == 16
    reordered = cpu_identity(parse_cpuinfo(X86.replace("fpu sse2 avx2", "avx2 fpu sse2")))
    assert reordered["flags_sha256"] == ident["flags_sha256"]  # a flag set, not a flag order
    arm = cpu_identity(parse_cpuinfo(ARM))
    assert (arm["vendor"], arm["family"], arm["model"], arm["flags"]) == ("0x41", 8, "0xd0c", ["fp", "asimd", "asimddp"])
    assert fingerprint_id(ident, 2) == fingerprint_id(reordered, 2) != fingerprint_id(ident, 4)
    assert fingerprint_id(cpu_identity({}), 2) is None  # nothing known: no id that would make machines look alike
    assert read_cpuinfo(tmp_path / "missing") == {}


def test_tuning_cache_key_reads_cpuinfo_through_the_shared_parser(tmp_path):
    import hashlib

    from runtimes.tune import machine_key

    path = tmp_path / "cpuinfo"
    path.write_text(X86)
    key = machine_key(path)
    flags = " ".join(sorted("fpu sse2 avx2 avx512f avx512_vnni".split()))
    assert key["cpu"] == "AMD EPYC" and key["flags_sha256"] == hashlib.sha256(flags.encode()).hexdigest()[:16]


# --- kept runs, ranges, limits ----------------------------------------------------------------------------------


def _kept(tmp_path, counted: bool, int8: float, family: int | None, date: str = "2026-12-01") -> dict:
    from benchmarks.ranges import kept_record

    results = _recorded_run() if counted else _recorded_run({"PyTorch eager fp32"})
    results["machine"]["time_utc"] = f"{date}T10:00:00Z"
    results["machine"]["cpu"].update(vendor="AuthenticAMD", family=family, model_number=17, stepping=1)
    record = kept_record(results, analyze(results), commit="abc1234")
    record["ratios"]["vision_int8_vs_eager"] = int8
    return record


def test_kept_runs_are_named_by_date_preset_and_machine_and_never_overwritten(tmp_path):
    from benchmarks.ranges import keep_run, load_runs

    record = _kept(tmp_path, True, 6.0, 25)
    first, second = keep_run(record, tmp_path), keep_run(record, tmp_path)
    assert first.name == f"2026-12-01-bench-1b-{record['machine']['id']}.json" and second.name.endswith("-2.json")
    runs = load_runs(tmp_path)
    assert [r["counted"] for r in runs] == [True, True] and runs[0]["machine"]["family"] == 25
    assert runs[0]["machine"]["bandwidth_gbps"] == pytest.approx(39.15) and runs[0]["machine"]["software"]["torch"]
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ValueError, match="not a schema-1 kept run"):
        load_runs(tmp_path)


def test_ranges_use_only_runs_that_count_and_name_their_machines(tmp_path):
    from benchmarks.ranges import keep_run, load_runs, main, ranges, render_markdown

    for counted, int8, family, date in ((True, 6.0, 26, "2026-12-01"), (True, 2.0, 25, "2026-12-02"),
                                        (True, 3.0, 25, "2026-12-03"), (False, 9.9, 25, "2026-12-04")):
        keep_run(_kept(tmp_path, counted, int8, family, date), tmp_path)
    runs = load_runs(tmp_path)
    found = ranges(runs, "bench-1b")["vision_int8_vs_eager"]
    assert (found["n"], found["min"], found["median"], found["max"]) == (3, 2.0, 3.0, 6.0)
    assert found["min_run"]["date"] == "2026-12-02" and found["max_run"]["machine"]["family"] == 26
    table = render_markdown(runs, "bench-1b")
    assert "9.90x" not in table and "left out: " in table and "2.00x (`2026-12-02-bench-1b-" in table
    assert main(["--dir", str(tmp_path), "--preset", "bench-1b"]) == 0
    assert main(["--dir", str(tmp_path / "none")]) == 1


def test_compute_limits_from_cores_clock_and_simd_width():
    from benchmarks.roofline import CORE_MODELS, core_model_for, figure_limits, prefill_ops, vision_ops
    from sqllava_edge.config import get_preset

    zen4 = CORE_MODELS["zen4"].peaks(cores=2, ghz=2.5)  # 2 FMA pipes x 8 fp32 lanes x 2 ops x 5 G cycles
    assert zen4 == {"fp32_gflops": 160.0, "bf16_gflops": 320.0, "int8_gops": 640.0}
    assert CORE_MODELS["zen5"].peaks(2, 2.5)["int8_gops"] == 1280.0
    assert core_model_for({"vendor": "AuthenticAMD", "family": 25, "simd": ["avx512f"]})[0] == "zen4"
    assert core_model_for({"family": None, "model_name": "AMD EPYC", "simd": ["avx512f", "avx_vnni"]})[0] == "zen5"
    assert core_model_for({"family": None, "simd": ["avx512f"]})[0] is None
    config = get_preset("bench-1b")
    ops = vision_ops(config)
    assert 3.5e11 < ops["tower"] < 3.8e11 and ops["total"] > ops["tower"]  # ViT-L/14-336: ~0.18 T multiply-adds
    per_token = (prefill_ops(config.llm, 2) - prefill_ops(config.llm, 1))
    assert per_token == pytest.approx(2 * 0.97e9, rel=0.03)  # 2 ops per non-embedding weight of the 1.1B LLM
    run = {"preset": "bench-1b", "machine": {"logical_cpus": 2, "mhz_reported": 2500.0, "bandwidth_gbps": 40.0},
           "figures": {"vision_ms": {"onnxruntime:int8": 1000.0 * ops["total"] / 640e9}, "prefill_positions": 608,
                       "decode_tok_s": {"row": 40.0}, "decode_bytes_per_token": 5e8}}
    rows = {r["figure"]: r for r in figure_limits(run, [run])}
    assert rows["vision, onnxruntime int8"]["shares"]["zen4"] == pytest.approx(1.0)
    assert rows["vision, onnxruntime int8"]["shares"]["zen5"] == pytest.approx(0.5)
    assert rows["decode (weights read per token / measured bandwidth)"]["shares"]["zen4"] == pytest.approx(0.5)


def test_kept_bench_1b_runs_and_the_results_page_ranges_agree():
    """benchmarks/results holds the machines docs/results.md quotes; its tables are what the code prints from them."""
    from benchmarks.ranges import load_runs, ranges, render_markdown

    runs = load_runs()
    bench = [r for r in runs if r["preset"] == "bench-1b"]
    assert sum(1 for r in bench if r["counted"]) >= 2
    found = ranges(runs, "bench-1b")
    assert found["vision_int8_vs_eager"]["min"] <= 2.36 and found["vision_int8_vs_eager"]["max"] >= 6.66
    results = (ROOT / "docs" / "results.md").read_text()
    for line in render_markdown(runs, "bench-1b").splitlines():
        assert line in results, f"docs/results.md's bench-1b ranges are out of date: {line}"
    from benchmarks.roofline import render_limits

    for line in render_limits(bench, markdown=True).splitlines():
        assert line in results, f"docs/results.md's bench-1b limits are out of date: {line}"


def test_a_bandwidth_measured_on_a_shared_machine_does_not_make_the_roofline_share_count():
    results = _recorded_run()
    for when in ("start", "end"):
        results["bandwidth"][when]["contention"] = _record(others_s=0.3)
    assert _by_id(analyze(results))["roofline_share"]["status"] == "met"
    results["bandwidth"]["end"]["contention"] = _record(others_s=8.0, own_s=11.0)
    analysis = analyze(results)
    roof = _by_id(analysis)["roofline_share"]
    assert roof["status"] == NOT_MEASURED_SHARED and roof["met"] is None and "memory bandwidth" in roof["evidence"]
    assert _by_id(analysis)["vision_speedup"]["status"] == "met" and analysis["contention"]["counted"] is False
