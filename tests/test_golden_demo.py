"""Golden outputs of a trained demo bundle: greedy answers, seeded self-questions and an interview about held-out
images, compared exactly with tests/golden/demo_bundle.json.

A trained bundle is not part of the suite (`make demo` takes 20 minutes), and training on another CPU can give other
weights, so this runs only on the bundle it was recorded from:

    SQLLAVA_EDGE_GOLDEN_DEMO_BUNDLE=demo_out/bundle python -m pytest tests/test_golden_demo.py

and skips, saying so, for any other (the manifest's source checkpoint hash tells them apart). Record anew with
SQLLAVA_EDGE_RECORD_GOLDEN=1 and the same variable (and say in the commit why the outputs moved).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.test_golden_outputs import _differences

GOLDEN = Path(__file__).resolve().parent / "golden" / "demo_bundle.json"
RECORD = bool(os.environ.get("SQLLAVA_EDGE_RECORD_GOLDEN"))
BUNDLE = os.environ.get("SQLLAVA_EDGE_GOLDEN_DEMO_BUNDLE")
IMAGES = 3  # held-out images asked about
QUESTIONS = 3  # of each image's questions


@pytest.fixture(scope="module")
def bundle() -> Path:
    if not BUNDLE:
        pytest.skip("no trained demo bundle given: set SQLLAVA_EDGE_GOLDEN_DEMO_BUNDLE=demo_out/bundle after make demo")
    return Path(BUNDLE)


def _source(bundle: Path) -> str:
    return json.loads((bundle / "manifest.json").read_text())["provenance"]["source_sha256"]


def _outputs(bundle: Path) -> dict:
    from sqllava_edge.assistant import Assistant

    rows = json.loads((bundle.parent / "data" / "eval.json").read_text())[:IMAGES]
    out = {}
    with Assistant.load(bundle, vision_precision="fp32", llm_precision="f16", n_threads=1, tune=False) as assistant:
        for row in rows:
            image = bundle.parent / "data" / "images" / row["image"]
            questions = [t["value"].replace("<image>", "").strip() for t in row["conversations"][0::2]][:QUESTIONS]
            asked = assistant.self_question(image, n=3, seed=0, max_new_tokens=48)
            out[row["image"]] = {
                "answers": {q: assistant.ask(image, q, max_new_tokens=16) for q in questions},
                "description": asked.description,
                "self_questions": asked.questions,
                "interview": [[e.question, e.answer] for e in
                              assistant.interview(image, n=2, seed=1, max_answer_tokens=16, max_new_tokens=48)],
            }
    return out


def test_demo_bundle_outputs_equal_the_golden_record(bundle):
    source = _source(bundle)
    got = {"source_sha256": source, "outputs": _outputs(bundle)} if RECORD or GOLDEN.is_file() else None
    if RECORD:
        from sqllava_edge.fileutil import atomic_write

        with atomic_write(GOLDEN, "w") as handle:
            json.dump(got, handle, indent=1, ensure_ascii=False, sort_keys=True)
            handle.write("\n")
        return
    golden = json.loads(GOLDEN.read_text())
    if golden["source_sha256"] != source:
        pytest.skip(f"{bundle} was exported from another checkpoint ({source[:12]}) than the recorded one "
                    f"({golden['source_sha256'][:12]}): its outputs are its own")
    differences = _differences(golden["outputs"], got["outputs"], "outputs")
    assert not differences, "the demo bundle's outputs moved from the golden record:\n  " + "\n  ".join(differences)
