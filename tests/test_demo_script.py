"""scripts/demo.py's step bookkeeping: a finished step is reused only while its inputs are unchanged, an interrupted
training step continues with its resume flag, and two demos cannot share one output folder."""
from __future__ import annotations

import fcntl
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _writer(out: Path, text: str) -> list[str]:
    """argv of a step that appends its argv tail to `out` (so a test sees every invocation)."""
    code = "import sys, pathlib; p = pathlib.Path(sys.argv[1]); p.open('a').write(' '.join(sys.argv[2:]) + '\\n')"
    return [sys.executable, "-c", code, str(out), text]


def test_step_is_reused_until_an_input_changes(demo, tmp_path):
    src, out, stamps = tmp_path / "input.txt", tmp_path / "out.txt", tmp_path / ".stamps"
    src.write_text("a")
    step = demo.Step("s", "a step", _writer(out, "run"), out, [src])
    assert demo.run_step(step, stamps) is True
    assert demo.run_step(step, stamps) is False  # unchanged: reused
    assert out.read_text() == "run\n"
    src.write_text("b")  # changed input: the old output is removed and the step runs again
    assert demo.run_step(step, stamps) is True
    assert out.read_text() == "run\n"
    assert json.loads((stamps / "s.json").read_text())["key"] == demo.step_key(step)


def test_interrupted_training_step_continues_with_its_resume_flag(demo, tmp_path):
    out, stamps = tmp_path / "run", tmp_path / ".stamps"
    (out / "checkpoint" / "training_state").mkdir(parents=True)
    log = tmp_path / "log.txt"
    step = demo.Step("train", "training", _writer(log, "train"), out, [], resume_flag="--resume")
    stamps.mkdir()
    (stamps / "train.running").write_text(demo.step_key(step))  # what a Ctrl-C mid-step leaves behind
    assert demo.run_step(step, stamps) is True
    assert log.read_text() == "train --resume\n"
    assert (out / "checkpoint").is_dir() and not (stamps / "train.running").exists()


def test_a_partial_output_without_a_checkpoint_is_redone_from_scratch(demo, tmp_path):
    out, stamps = tmp_path / "bundle", tmp_path / ".stamps"
    out.mkdir()
    (out / "half-written").write_text("x")
    log = tmp_path / "log.txt"
    step = demo.Step("export", "export", _writer(log, "export"), out, [])
    stamps.mkdir()
    (stamps / "export.running").write_text(demo.step_key(step))
    assert demo.run_step(step, stamps) is True
    assert log.read_text() == "export\n" and not out.exists()  # the stale folder is gone; the writer made none


def test_two_demos_cannot_share_an_output_folder(demo, tmp_path, capsys):
    out = tmp_path / "demo_out"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert demo.main(["--out", str(out), "--skip-benchmark"]) == 1
    assert "another demo is running" in capsys.readouterr().err


def test_training_times_sum_the_stand_ins_and_the_two_stages(demo, tmp_path):
    stamps = tmp_path / ".stamps"
    stamps.mkdir()
    for name, seconds in (("stage0_vision", 40.0), ("stage0", 300.4), ("stage1", 50.0)):
        (stamps / f"{name}.json").write_text(json.dumps({"key": "k", "seconds": seconds}))
    assert "unknown" in demo.training_times(stamps)
    (stamps / "stage2.json").write_text(json.dumps({"key": "k", "seconds": 370.0}))
    line = demo.training_times(stamps)
    assert "stand-ins 340 s" in line and "stages 1 + 2 420 s (7.0 min" in line and "760 s in all" in line


def test_demo_ends_with_one_request_through_the_server(demo, tiny_bundle, tmp_path, capsys):
    """`make demo`'s last step: the server on the bundle answers through the openai client and stops with exit 0."""
    pytest.importorskip("openai", reason="the demo's client is the official openai package (pip install '.[dev]')")
    from tests.serve_helpers import image

    photo = tmp_path / "photo.png"
    image(0).save(photo)
    answer = demo.serve_once(tiny_bundle, photo, "What is in the picture?")
    out = capsys.readouterr().out
    assert answer and f"A: {answer}" in out and "exit 0" in out


def test_demo_watch_step_answers_once_per_scene_change(demo, tiny_bundle, tmp_path, capsys):
    """`make demo`'s watch step: a 4-scene clip, one answer per scene change, each printed with its truth."""
    pytest.importorskip("av", reason="the watch step reads video with PyAV (pip install '.[video]')")
    answers = demo.watch_clip(tiny_bundle, tmp_path)
    out = capsys.readouterr().out
    assert [a.frame_index for a in answers] == [0, 5, 10, 15]
    assert [a.skipped_since_last for a in answers] == [0, 4, 4, 4]
    for truth in ("red", "blue", "yellow", "green"):
        assert f"(truth: {truth})" in out
    assert (tmp_path / "watch-clip.mp4").is_file()
