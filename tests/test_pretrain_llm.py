"""Stage 0 (training/pretrain_llm.py, training/scenes.py): the restricted softmax is the exact full one, and the
output is a base LLM that stage 1 accepts."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from training.loss import RestrictedHead


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    from training.synthetic import build

    _vocabulary_or_skip()
    out = tmp_path_factory.mktemp("syn0") / "data"
    build(out, n_train=12, n_eval=2, seed=4, image_size=112, max_turns=4)
    return out


def test_restricted_head_equals_full_softmax_of_a_head_with_zero_rows():
    torch.manual_seed(0)
    vocab_size, hidden, vocab = 500, 16, [3, 7, 11, 2, 400, 499]
    weight = torch.zeros(vocab_size, hidden)
    weight[vocab] = torch.randn(len(vocab), hidden)
    h = torch.randn(9, hidden) * 3
    targets = torch.tensor([3, 7, 11, 2, 400, 499, 3, 7, 2])
    full = F.cross_entropy(h @ weight.T, targets, reduction="sum")
    restricted = RestrictedHead(vocab, vocab_size, "cpu").loss_sum(h, weight, targets)
    assert torch.allclose(full, restricted, rtol=1e-5), (full, restricted)
    # and it differs from the naive corpus-only softmax, which would ignore the unseen tokens' mass
    naive = F.cross_entropy(h @ weight[sorted(vocab)].T, torch.tensor([sorted(vocab).index(t) for t in targets]),
                            reduction="sum")
    assert not torch.allclose(naive, restricted)


def test_restricted_head_over_the_whole_vocabulary_has_no_bucket():
    head = RestrictedHead(list(range(10)), 10, "cpu")
    assert head.bucket is None
    h, w = torch.randn(4, 3), torch.randn(10, 3)
    t = torch.tensor([0, 9, 4, 4])
    assert torch.allclose(head.loss_sum(h, w, t), F.cross_entropy(h @ w.T, t, reduction="sum"))
    assert math.isclose(RestrictedHead([1], 10, "cpu").bucket, math.log(9))


def test_pretrain_writes_a_llama_folder_with_zero_unseen_rows(tmp_path, synthetic_data):
    from transformers import LlamaForCausalLM

    from training.pretrain_llm import main

    folder = main(["--data", str(synthetic_data / "stage2.json"), "--out", str(tmp_path / "run"), "--max-steps", "3",
                   "--batch-size", "2", "--no-progress"])
    llm = LlamaForCausalLM.from_pretrained(folder)
    info = json.loads((folder / "pretrain.json").read_text())
    rows = llm.lm_head.weight.abs().sum(dim=1) > 0
    assert int(rows.sum()) == info["corpus_vocab"] < 32000
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] > 0 for r in records)
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 0
    # stage 1 takes it as its frozen base LLM, referenced (not copied) by the checkpoint
    from sqllava_edge.checkpoint import read_meta
    from training.train import TrainConfig, train

    ckpt = train(TrainConfig(stage=1, data=str(synthetic_data / "stage1.json"), out=str(tmp_path / "s1"),
                             llm_base=str(folder), batch_size=2, max_steps=1, threads=1, progress=False))
    assert str(folder.resolve()) in json.dumps(read_meta(ckpt))
    with pytest.raises(FileExistsError):
        main(["--data", str(synthetic_data / "stage2.json"), "--out", str(tmp_path / "run"), "--max-steps", "1",
              "--no-progress"])


def test_json_turns_join_stage_0_at_the_step_json_from_names(tmp_path, synthetic_data):  # fixture: vocabulary
    """--json-from F: the conversations are read without their JSON-answer turns for the first F of the steps and
    with them after; at F = 1 the JSON tokens are never read, so their head rows stay zero."""
    import random

    from transformers import LlamaForCausalLM

    from sqllava_edge.tokenizer import default_tokenizer
    from training.data import load_samples
    from training.pretrain_llm import corpus, main, without_json_turns
    from training.synthetic import build

    data = tmp_path / "data"
    build(data, n_train=12, n_eval=0, seed=4, image_size=112, max_turns=4, json_rate=0.5)
    rows = load_samples(data / "stage2.json")
    assert any(r["meta"]["types"][0] == "json" for r in rows)
    tok, rng = default_tokenizer(), random.Random(0)
    json_only = sorted({t for ids in corpus(rows, tok, "v1_sq", 0.0, rng) for t in ids}
                       - {t for ids in corpus([without_json_turns(r) for r in rows], tok, "v1_sq", 0.0, rng) for t in ids})
    assert json_only  # "{", '"', ":" ... appear in the JSON answers only

    def run(name: str, json_from: str, steps: int) -> tuple[list[int], torch.Tensor]:
        folder = main(["--data", str(data / "stage2.json"), "--out", str(tmp_path / name), "--max-steps",
                       str(steps), "--batch-size", str(len(rows)), "--json-from", json_from, "--no-progress"])
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r["trained_tokens"] for r in records], LlamaForCausalLM.from_pretrained(folder).lm_head.weight

    tokens, head = run("late", "0.5", 2)  # every step reads every conversation: step 1 without, step 2 with JSON
    assert tokens[0] < tokens[1]
    assert bool((head[json_only].abs().sum(dim=1) > 0).all())
    never, never_head = run("never", "1", 1)
    assert never == tokens[:1] and float(never_head[json_only].abs().sum()) == 0.0
    start, _ = run("start", "0", 1)
    assert start[0] > tokens[0]
    with pytest.raises(SystemExit):
        main(["--data", str(synthetic_data / "stage2.json"), "--out", str(tmp_path / "bad"), "--json-from", "1.5",
              "--no-progress"])


def test_patch_contents_puts_objects_on_their_patches():
    from training.synthetic import patch_contents

    big = {"colour": "red", "shape": "star", "size": "big", "x": 0.25, "y": 0.75, "r": 0.1}  # cells 1-2 x 5-6
    small = {"colour": "blue", "shape": "cross", "size": "small", "x": 0.9375, "y": 0.0625, "r": 0.05}  # cell 7, 0
    cells = patch_contents([big, small], 8)
    filled = {i: (o.colour, o.shape) for i, o in enumerate(cells) if o is not None}
    assert filled == {5 * 8 + 1: ("red", "star"), 5 * 8 + 2: ("red", "star"), 6 * 8 + 1: ("red", "star"),
                      6 * 8 + 2: ("red", "star"), 7: ("blue", "cross")}
    with pytest.raises(ValueError, match="lattice"):
        patch_contents([{**small, "x": 1.2}], 8)


def test_scenes_fill_the_image_slot_and_the_llm_learns_from_them(tmp_path, synthetic_data):
    from sqllava_edge.config import IMAGE_TOKEN_INDEX, get_preset
    from sqllava_edge.tokenizer import default_tokenizer
    from training.data import load_samples
    from training.pretrain_llm import corpus, main
    from training.scenes import SceneEmbedder, scene_words

    rows = load_samples(synthetic_data / "stage2.json")
    tok = default_tokenizer()
    texts = corpus(rows[:2], tok, "v1_sq", 0.0, __import__("random").Random(0), keep_image=True)
    assert all(ids.count(IMAGE_TOKEN_INDEX) == 1 for ids in texts)
    scenes = scene_words(rows[:2], 8)
    hidden = get_preset("tiny").llm.hidden_size
    embedder = SceneEmbedder(tok, {w for s in scenes for p in s for w in p}, hidden)
    table = torch.nn.Embedding(32000, hidden)
    vectors = embedder(table, embedder.index(scenes))  # (2, 64, H)
    assert vectors.shape == (2, 64, hidden)
    assert torch.allclose(vectors.norm(dim=-1), torch.full((2, 64), math.sqrt(hidden)), rtol=1e-4)
    objects = [i for i, p in enumerate(scenes[0]) if p[0] != "background"]
    assert objects and len(objects) < 64
    assert scenes[0][0][-2:] == ("left", "top") and scenes[0][63][-2:] == ("right", "bottom")
    # patches with the same words get the same vector, different words a different one
    same = [(i, j) for i in range(64) for j in range(i + 1, 64) if scenes[0][i] == scenes[0][j]]
    assert same and all(torch.allclose(vectors[0, i], vectors[0, j]) for i, j in same)
    assert not torch.allclose(vectors[0, 0], vectors[0, 63])
    assert not any(torch.allclose(vectors[0, o], vectors[0, b]) for o in objects for b in range(64) if b not in objects)

    folder = main(["--data", str(synthetic_data / "stage2.json"), "--out", str(tmp_path / "run"), "--max-steps", "2",
                   "--batch-size", "2", "--scenes", "--no-progress"])
    info = json.loads((folder / "pretrain.json").read_text())
    assert info["scenes"] is True and info["final_loss"] > 0
    assert info["scene_use"]["own_scene_ce"] > 0 and info["scene_use"]["other_scene_ce"] > 0


def test_scenes_need_a_lattice_matching_the_image_tokens(tmp_path, synthetic_data):  # fixture: vocabulary present
    from training.pretrain_llm import main
    from training.synthetic import build

    build(tmp_path / "free", n_train=3, n_eval=1, seed=1, max_turns=2, grid=0)
    with pytest.raises(ValueError, match="lattice"):
        main(["--data", str(tmp_path / "free" / "stage2.json"), "--out", str(tmp_path / "r"), "--max-steps", "1",
              "--scenes", "--no-progress"])


def test_scene_qa_asks_every_held_out_question_once(tmp_path, synthetic_data):
    """The stage-0 report's ceiling: QA on perfect scenes of held-out images, one entry per question, per type."""
    from training.data import load_samples
    from training.pretrain_llm import main
    from training.synthetic import QUESTION_GROUP

    folder = main(["--data", str(synthetic_data / "stage2.json"), "--out", str(tmp_path / "run"), "--max-steps", "2",
                   "--batch-size", "2", "--scenes", "--eval-data", str(synthetic_data / "eval.json"),
                   "--eval-every", "1", "--no-progress"])
    qa = json.loads((folder / "pretrain.json").read_text())["scene_qa"]
    rows = load_samples(synthetic_data / "eval.json")
    kinds = [k for r in rows for k in r["meta"]["types"]]
    assert qa["questions"] == len(kinds) > 0
    assert set(qa["per_type"]) == {QUESTION_GROUP[k] for k in kinds}
    assert 0.0 <= qa["accuracy"] <= 1.0 and all(0.0 <= v <= 1.0 for v in qa["per_type"].values())
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "scene_qa" in r] == [1]  # every --eval-every steps before the last
    assert (tmp_path / "run" / "scene_qa.png").stat().st_size > 0


def test_scene_qa_asks_in_the_evaluation_prompt_and_scores_the_answer_tokens(synthetic_data):
    """Each scored item is training.evaluate's prompt followed by the answer and "</s>", and only those are scored."""
    from sqllava_edge.config import IGNORE_INDEX, get_preset
    from sqllava_edge.conversation import answer_prompt
    from sqllava_edge.tokenizer import default_tokenizer
    from training.data import load_samples
    from training.scenes import SceneEmbedder, SceneQA, scene_words

    rows = load_samples(synthetic_data / "eval.json")
    tok = default_tokenizer()
    words = {w for s in scene_words(rows, 8) for p in s for w in p}
    qa = SceneQA(tok, rows, 8, SceneEmbedder(tok, words, get_preset("tiny").llm.hidden_size))
    turns = rows[0]["conversations"]
    ids, labels, scene, _ = qa.items[0]
    prompt = answer_prompt(tok, turns[0]["value"].replace("<image>", "").strip())
    assert ids[:len(prompt)].tolist() == prompt and scene == 0
    scored = [t for t in labels.tolist() if t != IGNORE_INDEX]
    assert scored == ids[len(prompt):].tolist() and scored[-1] == tok.eos_id
    assert tok.decode(scored[:-1]).strip() == turns[1]["value"]


def test_scene_facts_name_each_object_by_a_unique_referent_then_its_attributes():
    """Every line is `referent: attributes`; the referent picks out exactly one object (or a colour's count), the
    attributes are that object's, and the lines come in a seeded random order."""
    import numpy as np

    from training.synthetic import Obj, scene_facts

    objects = [Obj("red", "star", "big", 0.25, 0.25, 0.1), Obj("red", "circle", "small", 0.8125, 0.9375, 0.05),
               Obj("blue", "cross", "small", 0.5, 0.0625, 0.05)]  # the cross is neither left nor right
    for seed in range(20):
        lines = scene_facts(objects, np.random.default_rng(seed)).rstrip(".").split(". ")
        assert len(lines) == len(objects) + 2  # one per object, one count per colour
        seen = set()
        for line in lines:
            ref, attrs = line.split(": ")
            if ref.endswith(" shapes"):
                assert attrs == str(sum(o.colour == ref.split()[0] for o in objects))
                seen.add(ref)
                continue
            words = ref.removesuffix(" object").split()
            match = [o for o in objects if all(w in (o.colour, o.shape) for w in words)]
            assert len(match) == 1, line  # "red" alone would be ambiguous: two red objects
            o = match[0]
            assert attrs.split(", ") == [o.colour, o.shape, o.size] + [w for w in (o.horizontal, o.vertical) if w]
            seen.add(o.shape)
        assert seen == {"star", "circle", "cross", "red shapes", "blue shapes"}
    orders = {scene_facts(objects, np.random.default_rng(s)) for s in range(20)}
    assert len(orders) > 1 and scene_facts(objects, np.random.default_rng(3)) == scene_facts(objects, np.random.default_rng(3))


def test_scene_facts_extend_the_stage0_captions(tmp_path, synthetic_data):
    from training.data import load_samples
    from training.pretrain_llm import main
    from training.scenes import with_scene_facts

    meta = {r["image"]: r["meta"] for r in load_samples(synthetic_data / "stage2.json")}
    captions = [{**r, "meta": meta[r["image"]]} for r in load_samples(synthetic_data / "stage1.json")]
    extended = with_scene_facts(captions, seed=0)
    for before, after in zip(captions, extended):
        caption = before["conversations"][1]["value"]
        assert after["conversations"][0] == before["conversations"][0]
        assert after["conversations"][1]["value"].startswith(caption + " ")
        assert after["conversations"][1]["value"].count(":") >= len(before["meta"]["objects"]) + 1
    with pytest.raises(ValueError, match="meta.objects"):
        with_scene_facts([{**captions[0], "meta": {}}], seed=0)
    with pytest.raises(SystemExit):  # needs captions to extend
        main(["--data", str(synthetic_data / "stage2.json"), "--out", str(tmp_path / "r"), "--scenes", "--scene-facts"])
    folder = main(["--data", str(synthetic_data / "stage2.json"), "--caption-data", str(synthetic_data / "stage1.json"),
                   "--out", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "2", "--scenes",
                   "--scene-facts", "--no-progress"])
    assert json.loads((folder / "pretrain.json").read_text())["scene_use"]["own_scene_ce"] > 0


def _vocabulary_or_skip():
    from sqllava_edge.vocab import vocab_dir

    try:
        vocab_dir()
    except RuntimeError as err:
        pytest.skip(f"the Llama-2 vocabulary needs PyPI access once (pip download of llama-cpp-python): {err}")


def test_referent_targets_point_each_attribute_at_its_objects_patches():
    """--bind-attention's targets on a real tokenized conversation: an answer looks at its question's referent, a
    count at every object of the colour, an attribute word only at an object that has it, and the system prompt and
    the roles at nothing."""
    _vocabulary_or_skip()
    from sqllava_edge.conversation import Turn, tokenize_conversation
    from sqllava_edge.tokenizer import default_tokenizer
    from training.scenes import referent_targets
    from training.synthetic import Obj, patch_contents

    objects = [Obj("red", "star", "big", 0.25, 0.25, 0.1), Obj("red", "circle", "small", 0.8125, 0.9375, 0.05),
               Obj("blue", "cross", "small", 0.5625, 0.0625, 0.05)]
    cells = patch_contents(objects, 8)
    where = {o.shape: tuple(p for p, c in enumerate(cells) if c == o) for o in objects}
    assert len(where["star"]) == 4 and len(where["circle"]) == len(where["cross"]) == 1
    tok = default_tokenizer()
    turns = [Turn("user", "What colour is the star?", image=True), Turn("assistant", "red"),
             Turn("vuser", "How many red shapes are there?"), Turn("assistant", "2"),
             Turn("user", "Is the cross big or small?"), Turn("assistant", "small")]
    ids = tokenize_conversation(tok, "v1_sq", turns).ids
    targets = referent_targets(tok, ids, objects, 8)
    assert len({p for p, _ in targets}) == len(targets)  # one target per position
    named = [(tok.decode([ids[p + 1]]).strip(), patches) for p, patches in targets]
    red_objects = tuple(sorted(where["star"] + where["circle"]))
    assert named == [
        ("red", where["star"]),  # the answer: the star's colour (naming the star in the question is the user's choice)
        ("", red_objects), ("2", red_objects),  # "How many red shapes": both answer tokens ("▁", "2") look at both
        ("small", where["cross"]),  # "big" in the question is not the cross's attribute: no target
        ("small", where["cross"]),  # the answer
    ]
    system_end = ids.index(-200)
    assert all(p > system_end for p, _ in targets)
    # a caption phrase's shape looks at the object of its colour, a fact's attributes at the fact's referent
    text = "A small blue cross at the top. cross: blue, cross, small, top."
    facts = tokenize_conversation(tok, "plain", [Turn("user", "", image=True), Turn("assistant", text)]).ids
    named = [(tok.decode([facts[p + 1]]).strip(), patches) for p, patches in referent_targets(tok, facts, objects, 8)]
    assert named == [("cross", where["cross"]), ("top", where["cross"]),
                     ("blue", where["cross"]), ("cross", where["cross"]), ("small", where["cross"]), ("top", where["cross"])]
    assert referent_targets(tok, facts, objects[:2], 8) == []  # an object that is not in the image is never a target


@pytest.mark.parametrize("prefix", [0, 20])
def test_bind_attention_recomputes_the_models_own_attention(prefix):
    """The mass BindAttention reports is the attention the model itself computes (eager attention weights), with
    and without the shared-prefix pass, and its loss trains the heads' query and key maps."""
    from transformers import LlamaForCausalLM

    from sqllava_edge.config import get_preset
    from sqllava_edge.model import hf_llama_config
    from training.modeling import decoder_hidden
    from training.scenes import BindAttention

    config = hf_llama_config(get_preset("tiny").llm)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharpen the attention so that the masses differ clearly from uniform
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
    bind = BindAttention(model, [(1, 0), (2, 3)])
    x = torch.randn(2, 50, config.hidden_size)
    x[1, :prefix] = x[0, :prefix]
    with torch.no_grad():
        weights = model.model(inputs_embeds=x, output_attentions=True).attentions
    rows, pos, start = torch.tensor([0, 1, 1]), torch.tensor([40, 30, 49]), torch.tensor([5, 5, 5])
    mask = torch.zeros(3, 10)
    mask[0, 2] = mask[1, 2] = mask[2, [2, 7]] = 1
    bind.active = True
    decoder_hidden(model.model, x, torch.ones(2, 50, dtype=torch.long), prefix)
    bind.active = False
    loss, masses = bind.loss(rows, pos, start, mask)
    for (layer, head), mass in zip(bind.heads, masses):
        expected = (weights[layer][rows, head, pos, 5:15] * mask).sum(-1).mean()
        assert mass == pytest.approx(float(expected), abs=1e-4)
    assert 0 < min(masses) < 0.5
    loss.backward()
    attn = model.model.layers[1].self_attn
    assert attn.q_proj.weight.grad.abs().sum() > 0 and attn.k_proj.weight.grad.abs().sum() > 0
    assert not bind.captured  # nothing kept between steps
    with pytest.raises(ValueError, match="layers 0-3"):
        BindAttention(model, [(4, 0)])


def test_pretrain_with_bind_attention_logs_the_referent_mass(tmp_path, synthetic_data):
    from training.pretrain_llm import main

    common = ["--data", str(synthetic_data / "stage2.json"), "--caption-data", str(synthetic_data / "stage1.json"),
              "--max-steps", "2", "--batch-size", "2", "--no-progress"]
    main([*common, "--out", str(tmp_path / "run"), "--scenes", "--bind-attention", "1:0,2:0"])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(len(r["bind_mass"]) == 2 and all(0 < m < 1 for m in r["bind_mass"]) and r["bind_loss"] > 0
               for r in records)
    for bad in (["--scenes", "--bind-attention", "1-0"], ["--bind-attention", "1:0"],  # bad spec; no scenes
                ["--scenes", "--bind-attention", "1:0", "--count-sink", "1"]):  # retired (training/RESULTS.md)
        with pytest.raises(SystemExit):
            main([*common, "--out", str(tmp_path / "bad"), *bad])


def test_bind_targets_move_text_positions_past_the_expanded_image():
    """A target before the placeholder keeps its position, one after it moves by n_image - 1; a batch stacks the
    samples' targets with their row numbers, and a batch without any is None."""
    from training.scenes import BindAttention

    ids = [1, 5, -200, 7, 8, 9]
    pos, image, masks = BindAttention.sample_targets(ids, [(1, (0,)), (4, (2, 3))], n_image=4)
    assert pos.tolist() == [1, 7] and image == 2
    assert masks.tolist() == [[1, 0, 0, 0], [0, 0, 1, 1]]
    empty = BindAttention.sample_targets(ids, [], n_image=4)
    rows, positions, starts, stacked = BindAttention.batch_targets([empty, (pos, image, masks)])
    assert rows.tolist() == [1, 1] and positions.tolist() == [1, 7] and starts.tolist() == [2, 2]
    assert torch.equal(stacked, masks)
    assert BindAttention.batch_targets([empty, empty]) is None


def test_compact_vocab_trains_the_same_model_as_the_full_tables(tmp_path, synthetic_data):
    """--compact-vocab (the default) against --no-compact-vocab: the demo's stage-0 options (scenes, facts, bound
    heads), same seed, 3 steps: same losses and the same saved weights, to float summation order."""
    from safetensors.torch import load_file

    from training.pretrain_llm import main

    common = ["--data", str(synthetic_data / "stage2.json"), "--caption-data", str(synthetic_data / "stage1.json"),
              "--scenes", "--scene-facts", "--bind-attention", "1:0", "--max-steps", "3", "--batch-size", "2",
              "--no-progress", "--threads", "1"]
    runs = {}
    for flag in ("--compact-vocab", "--no-compact-vocab"):
        out = tmp_path / flag
        folder = main([*common, flag, "--out", str(out)])
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[flag] = losses, load_file(folder / "model.safetensors")
    (fast, fast_w), (full, full_w) = runs["--compact-vocab"], runs["--no-compact-vocab"]
    assert fast == pytest.approx(full, rel=1e-4) and fast[0] != fast[-1]
    assert fast_w.keys() == full_w.keys()
    for name in full_w:
        assert torch.allclose(fast_w[name], full_w[name], atol=1e-5), name


def test_compact_vocab_refuses_a_token_it_does_not_hold():
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.pretrain_llm import CompactVocab

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    compact = CompactVocab(model, [0, 3, 7], [3, 7])
    assert torch.equal(compact(torch.tensor([7, 3])), model.get_input_embeddings().weight[[7, 3]])
    assert not model.get_input_embeddings().weight.requires_grad
    assert {id(p) for p in compact.parameters()} >= {id(compact.embed), id(compact.head)}
    with pytest.raises(ValueError, match=r"\[5\] are not in the compact vocabulary"):
        compact(torch.tensor([3, 5]))
    with torch.no_grad():
        compact.embed += 1.0
    compact.write_back()
    assert torch.equal(model.get_input_embeddings().weight[[0, 3, 7]], compact.embed)
