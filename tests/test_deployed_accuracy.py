"""Deployed accuracy: the held-out evaluation of a bundle through Assistant (training.evaluate), the fidelity every
artifact records at export (export/fidelity.py) and `sqllava-edge inspect` showing it. On the random tiny bundle the
numbers are noise; the shapes and the plumbing are what is checked."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sqllava_edge.bundle import read_manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory) -> Path:
    """A tiny held-out set of the synthetic task: 3 images with every question (training.synthetic, no torch)."""
    out = tmp_path_factory.mktemp("synthetic") / "data"
    subprocess.run([sys.executable, "-m", "training.synthetic", str(out), "--n-train", "2", "--n-eval", "3",
                    "--seed", "0"], cwd=ROOT, check=True, capture_output=True, text=True)
    return out / "eval.json"


def test_fidelity_is_recorded_at_export(tiny_bundle):
    manifest = read_manifest(tiny_bundle, verify=False)
    vision, gguf = manifest.find("vision_onnx", "fp32"), manifest.find("llm_gguf", "f32")
    for artifact in (vision, gguf):
        record = artifact.validation["fidelity"]
        assert record["positions"] > record["pairs"] >= 1  # every answer token of every pair, + EOS
        assert record["kl_mean"] >= 0 and 0 <= record["top1_agreement"] <= 1
        assert "validation text" in record["calibration"]  # the test checkpoint has no training data beside it
    assert -1 <= vision.validation["fidelity"]["cosine_min"] <= vision.validation["fidelity"]["cosine_mean"] <= 1
    record = gguf.validation["fidelity"]
    # f32 GGUF with fp32 image tokens is PyTorch's arithmetic: no loss to speak of
    assert record["kl_mean"] < 1e-3 and record["top1_agreement"] >= 0.99
    assert set(record["with_vision"]) == {"fp32"}
    assert record["end_to_end"]["vision"] == "fp32" and record["end_to_end"]["answers"] == record["pairs"]
    assert record["end_to_end"]["greedy_agreement"] == 1  # fp32 vision + f32 GGUF: PyTorch's tokens exactly


def test_inspect_shows_the_fidelity(tiny_bundle):
    done = subprocess.run([sys.executable, "-m", "sqllava_edge.cli", "inspect", str(tiny_bundle), "--no-verify"],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.count("fidelity vs fp32: KL ") == 2
    assert "with vision fp32: KL" in done.stdout and "greedy answers identical to fp32 PyTorch" in done.stdout


def test_kl_and_top1_of_known_distributions():
    from export.fidelity import compare

    ref = np.log(np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]))
    same = compare(ref, ref)
    assert same["kl_mean"] == pytest.approx(0.0, abs=1e-12) and same["top1_agreement"] == 1.0
    other = compare(ref, np.log(np.array([[0.2, 0.7, 0.1], [0.4, 0.35, 0.25]])))
    kl = 0.7 * np.log(0.7 / 0.2) + 0.2 * np.log(0.2 / 0.7)
    assert other["kl_mean"] == pytest.approx(kl / 2) and other["top1_agreement"] == 0.5
    assert other["confident_positions"] == 1 and other["top1_confident"] == 0.0  # the flip is where fp32 was sure


def test_bundle_evaluation_of_every_combination(tiny_bundle, eval_data, tmp_path, capsys):
    from training import evaluate

    out = tmp_path / "report.json"
    report = evaluate.main([str(tiny_bundle), "--data", str(eval_data), "--all", "--max-images", "2", "--sq-images",
                            "2", "--sq-per-image", "3", "--max-answer-tokens", "4", "--max-question-tokens", "8",
                            "--threads", "1", "--no-progress", "--out", str(out)])
    rows = json.loads(eval_data.read_text())
    questions = sum(len(r["meta"]["types"]) for r in rows[:2])
    (combo,) = report["combinations"]  # the tiny bundle holds one vision ONNX and one GGUF
    assert (combo["vision"], combo["llm"]) == ("fp32", "f32")
    assert combo["qa"]["questions"] == questions and 0 <= combo["qa"]["accuracy"] <= 1
    assert sum(t["n"] for t in combo["qa"]["per_type"].values()) == questions
    sq = combo["self_questioning"]
    assert sq["questions"] == 6 and 0 <= sq["grounded_rate"] <= sq["well_formed_rate"] <= 1
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert "QA exact match" in capsys.readouterr().out


def test_batched_answers_are_the_questions_answered_one_by_one(tiny_bundle, eval_data):
    """Several images' questions go through the engine together; each answer belongs to its own question."""
    from sqllava_edge.assistant import Assistant
    from training.evaluate import BundleEvaluator

    asked = []
    for row in json.loads(eval_data.read_text())[:2]:
        questions = [t["value"].replace("<image>", "").strip() for t in row["conversations"][0::2]][:3]
        asked.append((eval_data.parent / "images" / row["image"], questions))
    ev = BundleEvaluator(tiny_bundle, "fp32", "f32", n_threads=1, sequences=4)  # 6 questions: batches of 4 and 2
    try:
        batched = ev.answers_many(asked, 4)
        counters = ev.assistant.counters.snapshot()
    finally:
        ev.close()
    assert [len(a) for a in batched] == [3, 3] and counters["vision_encodes"] == 2
    assert counters["decode_steps"] < counters["decode_tokens"]  # several sequences per decode step
    with Assistant.load(tiny_bundle, vision_precision="fp32", llm_precision="f32", n_threads=1) as one:
        single = [[one.ask(image, q, max_new_tokens=4) for q in questions] for image, questions in asked]
    assert batched == single


def test_checkpoint_evaluation_answers_as_the_plain_pytorch_loop(tiny_bundle, eval_data):
    """A training checkpoint is evaluated on the torch backends through Assistant's engine (batched), and each answer
    is the one the plain PyTorch loop (tests/reference.py) gives for its question alone."""
    import torch

    from sqllava_edge.checkpoint import load_checkpoint
    from sqllava_edge.conversation import answer_prompt
    from sqllava_edge.generation import TASK_DEFAULTS
    from sqllava_edge.image import preprocess
    from tests.reference import generate
    from training.evaluate import Evaluator

    row = json.loads(eval_data.read_text())[0]
    image = eval_data.parent / "images" / row["image"]
    questions = [t["value"].replace("<image>", "").strip() for t in row["conversations"][0::2]][:3]
    ev = Evaluator(str(tiny_bundle.parent / "ckpt"), sequences=4)
    try:
        (batched,) = ev.answers_many([(image, questions)], 6)
        counters = ev.assistant.counters.snapshot()
    finally:
        ev.close()
    assert ev.assistant.llm.name == "torch" and counters["decode_steps"] < counters["decode_tokens"]
    model, tok = load_checkpoint(tiny_bundle.parent / "ckpt", merge_lora=True)
    pixels = torch.from_numpy(preprocess(image, model.config.vision, model.config.image_aspect_ratio))[None]
    config = TASK_DEFAULTS["answer"].replace(max_new_tokens=6)
    alone = [tok.decode(generate(model, answer_prompt(tok, q, model.config.template), config, pixel_values=pixels)).strip()
             for q in questions]
    assert batched == alone


def test_checkpoint_options_are_refused_for_the_wrong_kind(tiny_bundle, eval_data):
    from training import evaluate

    with pytest.raises(SystemExit, match="leave out"):
        evaluate.main([str(tiny_bundle), "--data", str(eval_data), "--all", "--llm-precision", "f32"])


def test_benchmark_report_plots_speed_against_quality(tmp_path):
    pytest.importorskip("matplotlib", reason="the charts need matplotlib (pip install '.[dev]')")
    from benchmarks.report import quality_section, render_quality_chart

    points = [{"vision": "int8", "llm": "q4_k_m", "kl_mean": 0.21, "top1_agreement": 0.9, "first_answer_s": 0.10,
               "within_floor": False, "automatic": False},
              {"vision": "int8", "llm": "q8_0", "kl_mean": 0.004, "top1_agreement": 0.99, "first_answer_s": 0.15,
               "within_floor": True, "automatic": True},
              {"vision": "fp32", "llm": "f16", "kl_mean": None, "top1_agreement": None, "first_answer_s": None,
               "within_floor": True, "automatic": False}]
    results = {"preset": "tiny", "bundle": "b", "tuning": {"quality_points": points, "floor": "KL <= 0.05 nats"}}
    lines = quality_section(results)
    rows = [l for l in lines if l.startswith("| int8") or l.startswith("| fp32")]
    assert rows[0] == "| int8 | q4_k_m | 0.100 | 0.2100 | 90.0% | no |  |"
    assert rows[1].endswith("| yes | automatic choice |") and rows[2].startswith("| fp32 | f16 | - | - | - |")
    render_quality_chart(results, tmp_path / "quality.png")
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
