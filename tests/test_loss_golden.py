"""The training losses do not move when the training code is reorganised: the first 20 losses of stage 0 (the demo's
stage-0 flags), stage 1 and stage 2 on the tiny preset, small data, fixed seeds and one thread, compared EXACTLY
(float equality of the logged values) with tests/golden/training_losses.json.

That file was recorded before the loss was gathered into training/loss.py. A deliberate change of the loss, the
data order or an initialisation rewrites it: SQLLAVA_WRITE_GOLDEN=1 python -m pytest tests/test_loss_golden.py
(and say in the commit why the numbers moved).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden" / "training_losses.json"
STEPS = 20


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from sqllava_edge.vocab import vocab_dir
    from training.synthetic import build

    try:
        vocab_dir()
    except RuntimeError as err:
        pytest.skip(f"the Llama-2 vocabulary needs PyPI access once (pip download of llama-cpp-python): {err}")
    out = tmp_path_factory.mktemp("golden") / "data"
    build(out, n_train=12, n_eval=2, seed=4, image_size=112, max_turns=4)
    return out


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def _stage0(data: Path, out: Path) -> list[float]:
    from training.pretrain_llm import main

    main(["--data", str(data / "stage2.json"), "--caption-data", str(data / "stage1.json"), "--scenes", "--scene-facts",
          "--bind-attention", "1:0,2:0", "--preset", "tiny", "--out", str(out), "--max-steps", str(STEPS),
          "--batch-size", "2", "--seed", "0", "--threads", "1", "--no-progress"])
    return _losses(out)


def _stage(stage: int, data: Path, out: Path, **kw) -> list[float]:
    from training.train import TrainConfig, train

    name = "stage1.json" if stage == 1 else "stage2.json"
    train(TrainConfig(stage=stage, data=str(data / name), out=str(out), batch_size=2, max_steps=STEPS, threads=1,
                      progress=False, seed=5, **kw))
    return _losses(out)


@pytest.fixture(scope="module")
def losses(data, tmp_path_factory) -> dict[str, list[float]]:
    runs = tmp_path_factory.mktemp("golden-runs")
    out = {"stage0": _stage0(data, runs / "s0"), "stage1": _stage(1, data, runs / "s1", lr=5e-3)}
    out["stage2"] = _stage(2, data, runs / "s2", init=str(runs / "s1"))
    if os.environ.get("SQLLAVA_WRITE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(out, indent=1) + "\n")
    return out


@pytest.mark.parametrize("stage", ["stage0", "stage1", "stage2"])
def test_first_losses_equal_the_golden_record(losses, stage):
    golden = json.loads(GOLDEN.read_text())[stage]
    assert len(golden) == STEPS and len(set(golden)) > 1
    assert losses[stage] == golden  # exact: the same float operations in the same order
