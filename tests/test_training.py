"""training/: synthetic data, the data pipeline (paths, bad images, truncation, SQ draws, label masks), which tensors
each stage updates, exact resume, and torchrun (gloo) == one process. Tiny preset, a few steps each."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sqllava_edge.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, get_preset

ROOT = Path(__file__).resolve().parents[1]
VISION = get_preset("tiny").vision


@pytest.fixture(scope="module")
def tok():
    from sqllava_edge.tokenizer import default_tokenizer
    from sqllava_edge.vocab import vocab_dir

    try:
        vocab_dir()
    except RuntimeError as err:
        pytest.skip(f"the Llama-2 vocabulary needs PyPI access once (pip download of llama-cpp-python): {err}")
    return default_tokenizer()


@pytest.fixture(scope="module")
def data(tmp_path_factory, tok) -> Path:
    from training.synthetic import build

    out = tmp_path_factory.mktemp("syn") / "data"
    build(out, n_train=24, n_eval=4, seed=3, image_size=112, max_turns=6)
    return out


def _cfg(stage: int, data: Path, out: Path, **kw):
    from training.train import TrainConfig

    base = dict(stage=stage, data=str(data / ("stage1.json" if stage == 1 else "stage2.json")), out=str(out),
                batch_size=2, max_steps=4, threads=1, progress=False, seed=5)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def stage1(data, tmp_path_factory) -> Path:
    from training.train import train

    out = tmp_path_factory.mktemp("runs") / "s1"
    train(_cfg(1, data, out, lr=5e-3))
    return out


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# Synthetic data


def test_synthetic_is_deterministic_and_holds_out_pairs(data, tmp_path):
    from training.synthetic import HELD_OUT, build

    again = tmp_path / "again"
    build(again, n_train=24, n_eval=4, seed=3, image_size=112, max_turns=6)
    for name in ("stage1.json", "stage2.json", "eval.json"):
        assert (data / name).read_text() == (again / name).read_text()
    assert (data / "images/train/000005.png").read_bytes() == (again / "images/train/000005.png").read_bytes()
    pairs = lambda row: {(o["colour"], o["shape"]) for o in row["meta"]["objects"]}  # noqa: E731
    assert all(not pairs(r) & HELD_OUT for r in json.loads((data / "stage2.json").read_text()))
    assert all(pairs(r) & HELD_OUT for r in json.loads((data / "eval.json").read_text()))
    other = tmp_path / "other"
    build(other, n_train=24, n_eval=0, seed=4, image_size=112, max_turns=6)
    assert (other / "stage2.json").read_text() != (data / "stage2.json").read_text()


def test_some_conversations_open_with_a_compact_json_answer_that_matches_the_scene(tmp_path):
    import re

    from training.synthetic import JSON_QUESTIONS, build, json_answer

    build(tmp_path / "d", n_train=300, n_eval=20, seed=0, image_size=64, max_turns=6, json_rate=0.5)
    rows = json.loads((tmp_path / "d" / "stage2.json").read_text())
    opened = [r for r in rows if r["meta"]["types"][0] == "json"]
    assert 0.15 < len(opened) / len(rows) < 0.35  # json_rate of the half without a description
    build(tmp_path / "plain", n_train=300, n_eval=0, seed=0, image_size=64, max_turns=6)  # the default: none
    assert not any("json" in r["meta"]["types"] for r in json.loads((tmp_path / "plain" / "stage2.json").read_text()))
    # Only ever the first turn (never made a VUSER turn, so JSON questions are not learned as self-questions).
    assert all("json" not in r["meta"]["types"][1:] for r in rows)
    # One turn more than max_turns when it opens with JSON: the JSON turn replaces no question.
    assert all(len(r["meta"]["types"]) == len(r["conversations"]) // 2 <= 6 + (r["meta"]["types"][0] == "json")
               for r in rows)
    patterns = {kind: [re.compile(re.escape(t).replace(r"\{ref\}", "(?P<ref>.+)").replace(r"\{colour\}", "(?P<colour>.+)"))
                       for t in texts] for kind, texts in JSON_QUESTIONS.items()}
    kinds, phrasings = set(), set()
    for row in opened:
        question = row["conversations"][0]["value"].removeprefix("<image>\n")
        answer = row["conversations"][1]["value"]
        objects = row["meta"]["objects"]
        assert answer == json_answer(json.loads(answer)) and " " not in answer  # compact, as the decoder writes it
        kind, i, match = next((k, i, m) for k, ps in patterns.items() for i, p in enumerate(ps)
                              if (m := p.fullmatch(question)))
        kinds.add(kind)
        phrasings.add((kind, i))
        if kind == "count":
            colour = match["colour"]
            assert answer == json_answer({"count": sum(o["colour"] == colour for o in objects)}) != '{"count":0}'
        else:
            ref = match["ref"].split()
            named = [o for o in objects if o["shape"] == ref[0]] if len(ref) == 1 else \
                [o for o in objects if o["colour"] == ref[0]]
            assert len(named) == 1, question  # the reference is unambiguous
            assert answer == json_answer({"colour": named[0]["colour"], "shape": named[0]["shape"]})
    assert kinds == {"object", "count"} and len(phrasings) == sum(map(len, JSON_QUESTIONS.values()))
    evaluation = json.loads((tmp_path / "d" / "eval.json").read_text())
    assert all("json" not in r["meta"]["types"] for r in evaluation)


def test_json_turns_leave_every_other_turn_as_without_them():
    """A conversation's description, questions and answers are the same draws with or without the JSON turn: it comes
    from its own generator and replaces no question."""
    import numpy as np

    from training.synthetic import conversation, sample_scene

    opened = 0
    for i in range(200):
        objects = sample_scene(np.random.default_rng([0, 0, i]), held_out=False, grid=8)
        plain, plain_types = conversation(objects, np.random.default_rng([1, i]), 6)
        turns, types = conversation(objects, np.random.default_rng([1, i]), 6, np.random.default_rng([2, i]), 0.5)
        if types[0] == "json":
            opened += 1
            assert turns[0]["value"].startswith("<image>\n") and turns[2:] and plain[0]["value"].startswith("<image>\n")
            turns = [{**turns[2], "value": "<image>\n" + turns[2]["value"]}] + turns[3:]
            types = types[1:]
        assert (turns, types) == (plain, plain_types)
    assert opened > 20


def test_question_parser_accepts_every_phrasing_and_rejects_others():
    from training.evaluate import grounded, parse_question
    from training.synthetic import QUESTIONS

    for kind, phrasings in QUESTIONS.items():
        for text in phrasings:
            filled = text.format(ref="red triangle", colour="blue")
            parsed = parse_question(filled)
            assert parsed is not None and parsed[0] == kind, filled
    assert parse_question("What colour is the hexagon?") is None
    assert parse_question("What colour is the triangle") is None
    assert parse_question("How many pink shapes are there?") is None
    objects = [{"colour": "red", "shape": "star"}, {"colour": "blue", "shape": "circle"}]
    assert grounded(parse_question("Is the red star big or small?")[1], objects)
    assert not grounded(parse_question("Is the red circle big or small?")[1], objects)
    assert grounded(parse_question("Which shape is blue?")[1], objects)


# ----------------------------------------------------------------------------------------------------------------
# Data pipeline


def _dataset(data: Path, tok, **kw):
    from training.data import ConversationDataset

    args = dict(template="v1_sq", image_mode="pad", sq_r=0.5, max_length=2048, seed=0)
    return ConversationDataset(data / "stage2.json", data / "images", tok, VISION, **{**args, **kw})


def _spans(ids, labels) -> list[list[int]]:
    runs, current = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == i
            current.append(i)
        elif current:
            runs, current = runs + [current], []
    return runs + ([current] if current else [])


def test_label_masks_of_real_samples_train_answers_and_sq_questions(data, tok):
    from sqllava_edge.conversation import sq_convert, tokenize_conversation

    ds = _dataset(data, tok)
    rows = json.loads((data / "stage2.json").read_text())
    for index in range(8):
        example = ds[(index, 7)]
        turns = sq_convert(rows[index]["conversations"], 0.5, random.Random(f"0/7/{index}"))
        ref = tokenize_conversation(tok, "v1_sq", turns)
        assert example.input_ids.tolist() == ref.ids and example.labels.tolist() == ref.labels
        assert example.input_ids.tolist().count(IMAGE_TOKEN_INDEX) == 1
        # Independently of the conversation module: the trained spans are exactly each answer and each VUSER
        # question, each followed by its </s> (docs/spec.md 3.4).
        expected = [t.text for t in turns if t.role in ("assistant", "vuser")]
        spans = _spans(example.input_ids.tolist(), example.labels.tolist())
        assert [tok.decode(s[:-1]).strip() for s in spans] == expected
        assert all(s[-1] == tok.eos_id for s in spans)
        assert turns[0].role == "user"


def test_sq_turn_rate_matches_sq_r_and_redraws_each_read(data, tok):
    ds = _dataset(data, tok, sq_r=0.5)
    converted = eligible = 0
    draws = set()
    for read in range(12):
        for index in range(len(ds)):
            example = ds[index]  # plain indexing: a fresh draw every read
            converted, eligible = converted + example.sq_turns, eligible + example.sq_eligible
            if index == 0:
                draws.add(tuple(example.labels.tolist()))
    rate = converted / eligible
    assert eligible > 1000
    assert abs(rate - 0.5) < 0.05, rate
    assert len(draws) > 1  # the conversion changes between reads of the same sample
    assert ds[(3, 1)].labels.tolist() == ds[(3, 1)].labels.tolist()  # keyed reads are reproducible
    none = _dataset(data, tok, sq_r=0.0)
    assert sum(none[i].sq_turns for i in range(len(none))) == 0


def _write_rows(folder: Path, rows) -> Path:
    path = folder / "rows.json"
    path.write_text(json.dumps(rows))
    return path


def test_bad_data_is_refused_or_skipped_and_counted(data, tok, tmp_path):
    from training.data import ConversationDataset, SkippedSampleWarning, collate, load_samples

    conv = [{"from": "human", "value": "<image>\nWhat colour is the star?"}, {"from": "gpt", "value": "red"}]
    for bad in ("../secret.png", "/etc/passwd", "a/../../b.png"):
        with pytest.raises(ValueError, match="inside the image folder"):
            load_samples(_write_rows(tmp_path, [{"image": bad, "conversations": conv}]))
    images = tmp_path / "images"
    images.mkdir()
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (images / "link.png").symlink_to(data / "images/train/000000.png")  # resolves outside this image folder
    (images / "good.png").write_bytes((data / "images/train/000001.png").read_bytes())
    long_conv = [{"from": "human", "value": "<image>\n" + "word " * 300}, {"from": "gpt", "value": "red"}]
    rows = [{"image": "missing.png", "conversations": conv}, {"image": "corrupt.png", "conversations": conv},
            {"image": "link.png", "conversations": conv}, {"image": "good.png", "conversations": long_conv},
            {"image": "good.png", "conversations": conv + [{"from": "human", "value": "x " * 200},
                                                           {"from": "gpt", "value": "blue"}]},
            {"image": "good.png", "conversations": conv}]
    ds = ConversationDataset(_write_rows(tmp_path, rows), images, tok, VISION, template="v1_sq", image_mode="pad",
                             max_length=150)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = collate([ds[i] for i in range(len(ds))])
    assert sum(issubclass(w.category, SkippedSampleWarning) for w in caught) == 4
    assert batch.stats["skipped_missing_image"] == 1
    assert batch.stats["skipped_corrupt_image"] == 1
    assert batch.stats["skipped_path_outside_folder"] == 1
    assert batch.stats["skipped_all_masked"] == 1  # the answer fell behind max_length
    assert len(batch) == 2 and batch.stats["truncated"] == 1  # truncated but still holds its first answer
    assert all(len(ids) <= 150 for ids in batch.input_ids)
    assert batch.pixel_values.shape == (2, 3, 112, 112)


def test_sampler_global_batches_do_not_depend_on_process_count():
    from training.data import StepSampler

    def steps(world: int, micro: int, accum: int, start=(0, 0), n_steps=7):
        per_rank = []
        for rank in range(world):
            sampler = StepSampler(30, micro, accum, rank, world, seed=1)
            sampler.set_position(*start)
            it = iter(sampler)
            per_rank.append([[next(it) for _ in range(micro * accum)] for _ in range(n_steps)])
        return [sorted(k for rank in per_rank for k in rank[s]) for s in range(n_steps)]

    one = steps(1, 4, 1)
    assert one == steps(2, 2, 1) == steps(2, 1, 2)
    assert steps(1, 4, 1, start=(0, 7), n_steps=1)[0][0][1] == 1  # 30 samples = 7 steps of 4, then epoch 1
    assert steps(1, 4, 1, start=(0, 3), n_steps=4) == one[3:]
    assert set(k[0] for s in one[:7] for k in s if k[1] == 0) == set(range(28))  # epoch 0: 7 steps, remainder dropped


# ----------------------------------------------------------------------------------------------------------------
# Stages


def test_loss_module_equals_model_forward(stage1, data, tok):
    from sqllava_edge.checkpoint import load_checkpoint
    from training.data import collate
    from training.modeling import LossModule

    model, _ = load_checkpoint(stage1 / "checkpoint")
    batch = collate([_dataset(data, tok)[(i, 0)] for i in range(3)])
    with torch.no_grad():
        ce, count = LossModule(model)(batch.input_ids, batch.labels, batch.pixel_values)
        logits = model(batch.input_ids, batch.pixel_values).logits[:, :-1].float()  # the full head at every position
        labels = model.prepare_inputs(batch.input_ids, batch.pixel_values, batch.labels).labels[:, 1:]
        reference = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.allclose(ce / count, reference, atol=1e-5)


def test_stage1_updates_only_the_projector(stage1):
    from sqllava_edge.checkpoint import load_checkpoint
    from training.modeling import load_base_parts

    before, _ = load_base_parts(get_preset("tiny"), None, None, seed=0, dtype=torch.float32)
    after, _ = load_checkpoint(stage1 / "checkpoint")
    for part in ("llm", "vision"):
        old, new = _state(getattr(before, part)), _state(getattr(after, part))
        assert old.keys() == new.keys()
        assert all(torch.equal(old[k], new[k]) for k in old), part
    old, new = _state(before.projector), _state(after.projector)
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed == set(old) - {"ln_1.weight", "ln_1.bias"}  # ln_1 exists but is unused (docs/spec.md 1.4.1)
    assert len(_losses(stage1)) == 4


@pytest.mark.parametrize("freeze_vit", [False, True])
def test_stage2_updates_exactly_lora_and_projector(stage1, data, tmp_path, freeze_vit):
    from sqllava_edge.checkpoint import load_checkpoint
    from training.modeling import base_module
    from training.train import train

    out = tmp_path / "s2"
    train(_cfg(2, data, out, init=str(stage1), max_steps=3, freeze_vit_lora=freeze_vit))
    before, _ = load_checkpoint(stage1 / "checkpoint")
    after, _ = load_checkpoint(out / "checkpoint")
    meta = json.loads((out / "checkpoint/sqllava_edge.json").read_text())
    assert meta["lora"] == {"llm": "llm_lora", "vision": "vit_lora"}
    assert json.loads((out / "checkpoint/llm_lora/adapter_config.json").read_text())["r"] == 128
    for part, module in (("llm", after.llm), ("vision", after.vision.clip)):
        lora = {k: v for k, v in module.state_dict().items() if "lora_" in k}
        base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                for k, v in module.state_dict().items() if "lora_" not in k}
        old = _state(getattr(before, part) if part == "llm" else before.vision.clip)
        assert base.keys() == old.keys() and all(torch.equal(base[k], old[k]) for k in old), part
        b_nonzero = [bool(v.abs().sum() > 0) for k, v in lora.items() if "lora_B" in k]
        assert b_nonzero, part
        trained = not (part == "vision" and freeze_vit)
        assert all(b_nonzero) if trained else not any(b_nonzero), (part, b_nonzero)
    vit_layers = {k.split("layers.")[1].split(".")[0] for k in after.vision.clip.state_dict() if "lora_" in k}
    assert vit_layers == {str(i) for i in range(get_preset("tiny").vision.layers_used)}  # layers that reach -2
    old, new = _state(before.projector), _state(after.projector)
    assert all(not torch.equal(old[k], new[k]) for k in old if not k.startswith("ln_1"))
    assert base_module(after.llm).lm_head.weight.equal(base_module(before.llm).lm_head.weight)


@pytest.mark.parametrize("bf16", [False, True])
def test_resume_reproduces_the_uninterrupted_losses(stage1, data, tmp_path, bf16):
    """Also with a bf16 base: the fp32 projector must come back unrounded (it was cast to bf16 and back)."""
    from safetensors.torch import load_file
    from training.train import train

    straight = tmp_path / "straight"
    train(_cfg(2, data, straight, init=str(stage1), max_steps=6, bf16=bf16, device="cpu"))
    split = tmp_path / "split"
    train(_cfg(2, data, split, init=str(stage1), max_steps=6, stop_after=3, bf16=bf16, device="cpu"))
    assert len(_losses(split)) == 3
    train(_cfg(2, data, split, resume=True, bf16=bf16, device="cpu"))
    a, b = _losses(straight), _losses(split)
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    for name in ("projector.safetensors", "llm_lora/adapter_model.safetensors"):
        whole, resumed = (load_file(run / "checkpoint" / name) for run in (straight, split))
        assert all(torch.equal(resumed[k], whole[k]) for k in whole), name
    with pytest.raises(FileExistsError, match="--resume"):
        train(_cfg(2, data, straight, init=str(stage1)))


def test_bf16_autocasts_the_forward_only_and_keeps_trained_weights_fp32(stage1, data, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from training import modeling
    from training.train import train

    seen, forward = [], modeling.LossModule.forward
    in_backward, backward = [], torch.Tensor.backward

    def spy(self, *args):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return forward(self, *args)

    def backward_spy(self, *args, **kwargs):
        in_backward.append(torch.is_autocast_enabled("cpu"))
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(modeling.LossModule, "forward", spy)
    monkeypatch.setattr(torch.Tensor, "backward", backward_spy)
    runs = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        runs[name] = tmp_path / name
        train(_cfg(2, data, runs[name], init=str(stage1), max_steps=3, bf16=bf16, device="cpu"))
    assert seen == [False] * 3 + [True] * 3, seen  # one micro-batch per step
    assert in_backward == [False] * 6, in_backward  # backward outside autocast (PyTorch's AMP guidance)
    fp32, bf16 = _losses(runs["fp32"]), _losses(runs["bf16"])
    assert fp32 != bf16
    assert max(abs(a - b) / a for a, b in zip(fp32, bf16)) < 0.05, (fp32, bf16)
    saved = [runs["bf16"] / "checkpoint" / f for f in
             ("projector.safetensors", "llm_lora/adapter_model.safetensors", "vit_lora/adapter_model.safetensors")]
    assert {str(t.dtype) for f in saved for t in load_file(f).values()} == {"torch.float32"}


def _torchrun(*args: str, timeout: float = 240, program: tuple[str, ...] = ("-m", "training")) -> None:
    """`python -m training ARGS` (or another program) in 2 processes (gloo). A hang fails the test after `timeout`
    seconds: torchrun gets SIGTERM, which it passes on to its workers (they run in sessions of their own), SIGKILL
    30 s later."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: reading it never waits for a stuck worker
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", *program, *args], env=env, cwd=ROOT, stdout=log, stderr=log, text=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=90)
            log.seek(0)
            pytest.fail(f"torchrun still running after {timeout} s (ranks out of step?): {log.read()[-3000:]}")
        log.seek(0)
        assert proc.returncode == 0, log.read()[-3000:]


def _stage2_args(data_json: Path, stage1: Path, steps: int) -> list[str]:
    """Dropout off: its masks are per-process random streams."""
    return ["--stage", "2", "--data", str(data_json), "--init", str(stage1), "--max-steps", str(steps),
            "--lora-dropout", "0", "--vit-lora-dropout", "0", "--threads", "1", "--no-progress", "--seed", "5"]


def _assert_placed_unit_by_unit(report: Path) -> None:
    """--fsdp must not put the whole model on the device before sharding it (13B in bf16 on 24 GB cards runs out of
    memory before FSDP sees the model). tests/fsdp_probe.py records, on each rank, every request after loading to
    place parameters on the training device: each must be one FSDP unit's own parameters, every unit once (so a rank
    holds its shards plus the unit being wrapped), and the rank then keeps about half the model. (In the tiny preset
    the root unit, the 32000-row embedding and head, is 70% of the model; in 7B it is 4%.)"""
    for rank in (0, 1):
        probe = json.loads((report / f"rank{rank}.json").read_text())
        total, units, moves = probe["total"], probe["units"], probe["moves"]
        assert len(units) > 80 and sum(units) == total  # every decoder / ViT layer, LoRA matrix, projector, the root
        assert sorted(moves) == sorted(units), (sorted(moves)[-3:], units[:3], total)  # each unit on its own, once
        assert probe["local"] <= total / 2 + len(units), (probe["local"], total)  # then only its shard stays


def test_torchrun_ddp_and_fsdp_match_one_process(stage1, data, tmp_path):
    """Same global batch (4) as 1 x 4 and 2 x 2.
    Tolerance 2e-4: the only difference is the order of float additions (gloo's all-reduce of gradients and
    token counts vs one batched sum), about 1e-6 per step, compounded by Adam over 4 steps."""
    args = _stage2_args(data / "stage2.json", stage1, 4)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "training", *args, "--out", str(one), "--batch-size", "4"],
                   check=True, env=env, cwd=ROOT, capture_output=True)
    _torchrun(*args, "--out", str(two), "--batch-size", "2")
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 2e-4, (a, b)  # observed: 0 at step 1, 5e-5 at step 4
    assert a[0] != a[-1]
    # FSDP (sharded parameters, gloo on CPU), run through tests/fsdp_probe.py: placed unit by unit, same curve, and
    # the gathered checkpoint loads as a whole model.
    sharded, report = tmp_path / "fsdp", tmp_path / "probe"
    _torchrun(str(report), *args, "--out", str(sharded), "--batch-size", "2", "--fsdp", program=("tests/fsdp_probe.py",))
    _assert_placed_unit_by_unit(report)
    c = _losses(sharded)
    assert len(c) == 4 and max(abs(x - y) for x, y in zip(a, c)) < 2e-4, (a, c)
    from sqllava_edge.checkpoint import load_checkpoint

    def lora(run: Path) -> dict[str, torch.Tensor]:
        model, _ = load_checkpoint(run / "checkpoint")
        return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}

    whole, gathered = lora(one), lora(sharded)  # every LLM-LoRA and ViT-LoRA tensor, gathered from both shards
    assert whole and gathered.keys() == whole.keys()
    assert all(torch.allclose(gathered[n], whole[n], atol=1e-3) for n in whole)


@pytest.mark.slow
def test_fsdp_with_bf16_trains_and_saves_what_one_process_does(stage1, data, tmp_path):
    """FSDP with the CUDA defaults (bf16 frozen base next to fp32 LoRA and projector, activation checkpointing) wraps,
    trains, saves, resumes, and its checkpoint holds what one process trains on the same micro-batches (1 x 2 x 2
    accumulated vs 2 x 2; both without the shared-prefix pass, which activation checkpointing turns off).
    Tolerance 1e-3: both runs compute each row alike; gradient sums differ in order, and Adam's first steps turn
    a near-zero gradient into +-lr (observed: losses equal for 2 steps then 4e-4 apart; weights at most 6e-4)."""
    from safetensors.torch import load_file

    from sqllava_edge.checkpoint import load_checkpoint
    from training.train import train

    common = dict(lora_dropout=0.0, vit_lora_dropout=0.0, bf16=True, grad_checkpointing=True, device="cpu")
    one = tmp_path / "one"
    train(_cfg(2, data, one, init=str(stage1), max_steps=3, batch_size=2, grad_accum=2, **common))
    sharded = tmp_path / "fsdp"
    args = [*_stage2_args(data / "stage2.json", stage1, 3), "--out", str(sharded), "--batch-size", "2", "--fsdp",
            "--bf16", "--grad-checkpointing"]
    _torchrun(*args, "--stop-after", "2")
    _torchrun(*args, "--resume")  # the gathered optimizer state goes back into the shards
    a, b = _losses(one), _losses(sharded)
    assert len(a) == len(b) == 3 and a[0] != a[-1]
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3, (a, b)
    whole, gathered = (dict(load_checkpoint(run / "checkpoint")[0].named_parameters()) for run in (one, sharded))
    assert gathered.keys() == whole.keys()
    trained = {n for n in whole if "lora_" in n or n.startswith("projector.")}
    assert trained and all(torch.equal(gathered[n], whole[n]) for n in whole.keys() - trained)  # frozen base
    assert all(torch.allclose(gathered[n], whole[n], atol=1e-3) for n in trained), \
        max((gathered[n] - whole[n]).abs().max().item() for n in trained)
    saved = load_file(sharded / "checkpoint/llm_lora/adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}


@pytest.mark.parametrize("fsdp", [False, True])
def test_a_rank_whose_samples_are_all_skipped_stays_in_step(stage1, data, tmp_path, fsdp):
    """Rank 1's first micro-batch holds only missing images. It must still join the gradient collectives (it used to
    skip them and leave rank 0 waiting until killed): same losses as one process reading the same global batches."""
    import dataclasses

    from training.data import StepSampler
    from training.train import train

    rows = json.loads((data / "stage2.json").read_text())
    rank1 = iter(StepSampler(len(rows), 2, 1, rank=1, world_size=2, seed=5))
    for index, _ in (next(rank1), next(rank1)):
        rows[index]["image"] = "missing.png"
    skipping = tmp_path / "skipping.json"
    skipping.write_text(json.dumps(rows))
    one = tmp_path / "one"
    cfg = _cfg(2, data, one, init=str(stage1), max_steps=2, batch_size=4, lora_dropout=0.0, vit_lora_dropout=0.0,
               image_folder=str(data / "images"))
    train(dataclasses.replace(cfg, data=str(skipping)))
    two = tmp_path / "two"
    _torchrun(*_stage2_args(skipping, stage1, 2), "--image-folder", str(data / "images"), "--out", str(two),
              "--batch-size", "2", *(["--fsdp"] if fsdp else []), timeout=180)
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 2
    assert max(abs(x - y) for x, y in zip(a, b)) < 2e-4, (a, b)
    first = json.loads((one / "metrics.jsonl").read_text().splitlines()[0])
    assert first["skipped_missing_image"] == 2 and first["samples"] == 2  # the step really lost rank 1's samples


# ----------------------------------------------------------------------------------------------------------------
# Speed-ups: each computes what the plain path does, to float rounding


def test_skipping_the_frozen_heads_zero_rows_gives_the_full_loss_and_gradients(stage1, data, tok):
    from sqllava_edge.checkpoint import load_checkpoint
    from training.data import collate
    from training.modeling import LossModule, RestrictedHead, base_module

    model, _ = load_checkpoint(stage1 / "checkpoint")
    head = base_module(model.llm).lm_head
    assert RestrictedHead.of(head) is None  # a random head has no zero rows: the plain path runs
    batch = collate([_dataset(data, tok)[(i, 0)] for i in range(3)])
    targets = {t for row in batch.labels for t in row.tolist() if t != IGNORE_INDEX}
    keep = sorted(targets)[1:]  # one target token's row becomes zero too: its logit is 0, not dropped
    with torch.no_grad():
        zero = torch.ones(len(head.weight), dtype=torch.bool)
        zero[keep + list(range(0, 400, 7))] = False
        head.weight[zero] = 0.0
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    results = []
    for skip in (True, False):
        module = LossModule(model, skip_zero_rows=skip)
        assert (module.head is not None) == skip
        model.projector.zero_grad()
        ce, count = module(batch.input_ids, batch.labels, batch.pixel_values)
        ce.backward()
        grads = [p.grad.clone() for p in model.projector.parameters() if p.grad is not None]
        results.append((ce.detach(), count, grads))
    (fast, n_fast, g_fast), (full, n_full, g_full) = results
    assert n_fast == n_full and torch.allclose(fast, full, rtol=1e-5), (fast, full)
    assert len(g_fast) == len(g_full) > 0
    assert all(float((a - b).norm()) <= 1e-4 * float(b.norm()) for a, b in zip(g_fast, g_full))
    head.weight.requires_grad_(True)
    assert RestrictedHead.of(head) is None  # a head that trains may leave zero: never restricted


def test_fused_adamw_trains_what_the_default_adamw_does(stage1, data, tmp_path):
    from safetensors.torch import load_file
    from training.train import train

    for fused in (True, False):
        train(_cfg(2, data, tmp_path / str(fused), init=str(stage1), max_steps=4, fused_adamw=fused, device="cpu"))
    fast, plain = _losses(tmp_path / "True"), _losses(tmp_path / "False")
    assert len(fast) == 4 and fast == pytest.approx(plain, rel=1e-4)  # float rounding, compounded over 4 steps
    a, b = (load_file(tmp_path / run / "checkpoint" / "llm_lora" / "adapter_model.safetensors")
            for run in ("True", "False"))
    assert a.keys() == b.keys()
    # Adam divides by sqrt(v): where a gradient is near 0, float-order noise moves the update, so compare each tensor
    # as a whole (a wrong LR, betas or a skipped update would be off by far more)
    drift = {k: float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)) for k in a if "lora_B" in k}
    assert max(drift.values()) < 1e-2, drift
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # it trained


def test_fused_adamw_is_refused_where_torch_has_no_kernel():
    from training.speed import adamw_kwargs

    assert adamw_kwargs(None, "cpu") == {"fused": True} and adamw_kwargs(None, "cpu", fsdp=True) == {"foreach": None}
    assert adamw_kwargs(False, "cpu") == {"foreach": None}
    with pytest.raises(ValueError, match="--no-fused-adamw"):
        adamw_kwargs(True, "meta")
