"""Conversation templates, the self-questioning (SQ) conversion, label masks and prompt ids (spec 3 and 5).

A conversation is a list of `Turn(role, text)` with roles "user", "assistant" and "vuser" (the paper's `[vusr]`: the
model asking a question about the image). `text=None` marks the open turn the model is to write; it renders as
"ROLE:". Rendering follows the reference templates byte for byte (spec 3.2-3.3). Token ids are the reference
tokenization of the rendered string (`tokenizer_image_token`, spec 1.5); labels come from which characters of the
rendered string are targets, so they never depend on length arithmetic and never fall into the reference's silent
"tokenization mismatch" (spec 3.4, 8.8).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

from sqllava_edge.config import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from sqllava_edge.errors import PromptTooLongError
from sqllava_edge.tokenizer import Tokenizer

__all__ = ["Turn", "Template", "TEMPLATES", "get_template", "render", "TokenizedConversation", "tokenize_conversation",
           "to_turns", "sq_convert", "prompt_ids", "answer_prompt", "describe_prompt", "self_question_prompt", "interview_prompt",
           "chat_append_ids", "DESCRIBE_QUESTION"]

ROLES = ("user", "assistant", "vuser")
EOS_TEXT = "</s>"  # what the reference appends to a converted SQ question (spec 3.3)
DESCRIBE_QUESTION = "Can you describe the image in detail?"  # spec 5.1 step 3

SYSTEM_V1 = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the user's questions.")
# Spec 3.2: verbatim, including the missing space in "questions.Also".
SYSTEM_V1_SQ = SYSTEM_V1 + (
    "Also, the artificial intelligence assistant is a curious virtual user. The virtual user asks complex questions "
    "that are relevant to the content in the image, for example, asking about background knowledge of the objects in "
    "the image, asking to discuss about events happening in the image, etc. Again, do not ask about uncertain details.")
SYSTEM_LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions.")


@dataclass(frozen=True)
class Turn:
    role: str  # "user" | "assistant" | "vuser"
    text: str | None  # None: the open turn the model writes next

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"Turn role {self.role!r} is not one of {ROLES}")
        if self.text is not None and not isinstance(self.text, str):
            raise ValueError(f"Turn text must be a str or None, got {type(self.text).__name__}")


@dataclass(frozen=True)
class Template:
    """A reference conversation template (spec 3.2). style "two": system + sep, then per message i
    `ROLE: text` + (sep if i even else sep2); style "plain": "<image>" + caption + sep (spec 3.5)."""

    name: str
    system: str
    roles: Mapping[str, str]  # our role -> the role string rendered
    style: str = "two"
    sep: str = " "
    sep2: str = "</s>"


_V1_ROLES = {"user": "USER", "assistant": "ASSISTANT"}
TEMPLATES: dict[str, Template] = {
    "v1": Template("v1", SYSTEM_V1, _V1_ROLES),
    "vicuna_v1": Template("vicuna_v1", SYSTEM_V1, _V1_ROLES),
    "v1_sq": Template("v1_sq", SYSTEM_V1_SQ, {**_V1_ROLES, "vuser": "VUSER"}),
    "llava_v1": Template("llava_v1", SYSTEM_LLAVA_V1, _V1_ROLES),
    "plain": Template("plain", "", {"user": "", "assistant": ""}, style="plain", sep="\n", sep2="\n"),
}


def get_template(template: str | Template) -> Template:
    """Look a template up by exact name (unlike the reference, an unknown name is an error, not vicuna_v1)."""
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown conversation template {template!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[template]


def _check_turns(tpl: Template, turns: Sequence[Turn]) -> None:
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    for i, turn in enumerate(turns):
        if not isinstance(turn, Turn):
            raise ValueError(f"turn {i} is a {type(turn).__name__}, expected Turn(role, text)")
        if turn.role not in tpl.roles:
            raise ValueError(f"template {tpl.name!r} has no {turn.role!r} role (self-questioning needs 'v1_sq')")
        if turn.text is None and i != len(turns) - 1:
            raise ValueError(f"only the last turn may be open (text=None); turn {i} is open")
        human_side = turn.role in ("user", "vuser")
        if human_side != (i % 2 == 0):
            raise ValueError(f"turns must alternate user/vuser and assistant starting with a user turn; turn {i} "
                             f"is {turn.role!r}")
    if turns[0].role != "user":
        raise ValueError("the first turn must be a user turn (it carries the image)")
    if tpl.style == "plain" and (len(turns) != 2 or turns[1].role != "assistant"):
        raise ValueError("the 'plain' template (stage 1) takes exactly [user, assistant(caption or None)] turns")


def _render_spans(tpl: Template, turns: Sequence[Turn]) -> list[tuple[str, bool]]:
    """The rendered string as consecutive (text, is_target) pieces (spec 3.2-3.5)."""
    _check_turns(tpl, turns)
    if tpl.style == "plain":  # spec 3.5: the instruction is dropped; the caption + "\n" is the target, no EOS
        caption = turns[1].text
        return [(IMAGE_PLACEHOLDER, False)] + ([(caption + tpl.sep, True)] if caption is not None else [])
    spans = [(tpl.system + tpl.sep, False)]
    for i, turn in enumerate(turns):
        role = tpl.roles[turn.role]
        sep = tpl.sep if i % 2 == 0 else tpl.sep2
        if turn.text is None:
            spans.append((role + ":", False))
        elif turn.role == "user":  # spec 3.4: the instruction and role prefixes are never trained
            spans.append((f"{role}: {turn.text}{sep}", False))
        elif turn.role == "assistant":  # the answer + its "</s>" are trained (QA)
            spans += [(role + ":", False), (f" {turn.text}{sep}", True)]
        else:  # vuser: the question + the "</s>" appended to it are trained (SQ); its separator " " is not
            spans += [(role + ":", False), (f" {turn.text}{EOS_TEXT}", True), (sep, False)]
    return spans


def render(template: str | Template, turns: Sequence[Turn]) -> str:
    """The prompt string exactly as the reference template renders it."""
    return "".join(text for text, _ in _render_spans(get_template(template), turns))


@dataclass
class TokenizedConversation:
    """Token ids and labels of one conversation. Unpacks as `ids, labels = tokenize_conversation(...)`."""

    ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss
    n_trainable: int  # labels != IGNORE_INDEX after truncation
    truncated: bool = False  # max_length cut anything
    n_trainable_cut: int = 0  # target tokens lost to truncation
    text: str = field(default="", repr=False)  # the rendered string

    def __iter__(self) -> Iterator[list[int]]:
        return iter((self.ids, self.labels))


def tokenize_conversation(tokenizer: Tokenizer, template: str | Template, turns: Sequence[Turn],
                          has_image: bool = True, max_length: int | None = None) -> TokenizedConversation:
    """Ids = `tokenizer_image_token(render(template, turns))` (one IMAGE_TOKEN_INDEX where "<image>" stood, BOS first);
    labels = ids on target characters (answers, SQ questions, their "</s>"), IGNORE_INDEX elsewhere (spec 3.4).
    `max_length` truncates ids and labels together (the reference collator's model_max_length, spec 1.5)."""
    tpl = get_template(template)
    spans = _render_spans(tpl, turns)
    text = "".join(piece for piece, _ in spans)
    _check_image_count(text, has_image)
    target = [flag for piece, flag in spans for _ in piece]  # one flag per character of `text`
    ids, offsets = _encode_with_offsets(tokenizer, text, has_image)
    labels = [IGNORE_INDEX]  # BOS
    for tok, (start, end) in zip(ids[1:], offsets[1:]):
        flags = target[start:max(end, start + 1)]
        # Targets start before a space or right after "</s>"/"<image>", where tokens always break (no piece of the
        # Llama vocabulary holds "▁" after another character), so a token never straddles a target boundary.
        assert all(f == flags[0] for f in flags), f"token {tok} straddles a target boundary at {start}:{end}"
        labels.append(tok if flags[0] and tok != IMAGE_TOKEN_INDEX else IGNORE_INDEX)
    result = TokenizedConversation(ids, labels, 0, text=text)
    if max_length is not None and len(ids) > max_length:
        if IMAGE_TOKEN_INDEX in ids[max_length:]:
            raise PromptTooLongError(f"max_length={max_length} would cut the image placeholder at position "
                                     f"{ids.index(IMAGE_TOKEN_INDEX)}; raise max_length")
        result.n_trainable_cut = sum(label != IGNORE_INDEX for label in labels[max_length:])
        result.ids, result.labels, result.truncated = ids[:max_length], labels[:max_length], True
    result.n_trainable = sum(label != IGNORE_INDEX for label in result.labels)
    return result


def _check_image_count(text: str, has_image: bool) -> None:
    count = text.count(IMAGE_PLACEHOLDER)
    if has_image and count != 1:
        raise ValueError(f"an image conversation needs exactly one {IMAGE_PLACEHOLDER!r} (found {count}); put it at "
                         "the start of the first user turn (to_turns/sq_convert and the prompt builders do this)")
    if not has_image and count:
        raise ValueError(f"a text-only conversation contains {IMAGE_PLACEHOLDER!r}; pass has_image=True with an image")


def _encode_with_offsets(tokenizer: Tokenizer, text: str,
                         has_image: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """tokenizer_image_token (spec 1.5) that also returns each token's character span in `text`."""
    ids, offsets = [tokenizer.bos_id], [(0, 0)]
    pos = 0
    for k, chunk in enumerate(text.split(IMAGE_PLACEHOLDER) if has_image else [text]):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
            offsets.append((pos, pos + len(IMAGE_PLACEHOLDER)))
            pos += len(IMAGE_PLACEHOLDER)
        chunk_ids, chunk_offsets = tokenizer.encode_with_offsets(chunk)
        ids += chunk_ids
        offsets += [(pos + start, pos + end) for start, end in chunk_offsets]
        pos += len(chunk)
    return ids, offsets


# --- LLaVA JSON -> turns (spec 3.3, 3.5) -------------------------------------------------------------------------

_FROM_ROLE = {"human": "user", "gpt": "assistant", "vuser": "vuser"}


def to_turns(conversations: Sequence[Mapping[str, str]], has_image: bool = True) -> list[Turn]:
    """LLaVA JSON turns ({"from": "human"|"gpt"|"vuser", "value": ...}) -> Turns, as the reference prepares them:
    a leading gpt turn is dropped, and with an image every turn holding "<image>" is rewritten to
    "<image>\\n" + the rest stripped (preprocess_multimodal, spec 1.5). Roles must alternate."""
    turns = []
    for j, item in enumerate(conversations):
        valid = isinstance(item, Mapping) and item.get("from") in _FROM_ROLE and isinstance(item.get("value"), str)
        if not valid:
            raise ValueError(f"conversation turn {j} must be {{'from': 'human'|'gpt'|'vuser', 'value': str}}, "
                             f"got {item!r}")
        text = item["value"]
        if has_image and IMAGE_PLACEHOLDER in text:
            text = (IMAGE_PLACEHOLDER + "\n" + text.replace(IMAGE_PLACEHOLDER, "").strip()).strip()
        turns.append(Turn(_FROM_ROLE[item["from"]], text))
    if turns and turns[0].role == "assistant":  # the reference drops a conversation-opening gpt turn
        turns = turns[1:]
    if not turns:
        raise ValueError("the conversation has no human turn")
    for j, turn in enumerate(turns):
        if (turn.role != "assistant") != (j % 2 == 0):
            raise ValueError(f"conversation turns must alternate human and gpt; turn {j} (after dropping a leading "
                             f"gpt turn) is {turn.role!r}")
    return turns


def sq_convert(conversations: Sequence[Mapping[str, str]], sq_r: float, rng: random.Random,
               has_image: bool = True) -> list[Turn]:
    """Spec 3.3 (preprocess_v1_sq2): each human turn after the first becomes a VUSER turn with probability `sq_r`,
    drawn from `rng` on every call (the reference redraws on every read of a sample). The first human turn, text-only
    samples and single-turn samples never get SQ. An explicit "vuser" turn in the data stays VUSER."""
    if not 0.0 <= sq_r <= 1.0:
        raise ValueError(f"sq_r must be a probability in [0, 1], got {sq_r}")
    turns = to_turns(conversations, has_image)
    if not has_image:
        return turns
    return [Turn("vuser", turn.text) if turn.role == "user" and j > 0 and rng.random() < sq_r else turn
            for j, turn in enumerate(turns)]


# --- prompts for inference (spec 5) ------------------------------------------------------------------------------

def _place_image(turns: Sequence[Turn], has_image: bool) -> list[Turn]:
    """Put "<image>\\n" at the start of the first user turn (moving it there if the text already holds it)."""
    turns = list(turns)
    if has_image and turns and turns[0].text is not None:
        rest = turns[0].text.replace(IMAGE_PLACEHOLDER, "").strip()
        turns[0] = Turn(turns[0].role, (IMAGE_PLACEHOLDER + "\n" + rest).strip())
    return turns


def prompt_ids(tokenizer: Tokenizer, turns: Sequence[Turn], template: str | Template = "v1_sq",
               has_image: bool = True) -> list[int]:
    """Ids of a prompt (last turn usually open) with the image placed in the first user turn."""
    return tokenize_conversation(tokenizer, template, _place_image(turns, has_image), has_image).ids


def answer_prompt(tokenizer: Tokenizer, question: str, template: str | Template = "v1_sq",
                  history: Sequence[Turn] = (), has_image: bool = True) -> list[int]:
    """Ids of `{system} USER: <image>\\n{question} ASSISTANT:`, after any finished `history` turns; they end at
    "ASSISTANT:"."""
    return prompt_ids(tokenizer, [*history, Turn("user", question), Turn("assistant", None)], template, has_image)


def describe_prompt(tokenizer: Tokenizer, template: str | Template = "v1_sq", has_image: bool = True) -> list[int]:
    """The SQ demo's first question (spec 5.1 step 3)."""
    return answer_prompt(tokenizer, DESCRIBE_QUESTION, template, (), has_image)


def self_question_prompt(tokenizer: Tokenizer, description: str, template: str | Template = "v1_sq") -> list[int]:
    """Spec 5.1 step 4:
    `{system} USER: <image>\\nCan you describe the image in detail? ASSISTANT: {description}</s>VUSER:`.
    The description is stripped of whitespace and of a trailing "</s>", as the demo does with the decoded answer."""
    description = description.strip()
    if description.endswith(EOS_TEXT):
        description = description[: -len(EOS_TEXT)].strip()
    turns = [Turn("user", DESCRIBE_QUESTION), Turn("assistant", description), Turn("vuser", None)]
    return prompt_ids(tokenizer, turns, template, has_image=True)


def interview_prompt(tokenizer: Tokenizer, description: str, question: str,
                     template: str | Template = "v1_sq") -> list[int]:
    """The self-questioning conversation with the model's own question asked, open for its answer:
    `{system} USER: <image>\nCan you describe the image in detail? ASSISTANT: {description}</s>VUSER: {question}</s>
    ASSISTANT:` (a VUSER turn followed by the assistant's answer, as the SQ objective trains it, spec 3.3)."""
    description = description.strip()
    if description.endswith(EOS_TEXT):
        description = description[: -len(EOS_TEXT)].strip()
    turns = [Turn("user", DESCRIBE_QUESTION), Turn("assistant", description), Turn("vuser", question.strip()),
             Turn("assistant", None)]
    return prompt_ids(tokenizer, turns, template, has_image=True)


def chat_append_ids(tokenizer: Tokenizer, history: Sequence[Turn], question: str | None,
                    template: str | Template = "v1_sq", has_image: bool = True) -> list[int]:
    """Ids to append to a running chat so a runtime prefills only the new tokens.

    `history` ends with a finished assistant or vuser turn; the runtime's cache then holds the earlier prompt plus the
    generated reply and its EOS. The returned ids open a new `question` ("USER: ... ASSISTANT:"), or, with
    question=None after a vuser turn, let the assistant answer the model's own question (" ASSISTANT:").
    Guarantee: prompt ids of the history up to its last "</s>" + these ids == the ids of the full new prompt.
    With an empty history this is the whole first prompt.
    """
    if not history:
        if question is None:
            raise ValueError("the first turn of a chat needs a question")
        return answer_prompt(tokenizer, question, template, (), has_image)
    if history[-1].role == "user" or history[-1].text is None:
        raise ValueError("history must end with a finished assistant or vuser turn (text set)")
    if question is None and history[-1].role != "vuser":
        raise ValueError("question=None (answer the model's own question) needs history ending with a vuser turn")
    new = [Turn("assistant", None)] if question is None else [Turn("user", question), Turn("assistant", None)]
    full = prompt_ids(tokenizer, [*history, *new], template, has_image)
    prefix = _history_ids(tokenizer, history, template, has_image)
    if full[: len(prefix)] != prefix:  # cannot happen: tokenization restarts after the special token "</s>"
        raise RuntimeError("internal error: the history's ids are not a prefix of the new prompt's ids")
    return full[len(prefix):]


def _history_ids(tokenizer: Tokenizer, history: Sequence[Turn], template: str | Template,
                 has_image: bool) -> list[int]:
    """Ids of the rendered history up to and including its last "</s>" (what a runtime has in its cache)."""
    text = render(template, _place_image(history, has_image))
    cut = text.rindex(EOS_TEXT) + len(EOS_TEXT)
    _check_image_count(text[:cut], has_image)
    return _encode_with_offsets(tokenizer, text[:cut], has_image)[0]
