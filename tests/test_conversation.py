"""Templates, SQ conversion and label masks (spec 3) checked against an independent model of the reference:
SentencePiece itself run the way transformers 4.31's legacy LlamaTokenizer runs it, and spec 3.4's length arithmetic."""
from __future__ import annotations

import math
import random
import re

import pytest

from sqllava_edge.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from sqllava_edge.conversation import (TEMPLATES, Turn, answer_prompt, chat_append_ids, describe_prompt, render,
                                       self_question_prompt, sq_convert, to_turns, tokenize_conversation)
from sqllava_edge.errors import PromptTooLongError
from sqllava_edge.tokenizer import default_tokenizer, tokenizer_image_token
from sqllava_edge.vocab import read_spm_vocab, spm_model_bytes, vocab_dir

# Spec 3.2, copied verbatim (note "questions.Also").
SPEC_SYSTEM_V1_SQ = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions.Also, the artificial intelligence assistant is a curious virtual "
    "user. The virtual user asks complex questions that are relevant to the content in the image, for example, asking "
    "about background knowledge of the objects in the image, asking to discuss about events happening in the image, "
    "etc. Again, do not ask about uncertain details.")
SPEC_SYSTEM_V1 = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the user's questions.")
SPEC_SYSTEM_LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                        "helpful, detailed, and polite answers to the human's questions.")

Q1, A1 = "What is the man holding?", "He is holding a red umbrella above his head."
Q2 = "What might the weather be like in this scene, given what people carry?"
A2 = "It is probably raining: the street looks wet and several people carry umbrellas."
Q3, A3 = "Is it day or night?\nAnswer the question using a single word or phrase.", "Day"


@pytest.fixture(scope="module")
def tok():
    try:
        vocab_dir()
    except RuntimeError as err:
        pytest.skip(f"the Llama-2 vocabulary needs PyPI access once (pip download of llama-cpp-python): {err}")
    return default_tokenizer()


@pytest.fixture(scope="module")
def reference(tok):
    """(ids, labels) the reference code would produce for a rendered string, or labels=None on its mismatch."""
    spm = pytest.importorskip("sentencepiece", reason="the reference model needs the sentencepiece package")
    sp = spm.SentencePieceProcessor(model_proto=spm_model_bytes(read_spm_vocab()))
    special = {"<s>": 1, "</s>": 2, "<unk>": 0}

    def slow_legacy(text: str) -> list[int]:  # transformers 4.31 LlamaTokenizer, legacy=True
        ids = []
        for piece in re.split(r"(<s>|</s>|<unk>)", text):
            ids += [special[piece]] if piece in special else sp.encode(piece) if piece else []
        return ids

    def image_token(text: str, has_image: bool) -> list[int]:  # spec 1.5, each chunk with BOS, BOS kept once
        chunks = text.split("<image>") if has_image else [text]
        ids = [1] + slow_legacy(chunks[0])
        for chunk in chunks[1:]:
            ids += [IMAGE_TOKEN_INDEX] + slow_legacy(chunk)
        return ids

    def labels_by_arithmetic(text: str, ids: list[int], template: str, has_image: bool) -> list[int] | None:
        n = lambda s: len(image_token(s, has_image))  # noqa: E731  (includes the chunk's BOS)
        sep = " ASSISTANT: "
        labels, cur = list(ids), 1
        labels[0] = IGNORE_INDEX
        for rou in text.split("</s>"):  # spec 3.4
            if rou == "":
                break
            if sep in rou:
                parts = rou.split(sep)
                if len(parts) != 2:
                    break
                round_len, instruction_len = n(rou), n(parts[0] + sep) - 2
            elif template == "v1_sq":
                round_len, instruction_len = n(rou), n("VUSER: ") - 2
            else:
                break
            labels[cur:cur + instruction_len] = [IGNORE_INDEX] * len(labels[cur:cur + instruction_len])
            cur += round_len
        labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
        labels = [IGNORE_INDEX if i == IMAGE_TOKEN_INDEX else label for i, label in zip(ids, labels)]
        return labels if cur == len(ids) else None  # the reference's "tokenization mismatch": all masked

    def run(template: str, turns, has_image: bool):
        text = render(template, turns)
        ids = image_token(text, has_image)
        return ids, labels_by_arithmetic(text, ids, template, has_image)

    return run


def spans(tok, ids, labels):
    """Decoded runs of trained and of masked tokens, in order: [(trained?, text), ...]."""
    runs: list[tuple[bool, list[int]]] = []
    for i, label in zip(ids, labels):
        trained = label != IGNORE_INDEX
        if not runs or runs[-1][0] != trained:
            runs.append((trained, []))
        runs[-1][1].append(i)
    return [(trained, tok.decode(run, skip_special_tokens=False)) for trained, run in runs]


SPEC_EXAMPLE = [Turn("user", "<image>\n" + Q1), Turn("assistant", A1), Turn("vuser", Q2), Turn("assistant", A2),
                Turn("user", Q3), Turn("assistant", A3)]

CASES = {  # name: (template, turns, has_image)
    "spec_3_3_example": ("v1_sq", SPEC_EXAMPLE, True),
    "v1_two_rounds": ("v1", [Turn("user", "<image>\n" + Q1), Turn("assistant", A1), Turn("user", Q2),
                             Turn("assistant", A2)], True),
    "vicuna_v1_one_round": ("vicuna_v1", [Turn("user", "<image>\n" + Q3), Turn("assistant", A3)], True),
    "llava_v1_one_round": ("llava_v1", [Turn("user", "<image>\n" + Q1), Turn("assistant", A1)], True),
    "v1_sq_without_sq": ("v1_sq", [Turn("user", "<image>\n" + Q1), Turn("assistant", A1), Turn("user", Q2),
                                   Turn("assistant", A2)], True),
    "v1_sq_two_vusers": ("v1_sq", [Turn("user", "<image>\n" + Q1), Turn("assistant", A1), Turn("vuser", Q2),
                                   Turn("assistant", A2), Turn("vuser", Q3), Turn("assistant", A3)], True),
    "v1_text_only": ("v1", [Turn("user", "Write a haiku about rain."), Turn("assistant", "Soft rain on the roof")],
                     False),
    "odd_whitespace_unicode": ("v1_sq", [
        Turn("user", "<image>\nList   the items  ."),
        Turn("assistant", "\n1. 🦙 llama\n2. 中文 sign\n\n3.  two  spaces"),
        Turn("vuser", "  Why is 42 written on it?  "), Turn("assistant", "\tIt is the house number."),
        Turn("user", "Thanks!"), Turn("assistant", " ")], True),
}


def test_system_prompts_are_verbatim():
    assert TEMPLATES["v1_sq"].system == SPEC_SYSTEM_V1_SQ
    assert TEMPLATES["v1"].system == TEMPLATES["vicuna_v1"].system == SPEC_SYSTEM_V1
    assert TEMPLATES["llava_v1"].system == SPEC_SYSTEM_LLAVA_V1


def test_spec_example_renders_to_the_byte():
    turns = [Turn("user", "<image>\nQ1"), Turn("assistant", "A1"), Turn("vuser", "Q2"), Turn("assistant", "A2"),
             Turn("user", "Q3"), Turn("assistant", "A3")]
    expected = (SPEC_SYSTEM_V1_SQ
                + " USER: <image>\nQ1 ASSISTANT: A1</s>VUSER: Q2</s> ASSISTANT: A2</s>USER: Q3 ASSISTANT: A3</s>")
    assert render("v1_sq", turns) == expected


@pytest.mark.parametrize("name", sorted(CASES))
def test_ids_and_labels_equal_the_reference(tok, reference, name):
    template, turns, has_image = CASES[name]
    ref_ids, ref_labels = reference(template, turns, has_image)
    ids, labels = tokenize_conversation(tok, template, turns, has_image)
    assert ids == ref_ids == tokenizer_image_token(tok, render(template, turns), add_bos=True)
    assert ids.count(IMAGE_TOKEN_INDEX) == int(has_image) and ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert ref_labels is not None, "the reference itself would drop this sample"
    assert labels == ref_labels


def test_spec_example_label_table(tok):
    """Spec 3.4's table, span by span, on realistic text."""
    result = tokenize_conversation(tok, "v1_sq", SPEC_EXAMPLE)
    assert spans(tok, result.ids, result.labels) == [
        (False, f"<s> {SPEC_SYSTEM_V1_SQ} USER: <image>\n{Q1} ASSISTANT:"),
        (True, f"{A1}</s>"),
        (False, "VUSER:"),
        (True, f"{Q2}</s>"),
        (False, " ASSISTANT:"),
        (True, f"{A2}</s>"),
        (False, f"USER: {Q3} ASSISTANT:"),
        (True, f"{A3}</s>"),
    ]
    assert result.n_trainable == sum(label != IGNORE_INDEX for label in result.labels) > 0
    assert not result.truncated and result.text == render("v1_sq", SPEC_EXAMPLE)


def test_v1_label_spans(tok):
    template, turns, _ = CASES["v1_two_rounds"]
    ids, labels = tokenize_conversation(tok, template, turns)
    assert spans(tok, ids, labels) == [(False, f"<s> {SPEC_SYSTEM_V1} USER: <image>\n{Q1} ASSISTANT:"),
                                       (True, f"{A1}</s>"), (False, f"USER: {Q2} ASSISTANT:"), (True, f"{A2}</s>")]


@pytest.mark.parametrize("caption", ["A red bus parked by a brick building.", "  two spaces, 🦙 and\nnewline"])
def test_plain_stage1(tok, caption):
    turns = to_turns([{"from": "human", "value": "Describe this.\n<image>"}, {"from": "gpt", "value": caption}])
    assert render("plain", turns) == "<image>" + caption + "\n"  # spec 3.5: the instruction is dropped
    result = tokenize_conversation(tok, "plain", turns)
    assert result.ids == [tok.bos_id, IMAGE_TOKEN_INDEX] + tok.encode(caption + "\n")
    assert result.labels[:2] == [IGNORE_INDEX] * 2 and result.labels[2:] == result.ids[2:]
    assert tok.eos_id not in result.ids and tok.decode(result.labels[2:]) == caption + "\n"
    assert answer_prompt(tok, "ignored", template="plain") == [tok.bos_id, IMAGE_TOKEN_INDEX]


def test_never_silently_all_masked(tok, reference):
    """Texts that break the reference's length arithmetic still get correct labels here."""
    answer = "The sign says ' ASSISTANT: open' in blue letters."
    turns = [Turn("user", "<image>\nWhat does the sign say?"), Turn("assistant", answer)]
    ref_ids, ref_labels = reference("v1_sq", turns, True)
    ids, labels = tokenize_conversation(tok, "v1_sq", turns)
    assert ref_labels is None and ids == ref_ids  # the reference would drop this sample
    assert [text for trained, text in spans(tok, ids, labels) if trained] == [answer + "</s>"]


@pytest.mark.parametrize("n_cut", [None, 0, 1, 2, 9, 40])
def test_truncation(tok, n_cut):
    full = tokenize_conversation(tok, "v1_sq", SPEC_EXAMPLE)
    keep = len(full.ids) - (n_cut or 0)
    result = tokenize_conversation(tok, "v1_sq", SPEC_EXAMPLE, max_length=None if n_cut is None else keep)
    assert result.ids == full.ids[:keep] and result.labels == full.labels[:keep]
    assert result.truncated == bool(n_cut)
    lost = [label for label in full.labels[keep:] if label != IGNORE_INDEX]
    assert result.n_trainable_cut == len(lost) and result.n_trainable == full.n_trainable - len(lost)
    if n_cut:  # the conversation ends with the target "A3</s>", so any cut loses targets
        assert result.n_trainable_cut > 0


def test_truncation_of_an_open_prompt_cuts_nothing_trainable(tok):
    turns = [*SPEC_EXAMPLE[:2], Turn("user", Q2), Turn("assistant", None)]
    full = tokenize_conversation(tok, "v1_sq", turns)
    result = tokenize_conversation(tok, "v1_sq", turns, max_length=len(full.ids) - 5)
    assert result.truncated and result.n_trainable_cut == 0 and result.n_trainable == full.n_trainable


def test_truncation_never_drops_the_image(tok):
    with pytest.raises(PromptTooLongError, match="image placeholder"):
        tokenize_conversation(tok, "v1_sq", SPEC_EXAMPLE, max_length=20)


@pytest.mark.parametrize("template,turns,has_image,match", [
    ("v1", SPEC_EXAMPLE, True, "no 'vuser' role"),
    ("v1_sq", [Turn("user", "<image>\nq"), Turn("user", "q")], True, "alternate"),
    ("v1_sq", [Turn("assistant", "a")], True, "alternate"),
    ("v1_sq", [Turn("vuser", "<image>\nq"), Turn("assistant", "a")], True, "first turn must be a user"),
    ("v1_sq", [Turn("user", "<image>\nq"), Turn("assistant", None), Turn("user", "x")], True, "only the last"),
    ("v1_sq", [Turn("user", "q"), Turn("assistant", "a")], True, "exactly one '<image>'"),
    ("v1_sq", [Turn("user", "<image>\nq <image>"), Turn("assistant", "a")], True, "exactly one '<image>'"),
    ("v1", [Turn("user", "<image>\nq"), Turn("assistant", "a")], False, "text-only"),
    ("plain", [Turn("user", "<image>"), Turn("assistant", "a"), Turn("user", "q"), Turn("assistant", "a")], True,
     "exactly"),
    ("v2", SPEC_EXAMPLE, True, "unknown conversation template"),
    ("v1_sq", [], True, "at least one turn"),
])
def test_bad_conversations_are_clear_errors(tok, template, turns, has_image, match):
    with pytest.raises(ValueError, match=match):
        tokenize_conversation(tok, template, turns, has_image)


def test_turn_validation():
    with pytest.raises(ValueError, match="role"):
        Turn("system", "x")
    with pytest.raises(ValueError, match="str or None"):
        Turn("user", 3)


# --- SQ conversion (spec 3.3) --------------------------------------------------------------------------------------

def llava(*values: str, first: str = "human") -> list[dict]:
    roles = ("human", "gpt") if first == "human" else ("gpt", "human")
    return [{"from": roles[j % 2], "value": value} for j, value in enumerate(values)]


@pytest.mark.parametrize("sq_r", [0.3, 0.5])
def test_sq_rate_matches_sq_r(sq_r):
    rng, reads = random.Random(1234), 4000
    sample = llava("<image>\nQ1", "A1", "Q2", "A2")
    converted = 0
    for _ in range(reads):
        turns = sq_convert(sample, sq_r, rng)
        assert turns[0].role == "user" and [t.role for t in turns[1::2]] == ["assistant", "assistant"]
        converted += turns[2].role == "vuser"
    bound = 4.5 * math.sqrt(sq_r * (1 - sq_r) / reads)  # binomial standard error; a false alarm is ~1e-5
    assert abs(converted / reads - sq_r) < bound


@pytest.mark.parametrize("sample,has_image,roles", [
    (llava("<image>\nQ1", "A1", "Q2", "A2", "Q3", "A3"), True, ["user", "assistant", "vuser", "assistant", "vuser",
                                                                 "assistant"]),
    (llava("<image>\nQ1", "A1"), True, ["user", "assistant"]),  # single turn: never SQ
    (llava("Q1", "A1", "Q2", "A2"), False, ["user", "assistant", "user", "assistant"]),  # text-only: never SQ
    (llava("stray", "<image>\nQ1", "A1", "Q2", "A2", first="gpt"), True, ["user", "assistant", "vuser", "assistant"]),
])
def test_sq_convert_structure(sample, has_image, roles):
    turns = sq_convert(sample, 1.0, random.Random(0), has_image)
    assert [t.role for t in turns] == roles
    assert [t.text for t in turns] == [item["value"] for item in sample if item["value"] != "stray"]


def test_sq_convert_draws_from_rng_and_keeps_explicit_vuser():
    sample = llava("<image>\nQ1", "A1", "Q2", "A2", "Q3", "A3", "Q4", "A4")
    runs = [[t.role for t in sq_convert(sample, 0.5, random.Random(seed))] for seed in range(20)]
    assert runs == [[t.role for t in sq_convert(sample, 0.5, random.Random(seed))] for seed in range(20)]
    assert len({tuple(run) for run in runs}) > 1  # the choice changes between reads
    explicit = [{"from": "human", "value": "<image>\nQ1"}, {"from": "gpt", "value": "A1"},
                {"from": "vuser", "value": "Q2"}, {"from": "gpt", "value": "A2"}]
    assert [t.role for t in sq_convert(explicit, 0.0, random.Random(0))] == ["user", "assistant", "vuser", "assistant"]


@pytest.mark.parametrize("value,expected", [
    ("What is this?\n<image>", "<image>\nWhat is this?"),
    ("<image>What is this?  ", "<image>\nWhat is this?"),
    ("<image>", "<image>"),
])
def test_image_placeholder_moves_to_the_front(value, expected):
    assert to_turns(llava(value, "A"))[0].text == expected


@pytest.mark.parametrize("conversations,sq_r,match", [
    (llava("<image>\nQ1", "A1") + [{"from": "gpt", "value": "A2"}], 0.5, "alternate"),
    ([{"from": "human", "value": "<image>\nQ"}, {"from": "system", "value": "x"}], 0.5, "'from'"),
    ([{"from": "gpt", "value": "only"}], 0.5, "no human turn"),
    (llava("<image>\nQ1", "A1"), 1.5, "probability"),
])
def test_sq_convert_errors(conversations, sq_r, match):
    with pytest.raises(ValueError, match=match):
        sq_convert(conversations, sq_r, random.Random(0))


# --- prompts (spec 5) ----------------------------------------------------------------------------------------------

def test_answer_and_describe_prompts(tok):
    question = "What color is the bus?\nAnswer the question using a single word or phrase."
    expected = f"{SPEC_SYSTEM_V1} USER: <image>\n{question} ASSISTANT:"
    assert answer_prompt(tok, question, template="v1") == tokenizer_image_token(tok, expected)
    assert answer_prompt(tok, "<image> " + question, template="v1") == tokenizer_image_token(tok, expected)
    describe = f"{SPEC_SYSTEM_V1_SQ} USER: <image>\nCan you describe the image in detail? ASSISTANT:"
    assert describe_prompt(tok) == tokenizer_image_token(tok, describe)
    history = [Turn("user", Q1), Turn("assistant", A1)]
    with_history = f"{SPEC_SYSTEM_V1_SQ} USER: <image>\n{Q1} ASSISTANT: {A1}</s>USER: {Q2} ASSISTANT:"
    assert answer_prompt(tok, Q2, history=history) == tokenizer_image_token(tok, with_history)
    assert answer_prompt(tok, "hi", template="v1", has_image=False) == \
        tokenizer_image_token(tok, f"{SPEC_SYSTEM_V1} USER: hi ASSISTANT:")


@pytest.mark.parametrize("description", [A2, f"  {A2}</s>", f"{A2}\n"])
def test_self_question_prompt(tok, description):
    expected = (f"{SPEC_SYSTEM_V1_SQ} USER: <image>\nCan you describe the image in detail? ASSISTANT: {A2}</s>"
                "VUSER:")
    ids = self_question_prompt(tok, description)
    assert ids == tokenizer_image_token(tok, expected)
    assert ids[-4:] == tok.encode("</s>VUSER:")[-4:] and ids.count(tok.eos_id) == 1


def test_self_question_prompt_needs_vuser_role(tok):
    with pytest.raises(ValueError, match="vuser"):
        self_question_prompt(tok, A1, template="v1")


CHATS = {  # name: (template, history, question, text the appended ids spell)
    "first_question": ("v1_sq", [], Q1, None),
    "second_question": ("v1_sq", [Turn("user", Q1), Turn("assistant", A1)], Q2, f"USER: {Q2} ASSISTANT:"),
    "third_question_v1": ("v1", [Turn("user", Q1), Turn("assistant", A1), Turn("user", Q2), Turn("assistant", A2)],
                          Q3, f"USER: {Q3} ASSISTANT:"),
    "answer_own_question": ("v1_sq", [Turn("user", Q1), Turn("assistant", A1), Turn("vuser", Q2)], None,
                            " ASSISTANT:"),
    "question_after_answered_sq": ("v1_sq", [Turn("user", Q1), Turn("assistant", A1), Turn("vuser", Q2),
                                             Turn("assistant", A2)], Q3, f"USER: {Q3} ASSISTANT:"),
}


def with_image(turns):
    return [Turn(turns[0].role, "<image>\n" + turns[0].text), *turns[1:]]


@pytest.mark.parametrize("name", sorted(CHATS))
def test_chat_append_prefills_only_new_tokens(tok, name):
    template, history, question, appended_text = CHATS[name]
    new = [Turn("assistant", None)] if question is None else [Turn("user", question), Turn("assistant", None)]
    full = tokenize_conversation(tok, template, with_image([*history, *new])).ids
    appended = chat_append_ids(tok, history, question, template)
    prefix = full[: len(full) - len(appended)]
    assert prefix + appended == full
    if history:  # the cache holds the history up to its last EOS; the new ids restart after it
        assert prefix == tokenizer_image_token(tok, render(template, with_image(history)).rstrip(" "))
        assert prefix[-1] == tok.eos_id and tok.decode(appended, skip_special_tokens=False) == appended_text
    else:
        assert appended == full == answer_prompt(tok, question, template)


@pytest.mark.parametrize("history,question,match", [
    ([Turn("user", Q1)], Q2, "finished assistant or vuser"),
    ([Turn("user", Q1), Turn("assistant", A1)], None, "vuser"),
    ([], None, "needs a question"),
])
def test_chat_append_errors(tok, history, question, match):
    with pytest.raises(ValueError, match=match):
        chat_append_ids(tok, history, question)
