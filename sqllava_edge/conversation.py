"""Conversation templates, the self-questioning (SQ) conversion, label masks and prompt ids (docs/spec.md 3 and 5).

A conversation is a list of `Turn(role, text, image=False)` with roles "user", "assistant" and "vuser" (the paper's
`[vusr]`: the model asking a question about the image). `text=None` marks the open turn the model is to write; it
renders as "ROLE:". `image=True` puts the image at the start of that turn (rendered "<image>\n" before the text).
Rendering follows the reference templates byte for byte (docs/spec.md 3.2-3.3).

Where control tokens come from: only the template inserts them. Ids are built segment by segment: BOS,
then runs of text (template words and turn texts together, encoded as plain text), with the template's own "</s>"
after each finished turn inserted as the EOS id and the image position inserted as IMAGE_TOKEN_INDEX. Turn texts and
system prompts are never parsed: "</s>", "<s>", "<unk>" or "<image>" in them stay ordinary characters. For text a
caller cannot be confused about, the ids equal the reference tokenization of the rendered string
(`tokenizer_image_token`, docs/spec.md 1.5, with the checkpoint's `legacy` setting, docs/spec.md 3.4). `render` gives that string
for display and comparisons; ids are never parsed out of it.

The one place where the string "<image>" means the image is LLaVA-format training JSON: `to_turns` / `sq_convert`
turn a human turn holding "<image>" into a Turn with image=True (docs/spec.md 1.5, preprocess_multimodal).

Labels come from which segments are targets, so they never depend on length arithmetic and never fall into the
reference's silent "tokenization mismatch" (docs/spec.md 3.4, 8.8).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Iterator, Mapping, Sequence

from sqllava_edge.config import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from sqllava_edge.errors import PromptTooLongError
from sqllava_edge.tokenizer import Tokenizer

__all__ = ["Turn", "Template", "TEMPLATES", "get_template", "render", "TokenizedConversation", "tokenize_conversation",
           "to_turns", "sq_convert", "prompt_ids", "answer_prompt", "describe_prompt", "self_question_prompt", "interview_prompt",
           "chat_append_ids", "DESCRIBE_QUESTION"]

ROLES = ("user", "assistant", "vuser")
EOS_TEXT = "</s>"  # what the reference appends to a converted SQ question (docs/spec.md 3.3)
DESCRIBE_QUESTION = "Can you describe the image in detail?"  # docs/spec.md 5.1 step 3

SYSTEM_V1 = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the user's questions.")
# docs/spec.md 3.2: verbatim, including the missing space in "questions.Also".
SYSTEM_V1_SQ = SYSTEM_V1 + (
    "Also, the artificial intelligence assistant is a curious virtual user. The virtual user asks complex questions "
    "that are relevant to the content in the image, for example, asking about background knowledge of the objects in "
    "the image, asking to discuss about events happening in the image, etc. Again, do not ask about uncertain details.")
SYSTEM_LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions.")


@dataclass(frozen=True)
class Turn:
    role: str  # "user" | "assistant" | "vuser"
    text: str | None  # plain text, never parsed; None: the open turn the model writes next
    image: bool = False  # the image goes at the start of this turn

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"Turn role {self.role!r} is not one of {ROLES}")
        if self.text is not None and not isinstance(self.text, str):
            raise ValueError(f"Turn text must be a str or None, got {type(self.text).__name__}")
        if not isinstance(self.image, bool):
            raise ValueError(f"Turn image must be True or False, got {self.image!r}")
        if self.image and self.text is None:
            raise ValueError("the open turn (text=None) cannot carry the image; put it on the first user turn")


@dataclass(frozen=True)
class Template:
    """A reference conversation template (docs/spec.md 3.2). style "two": system + sep, then per message i
    `ROLE: text` + (sep if i even else sep2); style "plain": "<image>" + caption + sep (docs/spec.md 3.5)."""

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


def _check_turns(tpl: Template, turns: Sequence[Turn], has_image: bool) -> None:
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
    count = sum(turn.image for turn in turns)
    if has_image and count != 1:
        raise ValueError(f"an image conversation needs exactly one turn with image=True (found {count}); the image "
                         "goes at the start of the first user turn (to_turns/sq_convert and the prompt builders do "
                         "this)")
    if not has_image and count:
        raise ValueError("a text-only conversation has a turn with image=True; pass has_image=True with an image")


@dataclass(frozen=True)
class _Span:
    """One segment of a rendered conversation: text (encoded as plain text) or one control id (BOS/EOS/image)."""

    text: str  # as `render` shows it
    target: bool  # trained (docs/spec.md 3.4)
    control: str | None = None  # None (text) | "eos" | "image"


def _text_or_eos(text: str, target: bool) -> list[_Span]:
    """A template separator: "</s>" is the EOS control token, anything else is text."""
    if text == EOS_TEXT:
        return [_Span(text, target, "eos")]
    return [_Span(text, target)] if text else []


def _turn_text(turn: Turn, target: bool, prefix: str = "") -> list[_Span]:
    """`prefix` + the image (when the turn carries it) + the turn's text, as the reference renders
    "<image>\n" + text (docs/spec.md 1.5)."""
    spans = [_Span(prefix, target)] if prefix else []
    if turn.image:
        spans.append(_Span(IMAGE_PLACEHOLDER, False, "image"))
        if turn.text:
            spans.append(_Span("\n", target))
    return spans + ([_Span(turn.text, target)] if turn.text else [])


def _render_spans(tpl: Template, turns: Sequence[Turn], has_image: bool) -> list[_Span]:
    """The rendered conversation as consecutive segments (docs/spec.md 3.2-3.5), controls where the template puts them."""
    _check_turns(tpl, turns, has_image)
    if tpl.style == "plain":  # docs/spec.md 3.5: the instruction is dropped; the caption + "\n" is the target, no EOS
        caption = turns[1].text
        image = [_Span(IMAGE_PLACEHOLDER, False, "image")] if turns[0].image else []
        return image + ([_Span(caption + tpl.sep, True)] if caption is not None else [])
    spans = [_Span(tpl.system + tpl.sep, False)]
    for i, turn in enumerate(turns):
        role = tpl.roles[turn.role]
        sep = tpl.sep if i % 2 == 0 else tpl.sep2
        if turn.text is None:
            spans.append(_Span(role + ":", False))
        elif turn.role == "user":  # docs/spec.md 3.4: the instruction and role prefixes are never trained
            spans += _turn_text(turn, False, f"{role}: ") + _text_or_eos(sep, False)
        elif turn.role == "assistant":  # the answer + its "</s>" are trained (QA)
            spans += [_Span(role + ":", False), *_turn_text(turn, True, " "), *_text_or_eos(sep, True)]
        else:  # vuser: the question + the "</s>" appended to it are trained (SQ); its separator " " is not
            spans += [_Span(role + ":", False), *_turn_text(turn, True, " "), *_text_or_eos(EOS_TEXT, True),
                      *_text_or_eos(sep, False)]
    return spans


def _with_system(tpl: Template, system: str | None) -> Template:
    if system is None:
        return tpl
    if not isinstance(system, str):
        raise ValueError(f"the system prompt must be a str or None, got {type(system).__name__}")
    return replace(tpl, system=system)


def render(template: str | Template, turns: Sequence[Turn], has_image: bool | None = None, *,
           system: str | None = None) -> str:
    """The prompt string exactly as the reference template renders it, for display and comparisons (ids never come
    from parsing it). has_image=None: whatever the turns say."""
    has_image = any(turn.image for turn in turns) if has_image is None else has_image
    return "".join(span.text for span in _render_spans(_with_system(get_template(template), system), turns,
                                                       has_image))


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
                          has_image: bool = True, max_length: int | None = None, *,
                          system: str | None = None) -> TokenizedConversation:
    """Ids: BOS, then the rendered conversation segment by segment (module docstring): text encoded as plain text,
    the template's "</s>" as EOS, one IMAGE_TOKEN_INDEX at the turn with image=True (exactly one when has_image).
    Labels: ids on targets (answers, SQ questions, their "</s>"), IGNORE_INDEX elsewhere (docs/spec.md 3.4).
    `system` replaces the template's system prompt (plain text). `max_length` truncates ids and labels together
    (the reference collator's model_max_length, docs/spec.md 1.5)."""
    tpl = _with_system(get_template(template), system)
    spans = _render_spans(tpl, turns, has_image)
    ids, targets = _encode_spans(tokenizer, spans)
    labels = [tok if target else IGNORE_INDEX for tok, target in zip(ids, targets)]
    result = TokenizedConversation(ids, labels, 0, text="".join(span.text for span in spans))
    if max_length is not None and len(ids) > max_length:
        if IMAGE_TOKEN_INDEX in ids[max_length:]:
            raise PromptTooLongError(f"max_length={max_length} would cut the image placeholder at position "
                                     f"{ids.index(IMAGE_TOKEN_INDEX)}; raise max_length")
        result.n_trainable_cut = sum(label != IGNORE_INDEX for label in labels[max_length:])
        result.ids, result.labels, result.truncated = ids[:max_length], labels[:max_length], True
    result.n_trainable = sum(label != IGNORE_INDEX for label in result.labels)
    return result


def _encode_spans(tokenizer: Tokenizer, spans: Sequence[_Span]) -> tuple[list[int], list[bool]]:
    """(ids, is_target per id): BOS, then each run of text spans encoded as one plain text (so pieces merge across
    the template/turn boundary as SentencePiece merges them in the reference), control spans as their ids."""
    ids, targets = [tokenizer.bos_id], [False]
    run: list[_Span] = []
    after_eos = False  # text right after the template's "</s>" (legacy=False changes its first token, docs/spec.md 3.4)

    def flush() -> None:
        text = "".join(span.text for span in run)
        flags = [span.target for span in run for _ in span.text]  # one flag per character of `text`
        run_ids, offsets = tokenizer.encode_with_offsets(text, after_special=after_eos)
        for tok, (start, end) in zip(run_ids, offsets):
            chars = flags[start:max(end, start + 1)]
            # Targets start before a space or right after a control token, where tokens always break (no piece of
            # the Llama vocabulary holds "▁" after another character), so a token never straddles a target boundary.
            assert all(f == chars[0] for f in chars), f"token {tok} straddles a target boundary at {start}:{end}"
            ids.append(tok)
            targets.append(chars[0])
        run.clear()

    for span in spans:
        if span.control is None:
            run.append(span)
            continue
        flush()
        ids.append(tokenizer.eos_id if span.control == "eos" else IMAGE_TOKEN_INDEX)
        targets.append(span.target and span.control == "eos")
        after_eos = span.control == "eos"
    flush()
    return ids, targets


# --- LLaVA JSON -> turns (docs/spec.md 3.3, 3.5) ----------------------------------------------------------------------

_FROM_ROLE = {"human": "user", "gpt": "assistant", "vuser": "vuser"}


def to_turns(conversations: Sequence[Mapping[str, str]], has_image: bool = True) -> list[Turn]:
    """LLaVA JSON turns ({"from": "human"|"gpt"|"vuser", "value": ...}) -> Turns, as the reference prepares them:
    a leading gpt turn is dropped, and with an image every turn holding "<image>" becomes a Turn with image=True
    and the rest of its text stripped (rendered "<image>\\n" + rest: preprocess_multimodal, docs/spec.md 1.5). This is the
    one place where the string "<image>" means the image (module docstring). Roles must alternate."""
    turns = []
    for j, item in enumerate(conversations):
        valid = isinstance(item, Mapping) and item.get("from") in _FROM_ROLE and isinstance(item.get("value"), str)
        if not valid:
            raise ValueError(f"conversation turn {j} must be {{'from': 'human'|'gpt'|'vuser', 'value': str}}, "
                             f"got {item!r}")
        text, image = item["value"], has_image and IMAGE_PLACEHOLDER in item["value"]
        if image:
            text = text.replace(IMAGE_PLACEHOLDER, "").strip()
        turns.append(Turn(_FROM_ROLE[item["from"]], text, image))
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
    """docs/spec.md 3.3 (preprocess_v1_sq2): each human turn after the first becomes a VUSER turn with probability `sq_r`,
    drawn from `rng` on every call (the reference redraws on every read of a sample). The first human turn, text-only
    samples and single-turn samples never get SQ. An explicit "vuser" turn in the data stays VUSER."""
    if not 0.0 <= sq_r <= 1.0:
        raise ValueError(f"sq_r must be a probability in [0, 1], got {sq_r}")
    turns = to_turns(conversations, has_image)
    if not has_image:
        return turns
    return [replace(turn, role="vuser") if turn.role == "user" and j > 0 and rng.random() < sq_r else turn
            for j, turn in enumerate(turns)]


# --- prompts for inference (docs/spec.md 5) ---------------------------------------------------------------------------

def _place_image(turns: Sequence[Turn], has_image: bool) -> list[Turn]:
    """The turns with the image on the first one (unless a turn already carries it). Text is left as it is."""
    turns = list(turns)
    if has_image and turns and not any(turn.image for turn in turns) and turns[0].text is not None:
        turns[0] = replace(turns[0], image=True)
    return turns


def prompt_ids(tokenizer: Tokenizer, turns: Sequence[Turn], template: str | Template = "v1_sq",
               has_image: bool = True, *, system: str | None = None) -> list[int]:
    """Prompt ids of a conversation given as structured turns: the entry point for every front door.

    turns: Turn(role, text) with roles "user" / "assistant" / "vuser", alternating and starting with a user turn;
        usually ending with the open turn Turn("assistant", None) (renders "ASSISTANT:", generation follows). Texts
        come from callers and are plain text: "</s>", "<s>", "<unk>", "<image>" and role words in them are encoded
        as the characters they are.
    has_image: the image goes at the start of the first user turn (the only place the model saw it in training), as
        one IMAGE_TOKEN_INDEX the runtime replaces by the image embeddings. No string decides this.
    system: replaces the template's system prompt (plain text); None keeps the template's.
    Returns BOS + ids; the only control ids are the template's: BOS first, EOS after each finished assistant (and
    vuser) turn, one IMAGE_TOKEN_INDEX when has_image.
    """
    return tokenize_conversation(tokenizer, template, _place_image(turns, has_image), has_image, system=system).ids


def answer_prompt(tokenizer: Tokenizer, question: str, template: str | Template = "v1_sq",
                  history: Sequence[Turn] = (), has_image: bool = True) -> list[int]:
    """Ids of `{system} USER: <image>\\n{question} ASSISTANT:`, after any finished `history` turns; they end at
    "ASSISTANT:"."""
    return prompt_ids(tokenizer, [*history, Turn("user", question), Turn("assistant", None)], template, has_image)


def describe_prompt(tokenizer: Tokenizer, template: str | Template = "v1_sq", has_image: bool = True) -> list[int]:
    """The SQ demo's first question (docs/spec.md 5.1 step 3)."""
    return answer_prompt(tokenizer, DESCRIBE_QUESTION, template, (), has_image)


def self_question_prompt(tokenizer: Tokenizer, description: str, template: str | Template = "v1_sq") -> list[int]:
    """docs/spec.md 5.1 step 4:
    `{system} USER: <image>\\nCan you describe the image in detail? ASSISTANT: {description}</s>VUSER:`.
    The description is plain text, stripped of whitespace and of a trailing "</s>" as the demo does with the decoded
    answer; the "</s>" before "VUSER:" is the template's EOS id."""
    description = description.strip()
    if description.endswith(EOS_TEXT):
        description = description[: -len(EOS_TEXT)].strip()
    turns = [Turn("user", DESCRIBE_QUESTION), Turn("assistant", description), Turn("vuser", None)]
    return prompt_ids(tokenizer, turns, template, has_image=True)


def interview_prompt(tokenizer: Tokenizer, description: str, question: str,
                     template: str | Template = "v1_sq") -> list[int]:
    """The self-questioning conversation with the model's own question asked, open for its answer:
    `{system} USER: <image>\nCan you describe the image in detail? ASSISTANT: {description}</s>VUSER: {question}</s>
    ASSISTANT:` (a VUSER turn followed by the assistant's answer, as the SQ objective trains it, docs/spec.md 3.3)."""
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
    Guarantee: prompt ids of the history up to its last EOS + these ids == the ids of the full new prompt (text after
    a control token is encoded on its own). With an empty history this is the whole first prompt.
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
    cut = len(full) - full[::-1].index(tokenizer.eos_id)  # after the last EOS, which the history's last turn ends with
    return full[cut:]
