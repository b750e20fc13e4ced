"""Measured backend selection (runtimes.tune): choice on fake timing tables, the cache and its schema, a
crashing probe, and one real tune of the tiny bundle. Nothing timed is asserted."""
from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest

from runtimes import tune


def _table(**changes) -> dict:
    """A fake table: vision fp32 / int8; q8_0 (repacking on crashes), q4_k_m (both), f16 (both)."""
    def llm(precision, size, extra, runs=(), error=None):
        return {"precision": precision, "bytes": size, "extra_buffers": extra, "ok": error is None, "error": error,
                "runs": [{"n_threads": t, "prefill_tok_s": p, "decode_tok_s": d} for t, p, d in runs],
                "ubatch_runs": []}

    table = {
        "schema": tune.SCHEMA, "machine": {"cpu": "Fake CPU", "flags_sha256": "0" * 16, "cores": 2},
        "software": {"python": "3", "sqllava-edge": "0.1.0"}, "bundle": "b" * 64, "created": "2026-12-03T00:00:00Z",
        "probe": {"image_tokens": 576, "rows": 128, "question": 16, "decode": 4, "threads": [1, 2]},
        "vision": [
            {"precision": "fp32", "bytes": 1200, "ok": True, "error": None,
             "runs": [{"n_threads": 1, "encode_s": 0.9}, {"n_threads": 2, "encode_s": 0.5}]},
            {"precision": "int8", "bytes": 300, "ok": True, "error": None,
             "runs": [{"n_threads": 1, "encode_s": 0.6}, {"n_threads": 2, "encode_s": 0.3}]},
        ],
        "llm": [
            llm("q8_0", 800, True, error="the probe crashed with SIGILL"),
            llm("q8_0", 800, False, [(1, 30.0, 20.0), (2, 45.0, 30.0)]),
            # q4_k_m repacking off: prefill best on 2 threads, decode best on 1 (memory-bound, less contention)
            llm("q4_k_m", 500, False, [(1, 70.0, 25.0), (2, 120.0, 22.0)]),
            llm("q4_k_m", 500, True, [(1, 60.0, 26.0), (2, 80.0, 24.0)]),
            llm("f16", 1500, False, [(1, 40.0, 12.0), (2, 56.0, 40.0)]),
        ],
    }
    table.update(changes)
    return table


def test_latency_picks_lowest_first_answer_and_combines_thread_counts():
    pick = tune.choose(_table(), "latency")
    assert (pick.vision.precision, pick.vision.n_threads) == ("int8", 2)
    llm = pick.llm
    assert (llm.precision, llm.extra_buffers) == ("q4_k_m", False)
    assert (llm.n_threads_batch, llm.n_threads) == (2, 1)  # best prefill on 2 threads, best decode on 1
    assert "measured (latency)" in pick.llm_reason and "prefill 120 tok/s" in pick.llm_reason
    assert "q8_0 repacking on: the probe crashed with SIGILL" in pick.llm_reason


def _with_ubatches(table: dict, rates: dict) -> dict:
    """rates: (precision, repacking) -> {n_ubatch: full-length prefill tok/s} (measured on 2 threads)."""
    table["probe"].update(ubatches=sorted({u for r in rates.values() for u in r}), ubatch_rows=576)
    for row in table["llm"]:
        for n_ubatch, tok_s in rates.get((row["precision"], row["extra_buffers"]), {}).items():
            row["ubatch_runs"].append({"n_ubatch": n_ubatch, "n_threads": 2, "prefill_tok_s": tok_s})
    return table


def test_latency_picks_the_fastest_micro_batch_and_uses_its_full_length_rate():
    table = _with_ubatches(_table(), {("q4_k_m", False): {64: 100.0, 128: 130.0, 256: 125.0, 512: 110.0},
                                      ("q4_k_m", True): {64: 90.0, 128: 95.0, 256: 94.0, 512: 80.0}})
    pick = tune.choose(table, "latency")
    assert (pick.llm.precision, pick.llm.extra_buffers, pick.llm.n_ubatch) == ("q4_k_m", False, 128)
    assert pick.llm.prefill_tok_s == 130.0  # the full-length rate of that micro-batch, not the short probe's 120
    assert "n_ubatch 128" in pick.llm_reason
    expected = 0.3 + (576 + 16) / 130.0 + 1 / 25.0  # vision int8 + prefill + one decode step
    assert tune.first_answer_s(table, pick.vision, pick.llm) == pytest.approx(expected)


def test_a_micro_batch_can_change_which_option_wins():
    # repacking on prefills slower at the default micro-batch but fastest of all at 64 rows per graph run
    table = _with_ubatches(_table(), {("q4_k_m", False): {128: 130.0, 512: 110.0},
                                      ("q4_k_m", True): {64: 200.0, 512: 80.0}})
    pick = tune.choose(table, "latency")
    assert (pick.llm.extra_buffers, pick.llm.n_ubatch, pick.llm.n_threads_batch) == (True, 64, 2)
    assert pick.llm.n_threads == 1  # decode is still best on 1 thread (26 tok/s)


def test_without_micro_batch_runs_the_pick_keeps_n_batch():
    pick = tune.choose(_table(), "latency")
    assert pick.llm.n_ubatch is None and pick.llm.prefill_tok_s == 120.0


def test_throughput_and_memory_objectives():
    assert tune.choose(_table(), "throughput").llm.precision == "f16"  # 40 decode tok/s
    memory = tune.choose(_table(), "memory")
    assert memory.llm.precision == "q4_k_m" and memory.vision.precision == "int8"
    with pytest.raises(ValueError, match="latency, throughput, memory"):
        tune.choose(_table(), "speed")


def test_allowed_drops_ggufs_that_would_not_fit():
    pick = tune.choose(_table(), "latency", allowed=lambda precision: precision not in ("q4_k_m", "f16"))
    assert pick.llm.precision == "q8_0" and not pick.llm.extra_buffers  # the crashing repacked q8_0 is never picked


def test_every_probe_failed_gives_no_pick_with_the_errors():
    table = _table()
    for row in table["llm"]:
        row.update(ok=False, error="timed out after 5 s", runs=[])
    pick = tune.choose(table)
    assert pick.llm is None and "no GGUF option was measured to work" in pick.llm_reason
    assert "timed out after 5 s" in pick.llm_reason
    assert pick.vision is not None


def test_child_crash_and_hang_become_unusable_options():
    crash = tune.run_child([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"], 60)
    assert crash == {"ok": False, "error": "the probe crashed with SIGILL"}
    hang = tune.run_child([sys.executable, "-c", "import time; time.sleep(60)"], 1)
    assert hang == {"ok": False, "error": "timed out after 1 s"}
    failed = tune.run_child([sys.executable, "-c", "raise SystemExit('no GGUF here')"], 60)
    assert not failed["ok"] and "no GGUF here" in failed["error"]
    ok = tune.run_child([sys.executable, "-c", "print('noise'); print('{\"runs\": []}')"], 60)
    assert ok == {"ok": True, "runs": []}


class _Artifact:
    def __init__(self, kind, precision, size):
        self.kind, self.precision, self.size, self.path = kind, precision, size, f"{kind}.{precision}"
        self.sha256 = {self.path: precision * 8}


class _Source:
    """Enough of runtimes.model_source.ModelSource for tune.measure."""

    def __init__(self):
        from types import SimpleNamespace

        self.artifacts = [_Artifact("vision_onnx", "fp32", 1000), _Artifact("llm_gguf", "q4_0", 400),
                          _Artifact("llm_gguf", "q8_0", 700)]
        self.manifest = SimpleNamespace(find_all=lambda kind: [a for a in self.artifacts if a.kind == kind])
        self.config = SimpleNamespace(num_image_tokens=576, vision=SimpleNamespace(image_size=336))

    def artifact_path(self, artifact):
        return f"/nowhere/{artifact.path}"


def _fake_probe(spec, timeout):
    if spec["kind"] == "vision":
        return {"ok": True, "runs": [{"n_threads": t, "encode_s": 0.1 * t} for t in spec["threads"]]}
    if spec["extra_buffers"] and spec["path"].endswith("q4_0"):
        return {"ok": False, "error": "the probe crashed with SIGILL"}
    return {"ok": True, "runs": [{"n_threads": t, "prefill_tok_s": 50.0 * t, "decode_tok_s": 10.0}
                                 for t in spec["threads"]],
            "ubatch_runs": [{"n_ubatch": u, "n_threads": max(spec["threads"]), "prefill_tok_s": 100.0 + (u == 256)}
                            for u in spec["ubatches"]]}


def test_measure_covers_every_option_and_its_table_follows_the_schema():
    table = tune.measure(_Source(), threads=[1, 2], probe=_fake_probe)
    assert tune.check_table(json.loads(json.dumps(table))) == table
    assert [(r["precision"], r["extra_buffers"], r["ok"]) for r in table["llm"]] == [
        ("q4_0", True, False), ("q4_0", False, True), ("q8_0", True, True), ("q8_0", False, True)]
    assert table["probe"]["rows"] == tune.PROBE_ROWS
    assert table["probe"]["ubatch_rows"] == 576 and table["probe"]["ubatches"] == list(tune.UBATCHES)
    n = len(tune.UBATCHES)
    assert [len(r["ubatch_runs"]) for r in table["llm"]] == [0, n, n, n]  # the crashed option has none
    pick = tune.choose(table)
    assert pick.llm.precision == "q4_0" and not pick.llm.extra_buffers  # smaller, same speed in the fake
    assert pick.llm.n_ubatch == 256


@pytest.mark.parametrize("breakage", [
    lambda t: t.pop("machine"),
    lambda t: t.update(schema=0),
    lambda t: t["llm"][1].pop("extra_buffers"),
    lambda t: t["vision"][0]["runs"][0].update(encode_s="fast"),
    lambda t: t["llm"][1].pop("ubatch_runs"),  # a schema-1 row
    lambda t: t["llm"][1]["ubatch_runs"].append({"n_ubatch": "64", "n_threads": 2, "prefill_tok_s": 1.0}),
])
def test_check_table_rejects_a_broken_table(breakage):
    table = _table()
    breakage(table)
    with pytest.raises(ValueError):
        tune.check_table(table)


def test_cache_round_trip_and_stale_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("SQLLAVA_EDGE_CACHE", str(tmp_path))
    table = _table()
    keys = {name: table[name] for name in ("machine", "software", "bundle")}
    assert tune.read_cached(keys)[0] is None
    path = tune.write_table(table)
    assert path.parent == tmp_path / "tune" and json.loads(path.read_text()) == table
    assert tune.read_cached(keys) == (table, "")
    newer = {**keys["software"], "llama-cpp-python": "9.9"}
    stale, why = tune.read_cached({**keys, "software": newer})
    assert stale is None and "another software" in why
    other_cpu = {**copy.deepcopy(keys), "machine": {**keys["machine"], "flags_sha256": "1" * 16}}
    assert tune.read_cached(other_cpu)[0] is None  # another machine: another file (a shared home keeps both)
    path.write_text(json.dumps({**table, "software": newer}))  # written by other software under the same name
    assert "another software" in tune.read_cached(keys)[1]
    path.write_text("{not json")
    assert tune.read_cached(keys)[0] is None


def test_cpu_busy_share_reads_proc_stat_deltas(tmp_path):
    stat = tmp_path / "stat"
    snapshots = iter(["cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\n",
                      "cpu  160 0 70 900 60 0 0 20 0 0\ncpu0 1 2 3\n"])  # +100 busy (20 of it steal), +110 idle
    stat.write_text(next(snapshots))
    share = tune.cpu_busy_share(1.0, stat, sleep=lambda s: stat.write_text(next(snapshots)))
    assert share == pytest.approx(100 / 210)
    assert tune.cpu_busy_share(0.0, tmp_path / "missing") is None  # not Linux: unknown, never "busy"
    stat.write_text("intr 1 2 3\n")
    assert tune.cpu_busy_share(0.0, stat) is None


def test_measure_records_how_busy_the_machine_was_and_warns(capsys):
    shares = iter([0.6, 0.1])  # before, after
    table = tune.measure(_Source(), threads=[1], probe=_fake_probe, busy_share=lambda: next(shares))
    assert table["busy_share"] == 0.6 and tune.measured_busy(table) == 0.6
    assert "other programs keep 60% of the CPUs busy" in capsys.readouterr().err
    assert "while other programs kept 60% of the CPUs busy" in tune.format_table(table)
    quiet = tune.measure(_Source(), threads=[1], probe=_fake_probe, busy_share=lambda: None)
    assert quiet["busy_share"] is None and tune.measured_busy(quiet) is None
    assert "other programs" not in capsys.readouterr().err
    assert tune.check_table(json.loads(json.dumps(table))) == table


@pytest.mark.parametrize("share", [1.5, -0.1, "busy", True])
def test_check_table_rejects_a_bad_busy_share(share):
    with pytest.raises(ValueError, match="busy_share"):
        tune.check_table(_table(busy_share=share))


@pytest.mark.parametrize("cached_share, now, measured_again", [
    (0.7, 0.05, True),  # measured under load, quiet now: measured again
    (0.7, 0.8, False),  # still as busy: the table describes the machine as it is
    (0.7, None, False),  # cannot tell: keep it
    (0.1, 0.0, False),  # measured quiet: kept (and the machine is not even sampled)
    (None, 0.0, False),  # an older table without the field: kept
])
def test_a_table_measured_under_load_is_measured_again_when_the_machine_is_quiet(tmp_path, monkeypatch, cached_share,
                                                                                  now, measured_again):
    monkeypatch.setenv("SQLLAVA_EDGE_CACHE", str(tmp_path))
    source = _Source()
    cached = {**_table(), **tune.table_keys(source), "busy_share": cached_share}
    tune.write_table(cached)
    sampled = []

    def busy_now(*args, **kwargs):
        sampled.append(1)
        return now

    fresh = {**cached, "busy_share": 0.0, "created": "2026-12-04T00:00:00Z"}
    monkeypatch.setattr(tune, "cpu_busy_share", busy_now)
    monkeypatch.setattr(tune, "measure", lambda *a, **k: fresh)
    table, how = tune.tuned_table(source)
    assert (table == fresh) is measured_again and (table == cached) is (not measured_again)
    if measured_again:
        assert "measured while other programs kept 70% of the CPUs busy; the machine is quiet now (5%)" in how
        assert json.loads(tune.cache_path(tune.table_keys(source)).read_text()) == fresh
    assert bool(sampled) is (cached_share == 0.7)


def test_tuning_switch(monkeypatch):
    monkeypatch.delenv(tune.TUNE_ENV, raising=False)
    assert tune.tuning_enabled() is True  # the default: measure on first load
    monkeypatch.setenv(tune.TUNE_ENV, "0")
    assert tune.tuning_enabled() is False and tune.tuning_enabled(True) is True
    monkeypatch.setenv(tune.TUNE_ENV, "1")
    assert tune.tuning_enabled(False) is False


# --- real: the tiny bundle ------------------------------------------------------------------------------------------


def test_tiny_bundle_load_tunes_once_then_uses_the_cache(tiny_bundle, tmp_path, monkeypatch):
    from sqllava_edge import Assistant

    monkeypatch.setenv("SQLLAVA_EDGE_CACHE", str(tmp_path))
    monkeypatch.setenv(tune.TUNE_ENV, "1")
    monkeypatch.setattr(tune, "thread_counts", lambda cores=None: [1])  # one count keeps the test cheap
    monkeypatch.setattr(tune, "cpu_busy_share", lambda *a, **k: 0.0)  # a busy CI host must not trigger a re-measure
    assistant = Assistant.load(tiny_bundle, device="cpu")
    try:
        backends = assistant.backends
        assert "measured (latency)" in backends.vision_reason and "measured (latency)" in backends.llm_reason
        assert "measured now" in backends.llm_reason and "n_threads_batch 1" in backends.llm_reason
        assert "weight repacking" in backends.llm_detail
    finally:
        assistant.close()
    files = list((tmp_path / "tune").glob("*.json"))
    assert len(files) == 1
    table = tune.check_table(json.loads(files[0].read_text()))
    assert {(r["precision"], r["extra_buffers"]) for r in table["llm"]} == {("f32", True), ("f32", False)}
    assert all(r["ok"] for r in table["llm"] + table["vision"]), table
    assert all([u["n_ubatch"] for u in r["ubatch_runs"]] == list(tune.UBATCHES) for r in table["llm"]), table
    n_ubatch = tune.choose(table).llm.n_ubatch
    assert f"n_ubatch {n_ubatch}" in backends.llm_reason and f"(micro-batch {n_ubatch})" in backends.llm_detail

    def no_measuring(*args, **kwargs):
        raise AssertionError("a matching cached table must not be measured again")

    monkeypatch.setattr(tune, "measure", no_measuring)
    again = Assistant.load(tiny_bundle, device="cpu", prefer="memory")
    try:
        assert "measured (memory)" in again.backends.llm_reason and "tuning table measured" in again.backends.llm_reason
    finally:
        again.close()
    explicit = Assistant.load(tiny_bundle, device="cpu", llm_precision="f32")
    try:
        assert "measured selection skipped: llm_precision given explicitly" in explicit.backends.llm_reason
    finally:
        explicit.close()
    off = Assistant.load(tiny_bundle, device="cpu", tune=False)
    try:
        assert "measured selection off" in off.backends.llm_reason
    finally:
        off.close()


def test_tune_command_prints_the_table_and_the_choice(tiny_bundle, tmp_path, monkeypatch, capsys):
    from sqllava_edge.cli import main

    monkeypatch.setenv("SQLLAVA_EDGE_CACHE", str(tmp_path))
    monkeypatch.setattr(tune, "thread_counts", lambda cores=None: [1])
    assert main(["tune", str(tiny_bundle)]) == 0
    out = capsys.readouterr().out
    assert "llm         repack  threads" in out and "choice for prefer=latency" in out
    assert main(["tune", str(tiny_bundle), "--json"]) == 0
    assert tune.check_table(json.loads(capsys.readouterr().out))["llm"]


def test_every_llm_probe_crashing_falls_back_to_the_rule_based_choice(tiny_bundle, tmp_path, monkeypatch):
    from sqllava_edge import Assistant

    def crashing_llm(spec, timeout):
        if spec["kind"] == "llm":
            return {"ok": False, "error": "the probe crashed with SIGILL"}
        return {"ok": True, "runs": [{"n_threads": 1, "encode_s": 0.01}]}

    monkeypatch.setenv("SQLLAVA_EDGE_CACHE", str(tmp_path))
    monkeypatch.setattr(tune, "run_probe", crashing_llm)
    assistant = Assistant.load(tiny_bundle, device="cpu", tune=True)
    try:
        reason = assistant.backends.llm_reason
        assert "no GGUF option was measured to work" in reason and "rule-based order" in reason
        assert "f32 repacking on: the probe crashed with SIGILL" in reason
        assert "measured (latency): fp32" in assistant.backends.vision_reason
        assert assistant.ask(np.zeros((32, 32, 3), np.uint8), "What is it?", max_new_tokens=2) is not None
    finally:
        assistant.close()


def test_measuring_says_where_it_is_on_stderr(tiny_bundle, capsys):
    """A first load on a big bundle measures for minutes: every probe announces itself (n/total, what, how to skip)."""
    from runtimes.model_source import ModelSource

    source = ModelSource.open(tiny_bundle, verify=False)
    tune.measure(source, threads=[1], probe=lambda spec, timeout: {"ok": False, "error": "fake"},
                 busy_share=lambda: 0.0)  # a busy host adds its warning line; that line has its own test
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[tune]")]
    n = len(source.manifest.find_all("vision_onnx")) + 2 * len(source.manifest.find_all("llm_gguf"))
    assert len(lines) == n and lines[0].startswith(f"[tune] 1/{n} vision") and "SQLLAVA_EDGE_TUNE=0" in lines[-1]
