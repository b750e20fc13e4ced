"""benchmarks: the `--preset tiny` smoke run (report structure, positive numbers; never timing thresholds), the
backend-list parser, the summaries, the roofline arithmetic, the bandwidth test and the preset cache's validation."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The bench-1b run of 2026-12-03 (commit 1b6a329, quiet 2-core AMD EPYC), as benchmarks/results-bench-1b.json held it:
# the analysis tests judge a fixed record, not whatever run is newest.
RECORDED_RUN = ROOT / "tests" / "fixtures" / "bench-1b-2026-12-03.json"
pytest.importorskip("llama_cpp", reason="the benchmark's LLM side needs llama-cpp-python")
pytest.importorskip("onnxruntime", reason="the benchmark's vision side needs onnxruntime")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One `python -m benchmarks --preset tiny --runs 2` run (artifacts come from the preset cache, built if absent),
    through tuning as users run it (the suite switches tuning off elsewhere)."""
    import os

    out = tmp_path_factory.mktemp("bench") / "tiny"
    cmd = [sys.executable, "-m", "benchmarks", "--preset", "tiny", "--runs", "2", "--prompt-tokens", "8",
           "--new-tokens", "8", "--bandwidth-mib", "32", "--retries", "0", "--no-keep", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "SQLLAVA_EDGE_TUNE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout, json.loads((out / "results.json").read_text())


def _positive(summary) -> bool:
    return summary is not None and summary["n"] >= 1 and summary["min"] > 0 and summary["median"] > 0


def test_smoke_writes_report_json_and_chart(smoke):
    out, stdout, results = smoke
    assert sorted(p.name for p in out.iterdir()) == ["chart.png", "quality.png", "report.md", "results.json"]
    assert (out / "chart.png").read_bytes()[:8] == (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = results["tuning"]["quality_points"]  # fp32 / int8 vision x q4_k_m: each pairing, the automatic one marked
    assert {(p["vision"], p["llm"]) for p in points} == {("fp32", "q4_k_m"), ("int8", "q4_k_m")}
    assert sum(p["automatic"] for p in points) == 1 and all(p["kl_mean"] is not None for p in points)
    report = (out / "report.md").read_text()
    assert stdout.strip() == report.strip()  # the report is also printed
    for heading in ("## Targets", "## Automatic choice", "## Speed versus quality", "## Machine", "## Backend combinations", "## Vision backends",
                    "## llama.cpp: our runtime vs llama-cpp-python"):
        assert heading in report
    assert not list(out.parent.glob("*.raw.json")), "the raw fallback file is removed once the report is written"


def test_smoke_records_machine_and_bandwidth(smoke):
    _, _, results = smoke
    machine = results["machine"]
    assert machine["cpu"]["logical_cpus"] >= 1 and machine["threads_used"] >= 1
    assert machine["libraries"]["torch"] and machine["libraries"]["llama_cpp_python"]
    for when in ("start", "end"):
        bw = results["bandwidth"][when]
        assert all(bw[k]["best_gbps"] > 0 and len(bw[k]["samples_gbps"]) == bw["repeats"] for k in ("copy", "triad", "read"))
    assert results["workload"]["runs"] == 2 and results["workload"]["new_tokens"] == 8


def test_smoke_jobs_ran_with_positive_numbers(smoke):
    _, _, results = smoke
    analysis = results["analysis"]
    failed = [j for j in results["jobs"] if j.get("error") and j["kind"] != "high_level_defaults"]
    assert not failed, failed  # the defaults probe may die (SIGILL on AMX VMs): that is a finding, not a failure
    assert {j["kind"] for j in results["jobs"]} >= {"eager", "llamacpp_overhead", "combo", "high_level_defaults"}
    combos = analysis["combos"]  # the rule-based pair, and the automatic measured choice as its own row when tuned
    assert sum(not c["tuned"] for c in combos) == 1 and sum(c["tuned"] for c in combos) <= 1, combos
    for combo in combos:
        f = combo["figures"]
        for key in ("preprocess_ms", "encode_ms", "prefill_ms", "prefill_tok_s", "ttft_ms", "decode_tok_s", "e2e_ms",
                    "followup_ttft_ms", "encode_batch_ms", "self_question_shared_ms", "self_question_sequential_ms"):
            assert _positive(f[key]), (combo["label"], key)
            assert f[key]["n"] == 2  # --runs 2; the warm-up is kept apart
        assert f["itl_p50_ms"] > 0 and f["itl_p95_ms"] >= f["itl_p50_ms"] and f["itl_samples"] == 2 * 7
        assert f["prefill_positions"] == results["model"]["image_tokens"] + 8
        assert f["roofline"]["tok_s"] > 0 and f["roofline"]["share"] > 0
    assert f["memory"]["peak_rss_mib"] > 0
    api = f["assistant"]
    assert _positive(api["ttft_ms"]) and _positive(api["followup_ttft_ms"])
    assert api["followup_vision_encodes"]["max"] == 0  # the chat follow-up reuses the image
    eager = analysis["eager"]["figures"]
    assert _positive(eager["e2e_ms"]) and _positive(eager["decode_tok_s"])
    assert analysis["eager"]["preprocess_parity_max_abs_diff"] <= 1e-5


def test_smoke_raw_samples_and_exact_token_counts(smoke):
    _, _, results = smoke
    combo = next(j for j in results["jobs"] if j["kind"] == "combo")
    runs = combo["pipeline"]["timed"]
    assert len(runs) == 2 and len(combo["pipeline"]["warmup"]) == 1
    assert all(len(r["tokens"]) == 8 and len(r["itl_ms"]) == 7 for r in runs)  # exactly G tokens, EOS ignored
    assert all(r["followup_prefill_tokens"] == 9 for r in runs)  # last answer token + P new tokens, nothing else
    for mode in ("shared", "sequential"):
        assert all(r["tokens"] == [8, 8, 8] for r in combo["self_question"][mode]["timed"])
    cos = combo["cosine_vs_eager_fp32"]
    assert 0 < cos["min"] <= cos["mean"] <= 1 + 1e-6


def test_smoke_targets_are_all_reported(smoke):
    _, _, results = smoke
    from benchmarks.analysis import NOT_MEASURED_SHARED, TARGETS

    targets = results["analysis"]["targets"]
    assert [t["id"] for t in targets] == [t[0] for t in TARGETS]
    for t in targets:  # on a shared machine (the suite's usual case) a target is not measured, never met
        assert t["measured"] is not None and t["measured"] > 0, t
        assert t["detail"] and t["sources"]
        if t["status"] == NOT_MEASURED_SHARED:
            assert t["met"] is None and t["evidence"]
        else:
            assert t["met"] in (True, False) and t["status"] == ("met" if t["met"] else "not met")


def test_from_json_rerenders(smoke, tmp_path):
    out, _, _ = smoke
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--from-json", str(out / "results.json"), "--out",
                           str(tmp_path / "again")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "again" / "report.md").read_text() == (out / "report.md").read_text()


def test_roofline_bytes_from_the_gguf(smoke):
    _, _, results = smoke
    from benchmarks.roofline import gguf_bytes_per_token, roofline
    from sqllava_edge.bundle import read_manifest

    bundle = Path(results["bundle"])
    manifest = read_manifest(bundle, verify=False)
    gguf = manifest.resolve(bundle, manifest.find("llm_gguf", "q4_k_m"))
    info = gguf_bytes_per_token(gguf, 32000)
    assert 0 < info["embedding_bytes"] < info["weights_bytes"] < gguf.stat().st_size
    assert info["bytes_per_token"] == info["weights_bytes"] - info["embedding_bytes"] + info["embedding_bytes"] // 32000
    assert roofline(10.0, 10**9) == pytest.approx(10.0)


# --------------------------------------------------------------------------------------------------------------------
# Units (no run needed)


@pytest.mark.parametrize("text,expect", [
    ("auto", "auto"),
    ("all", "all"),
    ("onnxruntime:int8+llama.cpp:q4_k_m", ["onnxruntime:int8+llama.cpp:q4_k_m"]),
    ("torch+torch, onnxruntime+llama.cpp", ["torch+torch", "onnxruntime+llama.cpp"]),
])
def test_parse_backends(text, expect):
    from benchmarks.plan import parse_backends

    got = parse_backends(text)
    assert (got if isinstance(got, str) else [c.label for c in got]) == expect


@pytest.mark.parametrize("text,message", [
    ("onnxruntime", r"VISION\+LLM"),
    ("onnx+llama.cpp", "unknown vision backend"),
    ("torch+vllm", "unknown LLM backend"),
    (" , ", "empty"),
])
def test_parse_backends_rejects(text, message):
    from benchmarks.plan import parse_backends

    with pytest.raises(ValueError, match=message):
        parse_backends(text)


def test_summarize_and_percentiles():
    from benchmarks.timing import percentile, summarize

    s = summarize([4.0, 1.0, 3.0, 2.0])
    assert (s["n"], s["median"], s["min"], s["max"]) == (4, 2.5, 1.0, 4.0)
    assert s["iqr"] == pytest.approx(1.5)
    assert summarize([]) is None and percentile([], 50) is None
    assert percentile(range(101), 95) == pytest.approx(95.0)


def test_bandwidth_measures_positive_rates():
    from benchmarks.machine import measure_bandwidth

    bw = measure_bandwidth(threads=2, array_bytes=8 * 2**20, repeats=2)
    assert bw["gbps"] == max(bw[k]["best_gbps"] for k in ("copy", "triad", "read")) > 0
    assert bw["roofline_kernel"] in ("copy", "triad", "read")


def test_machine_record_knows_jetsons_the_runtime_knows(tmp_path):
    """The benchmark's machine record recognises a Jetson as selection does: an Orin NX devkit's model has no
    "Jetson" and an l4t container shows only /sys/devices/soc0."""
    from benchmarks.machine import jetson_facts

    def tree(name: str, files: dict[str, bytes]) -> Path:
        for rel, data in files.items():
            (tmp_path / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / rel).write_bytes(data)
        return tmp_path / name

    nx = tree("nx", {"proc/device-tree/model": b"NVIDIA Orin NX Developer Kit\x00",
                     "proc/device-tree/compatible": b"nvidia,p3767-0000\x00nvidia,tegra234\x00",
                     "etc/nv_tegra_release": b"# R36 (release), REVISION: 4.3, GCID: 1\n"})
    facts = jetson_facts(nx)
    assert facts["model"] == "NVIDIA Orin NX Developer Kit" and facts["l4t_release"] == "R36 (release), REVISION: 4.3, GCID: 1"
    container = tree("container", {"sys/devices/soc0/family": b"Tegra\n", "sys/devices/soc0/soc_id": b"35\n"})
    assert jetson_facts(container)["model"] == "NVIDIA Jetson (tegra234)" and jetson_facts(container)["l4t_release"] is None
    assert jetson_facts(tree("pi", {"proc/device-tree/model": b"Raspberry Pi 4 Model B\x00"})) is None


def test_rotated_rounds_rotate_the_order_and_tag_each_sample():
    from benchmarks.timing import rotated_rounds

    said = []
    samples = rotated_rounds(("a", "b", "c"), 3, lambda setting, r: {"setting": setting, "seed": 10 * r},
                             lambda r, setting, sample: said.append((r, setting)))
    assert [s for _, s in said] == list("abcbcacab") and [r for r, _ in said] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert samples[3] == {"setting": "b", "seed": 10, "round": 1}


def test_wait_for_idle_is_bounded():
    from benchmarks.run import wait_for_idle

    waited = wait_for_idle(0.2, log=lambda _: None, poll=0.05)
    assert 0 <= waited["waited_s"] <= 1.0 and waited["load_at_start"] >= 0


def test_workload_rejects_bad_counts():
    from benchmarks.workload import Workload, prompt_ids

    with pytest.raises(ValueError, match="new_tokens"):
        Workload(new_tokens=0)
    ids = prompt_ids(Workload(prompt_tokens=16), 32000)
    assert len(ids) == 16 and min(ids) >= 3 and ids == prompt_ids(Workload(prompt_tokens=16), 32000)


def test_cli_errors_are_clear(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--preset", "nope"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "valid presets" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--bundle", str(tmp_path / "missing")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "does not exist" in proc.stderr


def test_preset_cache_is_trusted_only_when_key_and_hashes_match(smoke, tmp_path):
    _, _, results = smoke
    from benchmarks.presets import RECORD, _cached

    cached = Path(results["bundle"]).parent
    key = json.loads((cached / RECORD).read_text())["key"]
    copy = tmp_path / cached.name
    shutil.copytree(cached / "bundle", copy / "bundle")
    (copy / "checkpoint").mkdir()
    shutil.copy(cached / "checkpoint" / "sqllava_edge.json", copy / "checkpoint")
    shutil.copy(cached / RECORD, copy / RECORD)
    assert _cached(copy, key)
    assert not _cached(copy, "0" * 64)  # another config / tool version
    tokenizer = next(p for p in (copy / "bundle" / "tokenizer").iterdir() if p.is_file())
    tokenizer.write_bytes(tokenizer.read_bytes() + b" ")
    assert not _cached(copy, key)  # a modified artifact is rebuilt, never trusted


def test_training_benchmark_reads_step_times_and_compares_variants_side_by_side(tmp_path):
    from benchmarks import train as bench

    records = [{"step": 1, "loss": 2.0, "elapsed": 5.0, "cpu_s": 9.0, "trained_tokens": 100},
               {"step": 2, "loss": 1.9, "elapsed": 6.0, "cpu_s": 11.0, "trained_tokens": 120},
               {"step": 3, "loss": 1.8, "elapsed": 7.5, "cpu_s": 14.0, "trained_tokens": 90}]
    assert bench.step_times(records, warmup=1) == [(1.0, 2.0, 120), (1.5, 3.0, 90)]  # step 1 holds start-up
    assert bench.step_times([{**r, "tok_per_s": 200.0} for r in records], warmup=2) == [(1.5, 3.0, 300.0)]
    two = bench.variants("1")
    assert two["default (all on)"] == [] and two["baseline (all off)"] == ["--no-skip-zero-rows", "--no-fused-adamw"]
    assert two["without fused AdamW"] == ["--no-fused-adamw"] and two["default + bf16 autocast"] == ["--bf16"]
    assert list(bench.variants("0-vision", with_candidates=False)) == ["default (all on)", "baseline (all off)"]
    results = [bench.Result("1", name, flags, [(t, 2 * t, 10.0)] * 3)
               for name, flags, t in (("default (all on)", [], 0.5), ("baseline (all off)", ["x"], 1.0))]
    text = bench.table(results, {"1": 300})
    assert "| stage 1 | default (all on) | 0.500 | 1.000 | 20  | 2.00x / 2.00x | 1.00x / 1.00x | 2.5 min (300 steps) |" in text
    bench.write(tmp_path / "out", text, {"results": [{"steps": results[0].steps}]})
    assert (tmp_path / "out" / "train-bench.md").read_text() == text
    assert json.loads((tmp_path / "out" / "train-bench.json").read_text())["results"][0]["steps"] == [[0.5, 1.0, 10.0]] * 3
    with pytest.raises(SystemExit):
        bench.main(["--stages", "3"])
    with pytest.raises(SystemExit):
        bench.main(["--data", str(tmp_path), "--out", str(tmp_path / "o")])  # no stage2.json there
    cmd = bench.command("2", bench.Paths(tmp_path, tmp_path, stage1=tmp_path / "s1"), tmp_path / "o", 5, 1)
    assert cmd[1:5] == ["-m", "training", "--stage", "2"] and cmd[-2:] == ["--threads", "1"] and "5" in cmd

# --- the report through tuning: a recorded bench-1b run plus a fake tuning record, no measuring -----------


def _results_with_tuning(auto_ttft_factor: float | None) -> dict:
    """benchmarks/results-bench-1b.json with a fake tuning record and, unless None, the combo again as the automatic
    measured choice with its TTFTs scaled by auto_ttft_factor."""
    import copy

    from runtimes.tune import choose, format_table
    from tests.test_tune import _table, _with_ubatches

    results = json.loads(RECORDED_RUN.read_text())
    results.pop("analysis", None)
    results["jobs"] = [j for j in results["jobs"] if not j.get("tuned")]  # the recorded run's own automatic row
    table = _with_ubatches(_table(), {("q4_k_m", False): {128: 130.0, 512: 110.0}})
    pick = choose(table)
    results["tuning"] = {"how": "measured now (fake)", "prefer": "latency", "table": table, "text": format_table(table),
                         "pick": {"vision": {"precision": "int8"}, "llm": {"precision": "q4_k_m"}},
                         "vision_reason": pick.vision_reason, "llm_reason": pick.llm_reason}
    if auto_ttft_factor is not None:
        auto = copy.deepcopy(next(j for j in results["jobs"] if j["kind"] == "combo"))
        auto.update(label="automatic (onnxruntime:int8+llama.cpp:q4_k_m, measured settings)", tuned=True)
        for run in auto["pipeline"]["timed"]:
            run["ttft_ms"] *= auto_ttft_factor
        results["jobs"].append(auto)
    return results


def _target(analysis: dict, tid: str) -> dict:
    return next(t for t in analysis["targets"] if t["id"] == tid)


def test_report_shows_the_tuning_table_the_choice_and_the_automatic_row():
    from benchmarks.analysis import analyze
    from benchmarks.report import render_markdown

    results = _results_with_tuning(0.5)
    analysis = analyze(results)
    report = render_markdown(results, analysis)
    section = report.split("## Automatic choice (measured selection, `runtimes.tune`)")[1].split("\n## ")[0]
    assert "Tuning table: measured now (fake)" in section
    assert results["tuning"]["llm_reason"] in section and "n_ubatch 128" in section
    assert "llm micro-batch (prefill of 576 image rows" in section  # the table itself, as `sqllava-edge tune` prints it
    rows = [line for line in section.splitlines() if line.startswith("| ") and "TTFT" not in line]
    assert rows[0].startswith("| automatic (onnxruntime:int8+llama.cpp:q4_k_m, measured settings) |")
    rule = next(c["label"] for c in analysis["combos"] if not c["tuned"])
    rule_row = next(line for line in rows if line.startswith(f"| {rule} |"))
    assert rows[0].split("|")[3].strip() == "1.00" and float(rule_row.split("|")[3]) == pytest.approx(2.0, abs=0.01)
    fastest = _target(analysis, "auto_is_fastest")
    assert fastest["met"] is True and fastest["measured"] == pytest.approx(1.0)
    ttft = _target(analysis, "ttft_ratio")  # judged on the automatic choice, not on the fastest end-to-end row
    assert ttft["detail"].startswith("automatic (") and ttft["target"] == "<= 0.5"
    assert _target(analysis, "e2e_speedup")["target"] == ">= 2.5"
    assert _target(analysis, "vision_speedup")["target"] == ">= 3"
    assert _target(analysis, "vision_fp32_speedup")["target"] == ">= 1"


def test_report_says_when_the_automatic_choice_is_not_the_fastest_or_not_measured():
    from benchmarks.analysis import analyze
    from benchmarks.report import render_markdown

    slower = analyze(_results_with_tuning(2.0))
    assert _target(slower, "auto_is_fastest")["met"] is False
    assert _target(slower, "auto_is_fastest")["measured"] == pytest.approx(2.0, rel=0.01)
    results = _results_with_tuning(None)
    results["tuning"] = {"skipped": "--no-tune or $SQLLAVA_EDGE_TUNE=0"}
    analysis = analyze(results)
    assert _target(analysis, "auto_is_fastest")["met"] is None
    assert "Not measured: --no-tune or $SQLLAVA_EDGE_TUNE=0." in render_markdown(results, analysis)


def test_chunked_prefill_benchmark_runs_every_setting_and_reports_ratios_to_off(tiny_bundle, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "chunked"
    cmd = [sys.executable, "-m", "benchmarks.chunked", "--bundle", str(tiny_bundle), "--chunks", "0,16", "--rounds",
           "2", "--new-tokens", "12", "--threads", "1", "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((out / "chunked.json").read_text())
    assert sorted((s["round"], s["chunk"]) for s in data["samples"]) == [(0, 0), (0, 16), (1, 0), (1, 16)]
    for s in data["samples"]:
        assert s["a_tokens"] >= 6 and 0 < s["b_prefill_s"] <= s["b_ttft_s"] and s["a_gap_median_s"] > 0
    text = (out / "chunked.md").read_text()
    assert "| 0 (off) | 2 |" in text and "| 16 | 2 |" in text and (out / "chunked.png").stat().st_size > 1000


def test_chunked_prefill_report_compares_to_the_unchunked_runs():
    from benchmarks.chunked import render, summary

    def sample(chunk, stall, ttft, r):
        return {"chunk": chunk, "round": r, "a_tokens": 64, "a_stall_s": stall, "a_gap_median_s": 0.04,
                "b_ttft_s": ttft, "b_prefill_s": ttft - 0.1, "a_done_before_b": False}

    result = {"bundle": "b", "threads": 2, "rounds": 2, "new_tokens": 64, "chunks": [0, 256], "backends": "x",
              "samples": [sample(0, 3.0, 3.0, 0), sample(0, 4.0, 4.0, 1), sample(256, 1.0, 3.5, 0),
                          sample(256, 1.4, 3.5, 1)]}
    rows = {r["chunk"]: r for r in summary(result)}
    assert rows[0]["a_stall_s"] == 3.5 and rows[256]["a_stall_s"] == 1.2
    text = render(result)
    assert "| 256 | 2 | 1.20 s (0.34x) | 40 ms | 3.50 s (1.00x) |" in text
