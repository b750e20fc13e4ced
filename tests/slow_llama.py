"""An independent model of the reference tokenization, for tests: transformers 4.31's slow `LlamaTokenizer` (what
SQ-LLaVA trained with) rebuilt on SentencePiece itself, and docs/spec.md 1.5's `tokenizer_image_token` on top of it.

transformers 4.31.0, models/llama/tokenization_llama.py: `tokenize` (with legacy=False: text = "▁" + text with "▁"
replaced by " "), then the base class splits out the special tokens (AddedTokens with lstrip=rstrip=False: nothing
stripped) and `_tokenize` runs SentencePiece on each remaining piece; with legacy=False a piece that is not the
first and does not start with " " loses the "▁" of its first SentencePiece token.
"""
from __future__ import annotations

import re
from typing import Callable

import pytest

from sqllava_edge.config import IMAGE_TOKEN_INDEX
from sqllava_edge.vocab import read_spm_vocab, spm_model_bytes

SPECIAL_IDS = {"<s>": 1, "</s>": 2, "<unk>": 0}
SPECIAL = re.compile(r"(<s>|</s>|<unk>)")
UNDERLINE = "▁"


def sentencepiece():
    """SentencePiece's own processor over the Llama-2 vocabulary (skips the test without the package)."""
    spm = pytest.importorskip("sentencepiece", reason="the reference model needs the sentencepiece package")
    return spm.SentencePieceProcessor(model_proto=spm_model_bytes(read_spm_vocab()))


def slow_llama(sp, legacy: bool) -> Callable[[str], list[int]]:
    """`LlamaTokenizer(legacy=legacy).encode(text, add_special_tokens=False)` of transformers 4.31.0."""

    def encode(text: str) -> list[int]:
        if not legacy:  # LlamaTokenizer.tokenize
            text = UNDERLINE + text.replace(UNDERLINE, " ")
        ids = []
        for piece in SPECIAL.split(text):
            if piece in SPECIAL_IDS:
                ids.append(SPECIAL_IDS[piece])
            elif piece:
                ids += [sp.piece_to_id(token) for token in piece_tokens(sp, piece, legacy)]
        return ids

    return encode


def piece_tokens(sp, piece: str, legacy: bool) -> list[str]:
    """LlamaTokenizer._tokenize of one piece of text between special tokens (with legacy=False, the first piece of a
    text starts with the "▁" that `tokenize` put there)."""
    if legacy:
        return sp.encode(piece, out_type=str)
    is_first = piece.startswith(UNDERLINE)
    if is_first:
        piece = piece[1:]
    tokens = sp.encode(piece, out_type=str)
    if not is_first and not piece.startswith(" ") and tokens[0].startswith(UNDERLINE):
        tokens = ([tokens[0][1:]] if len(tokens[0]) > 1 else []) + tokens[1:]
    return tokens


def after_special(sp, text: str, legacy: bool) -> list[int]:
    """Ids the reference gives `text` (no control-token names in it) right after a special token such as "</s>"."""
    text = text if legacy else text.replace(UNDERLINE, " ")
    return [sp.piece_to_id(token) for token in piece_tokens(sp, text, legacy)] if text else []


def image_token(encode: Callable[[str], list[int]], text: str, has_image: bool = True) -> list[int]:
    """docs/spec.md 1.5 `tokenizer_image_token`: split on "<image>", each chunk tokenized on its own, one BOS first."""
    chunks = text.split("<image>") if has_image else [text]
    ids = [SPECIAL_IDS["<s>"]] + encode(chunks[0])
    for chunk in chunks[1:]:
        ids += [IMAGE_TOKEN_INDEX] + encode(chunk)
    return ids
