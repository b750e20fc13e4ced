"""The quality floor of the automatic choice (runtimes.quality): an artifact whose recorded fidelity is below it is
never chosen, by the rule-based order or by measured selection, and the reason says so; an explicit precision still
loads; 'off' lifts it."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from runtimes import quality, select, tune
from runtimes.devices import DeviceInfo
from runtimes.model_source import ModelSource
from runtimes.select import choose_llm, choose_vision
from sqllava_edge.bundle import Artifact, Manifest, preprocessing_for, read_manifest, write_manifest
from sqllava_edge.config import get_preset

CPU = DeviceInfo("cpu", "test", 16 * 2**30, cpu_flags=frozenset({"avx512_vnni"}))


def _fidelity(kl: float, top1: float = 1.0, confident: float | None = None) -> dict:
    return {"fidelity": {"pairs": 4, "positions": 40, "kl_mean": kl, "kl_max": kl * 3, "top1_agreement": top1,
                         "confident_positions": 30, "top1_confident": top1 if confident is None else confident}}


def _artifact(kind: str, precision: str, validation: dict | None = None) -> Artifact:
    path = f"{kind}/{precision}"
    return Artifact(kind, path, [path], precision, 100, {path: "0" * 64}, validation or {})


def _source(*artifacts: Artifact, floor=quality.DEFAULT_FLOOR) -> ModelSource:
    config = get_preset("tiny")
    manifest = Manifest(config.to_dict(), config.template, preprocessing_for(config),
                        {"bos": 1, "eos": 2, "pad": 0, "unk": 0}, config.num_image_tokens, config.llm.hidden_size,
                        list(artifacts))
    return ModelSource(Path("/bundle"), config, manifest, quality_floor=floor)


GGUFS = [_artifact("llm_gguf", "f16", _fidelity(0.0004)), _artifact("llm_gguf", "q8_0", _fidelity(0.003, 0.995)),
         _artifact("llm_gguf", "q4_k_m", _fidelity(0.21, 0.90))]


def test_floor_values():
    assert quality.resolve_floor(None) == quality.DEFAULT_FLOOR == quality.QualityFloor(0.05, 0.97)
    assert quality.resolve_floor(0.5) == quality.QualityFloor(0.5, 0.97)
    assert quality.resolve_floor("0.1").max_kl == 0.1
    assert quality.resolve_floor("off") == quality.resolve_floor(float("inf")) == quality.NO_FLOOR
    for bad in (-1, "much", True):
        with pytest.raises(ValueError, match="max_quality_loss"):
            quality.resolve_floor(bad)


def test_verdicts_name_the_numbers_and_the_floor():
    verdicts = quality.judge(_source(*GGUFS).manifest, "llm_gguf", quality.DEFAULT_FLOOR)
    assert [v.kept for v in verdicts.values()] == [True, True, False]
    why = verdicts["q4_k_m"].why
    assert "below the quality floor" in why and "KL 0.2100 nats > 0.05" in why and "confident top-1 90.0% < 97%" in why
    assert "within the floor (KL <= 0.05 nats and top-1 >= 97%)" in verdicts["q8_0"].why


def test_top1_counts_only_where_fp32_is_confident():
    # a near-tie flip is no quality loss: all-position top-1 70% but every confident position agrees -> kept
    ties = _artifact("llm_gguf", "q8_0", _fidelity(0.001, top1=0.70, confident=1.0))
    assert quality.judge(_source(ties).manifest, "llm_gguf", quality.DEFAULT_FLOOR)["q8_0"].kept


def test_rule_based_order_never_picks_an_artifact_below_the_floor(monkeypatch):
    pytest.importorskip("llama_cpp", reason="choose_llm checks llama-cpp-python first")
    monkeypatch.delenv(select.LLM_ENV, raising=False)
    # the CPU order prefers q8_0, then q4_k_m, then f16: without q8_0 the rule would take q4_k_m
    without_q8 = [GGUFS[0], GGUFS[2]]
    assert choose_llm(_source(*without_q8, floor=None), CPU).artifact.precision == "q4_k_m"
    choice = choose_llm(_source(*without_q8), CPU)
    assert choice.artifact.precision == "f16"
    assert choose_llm(_source(*without_q8), CPU, precision="q4_k_m").artifact.precision == "q4_k_m"  # explicit wins


def test_rule_based_vision_respects_the_floor(monkeypatch):
    pytest.importorskip("onnxruntime", reason="the onnxruntime choice needs onnxruntime")
    monkeypatch.delenv(select.VISION_ENV, raising=False)
    visions = [_artifact("vision_onnx", "fp32", _fidelity(0.0)), _artifact("vision_onnx", "int8", _fidelity(0.09))]
    assert choose_vision(_source(*visions, floor=None), CPU).artifact.precision == "int8"  # VNNI: int8 preferred
    choice = choose_vision(_source(*visions), CPU)
    assert choice.artifact.precision == "fp32" and "int8 below the quality floor" in choice.reason


def test_every_artifact_below_the_floor_keeps_the_most_faithful():
    bad = [_artifact("llm_gguf", "q4_0", _fidelity(0.4)), _artifact("llm_gguf", "q4_k_m", _fidelity(0.2))]
    verdicts = quality.judge(_source(*bad).manifest, "llm_gguf", quality.DEFAULT_FLOOR)
    assert not verdicts["q4_0"].kept and verdicts["q4_k_m"].kept
    assert "the most faithful is kept" in verdicts["q4_k_m"].why


def test_no_recorded_fidelity_is_kept_and_says_to_re_export():
    verdict = quality.judge(_source(_artifact("llm_gguf", "q4_0")).manifest, "llm_gguf", quality.DEFAULT_FLOOR)["q4_0"]
    assert verdict.kept and "re-export" in verdict.why


def _table() -> dict:
    """A tuning table where q4_k_m is by far the fastest GGUF."""
    def llm(precision, prefill, decode):
        return {"precision": precision, "bytes": 100, "extra_buffers": False, "ok": True, "error": None,
                "runs": [{"n_threads": 2, "prefill_tok_s": prefill, "decode_tok_s": decode}], "ubatch_runs": []}

    return {"schema": tune.SCHEMA, "machine": {}, "software": {}, "bundle": "b", "created": "2026-12-07T00:00:00Z",
            "probe": {"image_tokens": 64, "rows": 64, "question": 16, "decode": 4, "threads": [2]},
            "vision": [{"precision": "fp32", "bytes": 100, "ok": True, "error": None,
                        "runs": [{"n_threads": 2, "encode_s": 0.01}]}],
            "llm": [llm("f16", 100.0, 10.0), llm("q8_0", 200.0, 20.0), llm("q4_k_m", 900.0, 90.0)]}


def test_measured_choice_never_picks_an_artifact_below_the_floor():
    manifest = _source(*GGUFS).manifest
    assert tune.choose(_table(), "latency").llm.precision == "q4_k_m"  # speed alone
    pick = tune.choose(_table(), "latency", allowed=quality.allowed(manifest, "llm_gguf", quality.DEFAULT_FLOOR))
    assert pick.llm.precision == "q8_0" and "q4_k_m" not in pick.llm_reason
    text = quality.describe(manifest, quality.DEFAULT_FLOOR, chosen={"llm_gguf": "q8_0"})
    line = next(l for l in text.splitlines() if "q4_k_m" in l)
    assert "dropped" in line and "KL 0.2100 nats > 0.05" in line


def _bundle_with_fake_q4(tiny_bundle: Path, folder: Path) -> Path:
    """The tiny bundle plus its f32 GGUF registered again as a 'q4_k_m' whose recorded fidelity is below the floor
    (the same weights: only the record decides)."""
    bundle = folder / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    manifest = read_manifest(bundle)
    f32 = manifest.find("llm_gguf", "f32")
    shutil.copy(bundle / f32.path, bundle / "llm" / "model.q4_k_m.gguf")
    fake = Artifact.from_files(bundle, "llm_gguf", "llm/model.q4_k_m.gguf", ["llm/model.q4_k_m.gguf"], "q4_k_m",
                               {**f32.validation, **_fidelity(0.3, 0.8)})
    manifest.add(fake)
    write_manifest(bundle, manifest)
    return bundle


def test_assistant_never_loads_the_q4_below_the_floor(tiny_bundle, tmp_path, monkeypatch):
    from sqllava_edge.assistant import Assistant

    bundle = _bundle_with_fake_q4(tiny_bundle, tmp_path)
    monkeypatch.delenv(select.LLM_ENV, raising=False)
    with Assistant.load(bundle, device="cpu", tune=False, n_threads=1) as a:  # rule order: q4_k_m before f32
        assert a.backends.llm_precision == "f32"
        q4 = next(l for l in a.backends.quality.splitlines() if "q4_k_m" in l)
        assert "dropped" in q4 and "below the quality floor" in q4 and "KL 0.3000 nats > 0.05" in q4
        assert "candidates (speed, quality vs fp32 PyTorch)" in str(a.backends)
    with Assistant.load(bundle, device="cpu", tune=False, n_threads=1, max_quality_loss="off") as a:
        assert a.backends.llm_precision == "q4_k_m"
    # measured selection: a cached tuning table in which the fake q4_k_m is fastest
    monkeypatch.setenv("SQLLAVA_EDGE_CACHE", str(tmp_path / "cache"))
    source = ModelSource.open(bundle)
    table = {**_table(), **tune.table_keys(source), "busy_share": None}
    table["vision"][0]["bytes"] = source.manifest.find("vision_onnx").size
    table["llm"] = [row for row in table["llm"] if row["precision"] == "q4_k_m"]
    table["llm"].append({**table["llm"][0], "precision": "f32", "runs": [{"n_threads": 2, "prefill_tok_s": 50.0,
                                                                          "decode_tok_s": 5.0}]})
    tune.write_table(table)
    with Assistant.load(bundle, device="cpu", tune=True) as a:
        assert a.backends.llm_precision == "f32" and "measured (latency)" in a.backends.llm_reason
        q4 = next(l for l in a.backends.quality.splitlines() if "q4_k_m" in l)
        assert "dropped" in q4 and "first answer ~" in q4 and "KL 0.3000" in q4
