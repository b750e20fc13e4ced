"""The Llama-2 SentencePiece tokenizer SQ-LLaVA uses, wrapped so every module encodes text the same way.

Text is text. `Tokenizer.encode` never turns characters into control tokens: "</s>", "<s>", "<unk>" and "<image>"
typed by anyone are encoded as the characters they are. BOS, EOS and the image position are inserted as ids by the
conversation templates (sqllava_edge.conversation), never parsed out of a string.

SQ-LLaVA trained with transformers 4.31's slow `LlamaTokenizer` (spec 1.5 and 3.4). It split the rendered prompt on
special tokens and ran SentencePiece on each piece of text in between, so each piece gets the dummy prefix "▁"
(" ASSISTANT" right after "</s>" becomes ["▁", "▁A", ...]). One setting changes that: `legacy` in the checkpoint's
tokenizer_config.json (issue 27; spec 3.4). With `"legacy": false` (Vicuna-v1.5 configs carry it), a piece of text
right after a special token that does not start with a space loses the "▁" of its first SentencePiece token
("</s>USER:" -> "US", "ER", ...; "</s>VUSER:" -> "V", "USER", ...). `encode(text, after_special=True)` reproduces
that for the text a template puts after "</s>". Missing, the key means legacy=True, as in transformers.

The fast tokenizers transformers 5 builds for Llama (Metaspace, prepend_scheme="first") prepend "▁" only to the
first piece and not before a leading space. `Tokenizer` switches such a tokenizer back to SentencePiece's own
behaviour (normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer); with it, HF reproduces all 46 llama.cpp
test vectors of the Llama-2 vocabulary.

A folder with only a SentencePiece `tokenizer.model` (Vicuna, the released SQ-LLaVA checkpoints) is not handed to
transformers: transformers 5.23 derives BPE merges from it in vocabulary order instead of by piece score, which
splits leading spaces wrongly (10 of the 46 test vectors). `Tokenizer.from_spm_vocab` builds the fast tokenizer
itself, merges ranked by score as SentencePiece applies them; the default tokenizer is built the same way.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Sequence

from sqllava_edge.config import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from sqllava_edge.fileutil import atomic_dir
from sqllava_edge.vocab import (LLAMA_CPP_PYTHON_VERSION, VOCAB_GGUF, SpmVocab, cache_root, parse_spm_model,
                                read_spm_vocab, spm_model_bytes, vocab_dir, vocab_file, vocab_test_cases)

__all__ = ["Tokenizer", "load_tokenizer", "read_legacy", "default_tokenizer", "vocab_file"]

SPIECE_UNDERLINE = "▁"
SPM_MODEL_FILE = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
_BUILD_VERSION = 1  # bump when Tokenizer.from_spm_vocab changes, so default_tokenizer's disk cache is rebuilt


class Tokenizer:
    """A HF fast tokenizer with SentencePiece encoding, plain-text encoding, and the ids SQ-LLaVA relies on.

    The wrapper owns `hf`: for a Llama SentencePiece vocabulary it switches `hf`'s pipeline to SentencePiece's own
    encoding (module docstring), it turns special-token parsing off (`split_special_tokens`), and it sets the pad
    token to `<unk>` when there is none (spec 1.5: pad = unk = 0).
    `legacy` is the checkpoint's tokenizer_config.json setting (module docstring); `save` writes it back.
    `spm_model` holds the SentencePiece `tokenizer.model` bytes when known; `save` writes them beside tokenizer.json
    (GGUF exporters need the piece scores, which tokenizer.json does not keep).
    """

    def __init__(self, hf: Any, spm_model: bytes | None = None, legacy: bool = True):
        if not getattr(hf, "is_fast", False):
            raise ValueError(f"{type(hf).__name__} is not a fast (tokenizers-backed) tokenizer; load the folder with "
                             "load_tokenizer(), which needs tokenizer.json or tokenizer.model")
        if not isinstance(legacy, bool):
            raise ValueError(f"legacy must be true or false, got {legacy!r} (tokenizer_config.json)")
        self.hf = hf
        self.spm_model = spm_model
        self.legacy = legacy
        self.is_sentencepiece = _use_sentencepiece_encoding(hf)
        hf.split_special_tokens = True  # text is text: "</s>" typed by anyone is 3 ordinary tokens (module docstring)
        self._control_ids = frozenset(hf.all_special_ids) - {hf.unk_token_id}  # unk: unknown text, without byte fallback
        if hf.pad_token is None:
            hf.pad_token = hf.unk_token  # spec 1.5: pad_token = unk_token for every version but v0
        hf.padding_side = "right"  # spec 1.5: the collator right-pads

    @classmethod
    def from_spm_vocab(cls, vocab: SpmVocab, legacy: bool = True) -> "Tokenizer":
        """Build the fast tokenizer of a Llama-style SentencePiece vocabulary (tokens, scores, types)."""
        from tokenizers import AddedToken, decoders, models, processors
        from tokenizers import Tokenizer as Backend
        from transformers import PreTrainedTokenizerFast

        ids = {piece: i for i, piece in enumerate(vocab.tokens)}
        bpe = models.BPE(vocab=ids, merges=_merges_by_score(vocab, ids), unk_token=vocab.tokens[vocab.unk_id],
                         fuse_unk=True, byte_fallback=True)
        backend = Backend(bpe)
        backend.decoder = decoders.Sequence([decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(" ", 1, 0)])  # drop the dummy prefix
        backend.add_special_tokens([AddedToken(vocab.tokens[i], special=True, normalized=False)
                                    for i, kind in enumerate(vocab.types) if kind in (_SPM_UNKNOWN, _SPM_CONTROL)])
        backend.add_tokens([AddedToken(vocab.tokens[i], normalized=False)
                            for i, kind in enumerate(vocab.types) if kind == _SPM_USER_DEFINED])
        bos = vocab.tokens[vocab.bos_id]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab.bos_id)])
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=vocab.tokens[vocab.eos_id],
                                     unk_token=vocab.tokens[vocab.unk_id], clean_up_tokenization_spaces=False)
        return cls(hf, spm_model=spm_model_bytes(vocab), legacy=legacy)

    def encode(self, text: str, add_bos: bool = False, *, after_special: bool = False) -> list[int]:
        """Token ids of `text` as plain text: "</s>", "<s>", "<unk>", "<image>" in it are ordinary characters.

        `after_special`: the text directly follows a control token (EOS) in the prompt, which matters for a
        `legacy=False` tokenizer only (module docstring). BOS first with add_bos.
        """
        ids = self.encode_with_offsets(text, after_special=after_special)[0]
        return [self.bos_id, *ids] if add_bos else ids

    def encode_with_offsets(self, text: str, *,
                            after_special: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, character (start, end) of each token) of `text` as plain text, no BOS. A dummy-prefix "▁" maps to
        the piece's first character."""
        if not isinstance(text, str):
            raise ValueError(f"text to encode must be a str, got {type(text).__name__}")
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
        ids, offsets = list(enc["input_ids"]), [tuple(span) for span in enc["offset_mapping"]]
        if self._control_ids.intersection(ids):  # cannot happen with split_special_tokens; never let it through
            raise RuntimeError(f"internal error: plain text {text[:60]!r} encoded to control ids "
                               f"{sorted(self._control_ids.intersection(ids))}; please report it")
        if after_special and not self.legacy and self.is_sentencepiece and ids and not text.startswith((" ", "▁")):
            ids, offsets = self._drop_first_prefix(ids, offsets)
        return ids, offsets

    def _drop_first_prefix(self, ids: list[int], offsets: list[tuple[int, int]]):
        """transformers 4.31 `LlamaTokenizer(legacy=False)._tokenize` on text after a special token: the first
        SentencePiece token loses its leading "▁"; the rest of that piece is looked up as a piece (unknown: unk)."""
        piece = self.hf.convert_ids_to_tokens(ids[0])
        if not piece.startswith(SPIECE_UNDERLINE):
            return ids, offsets
        rest = piece[len(SPIECE_UNDERLINE):]
        if not rest:
            return ids[1:], offsets[1:]
        rest_id = self.hf.convert_tokens_to_ids(rest)
        return [self.unk_id if rest_id is None else rest_id, *ids[1:]], offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. The image id -200 is dropped, or shown as "<image>" when skip_special_tokens=False."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if i < 0 and i != IMAGE_TOKEN_INDEX]
        if bad:
            raise ValueError(f"cannot decode negative ids {sorted(set(bad))}; drop IGNORE_INDEX labels before decoding")
        if skip_special_tokens or IMAGE_TOKEN_INDEX not in ids:
            return self.hf.decode([i for i in ids if i >= 0], skip_special_tokens=skip_special_tokens)
        pieces, current = [], []
        for i in ids:
            if i == IMAGE_TOKEN_INDEX:
                pieces.append(self.hf.decode(current, skip_special_tokens=False))
                current = []
            else:
                current.append(i)
        pieces.append(self.hf.decode(current, skip_special_tokens=False))
        return IMAGE_PLACEHOLDER.join(pieces)

    @property
    def bos_id(self) -> int:
        return self.hf.bos_token_id

    @property
    def eos_id(self) -> int:
        return self.hf.eos_token_id

    @property
    def unk_id(self) -> int:
        return self.hf.unk_token_id

    @property
    def pad_id(self) -> int:
        return self.hf.pad_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write tokenizer.json, tokenizer_config.json (with `legacy`) and tokenizer.model when known to `folder`,
        atomically."""
        with atomic_dir(folder) as tmp:
            self.hf.save_pretrained(str(tmp))
            config_path = tmp / TOKENIZER_CONFIG
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
            config["legacy"] = self.legacy
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            if self.spm_model is not None:
                (tmp / SPM_MODEL_FILE).write_bytes(self.spm_model)
        return Path(folder)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id}, "
                f"legacy={self.legacy})")


_SPM_NORMAL, _SPM_UNKNOWN, _SPM_CONTROL, _SPM_USER_DEFINED = 1, 2, 3, 4  # SentencePiece piece types


def _merges_by_score(vocab: SpmVocab, ids: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece BPE vocabulary: every split of a normal piece into two pieces, ranked
    by the merged piece's score (SentencePiece merges the best-scoring pair first); ties: longer left part first."""
    merges = []
    for piece, score, kind in zip(vocab.tokens, vocab.scores, vocab.types):
        if kind != _SPM_NORMAL:
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids]
        merges += [(score, left, right) for left, right in sorted(splits, key=lambda lr: (ids[lr[0]], ids[lr[1]]))]
    merges.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)  # stable: keeps vocabulary order on ties
    return [(left, right) for _, left, right in merges]


def _use_sentencepiece_encoding(hf: Any) -> bool:
    """Give a Llama SentencePiece BPE tokenizer SentencePiece's own encoding: "▁" before every text it encodes,
    spaces as "▁", no pre-splitting. Returns False (and changes nothing) for other tokenizers."""
    from tokenizers import models, normalizers

    backend = hf.backend_tokenizer
    model = backend.model
    if not (isinstance(model, models.BPE) and model.byte_fallback and model.token_to_id(SPIECE_UNDERLINE) is not None):
        return False
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPIECE_UNDERLINE), normalizers.Replace(" ", SPIECE_UNDERLINE)])
    backend.pre_tokenizer = None
    return True


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer files of a checkpoint or HF model folder: tokenizer.json (+ tokenizer_config.json), or a
    Llama SentencePiece tokenizer.model alone. `legacy` comes from tokenizer_config.json (missing: True, as
    transformers does). Never contacts a model hub."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    legacy = read_legacy(folder)
    spm_path = folder / SPM_MODEL_FILE
    spm_model = spm_path.read_bytes() if spm_path.is_file() else None
    if (folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        return Tokenizer(hf, spm_model=spm_model, legacy=legacy)
    if spm_model is not None:
        vocab = parse_spm_model(spm_model, source=str(spm_path))
        _check_no_added_tokens(folder, len(vocab.tokens))
        return Tokenizer.from_spm_vocab(vocab, legacy=legacy)
    raise FileNotFoundError(
        f"{folder} has no tokenizer.json or tokenizer.model; copy the base LLM's tokenizer files there, "
        "or write them with Tokenizer.save(folder) (e.g. default_tokenizer().save(folder))")


def read_legacy(folder: str | os.PathLike) -> bool:
    """The `legacy` setting in `folder`/tokenizer_config.json; True when the file or the key is missing (transformers'
    default for Llama tokenizers, and what transformers 4.31 used)."""
    path = Path(folder) / TOKENIZER_CONFIG
    if not path.is_file():
        return True
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); restore the checkpoint's original file") from None
    legacy = config.get("legacy") if isinstance(config, dict) else None
    if legacy is None:
        return True
    if not isinstance(legacy, bool):
        raise ValueError(f"{path}: \"legacy\" must be true or false, got {legacy!r}")
    return legacy


def _check_no_added_tokens(folder: Path, n_pieces: int) -> None:
    """A tokenizer.model-only folder must not rely on tokens added on top of the SentencePiece vocabulary."""
    added = {}
    if (folder / "added_tokens.json").is_file():
        added.update(json.loads((folder / "added_tokens.json").read_text()))
    if (folder / TOKENIZER_CONFIG).is_file():
        decoder = json.loads((folder / TOKENIZER_CONFIG).read_text()).get("added_tokens_decoder", {})
        added.update({entry.get("content"): int(i) for i, entry in decoder.items()})
    extra = sorted(token for token, i in added.items() if int(i) >= n_pieces)
    if extra:
        raise ValueError(f"{folder} adds tokens {extra} beyond the {n_pieces} SentencePiece pieces; only a "
                         "tokenizer.json describes those: save the tokenizer with transformers to get one")


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """The real Llama-2 / Vicuna tokenizer (32000 tokens) built from the vocab gguf; one shared instance per process.

    The first build reads the gguf (needs the `gguf` package), checks the result against llama.cpp's test vectors
    and caches it on disk under `$SQLLAVA_EDGE_CACHE`, keyed by the library versions that did the conversion.
    """
    import tokenizers
    import transformers

    cached = cache_root() / (f"tokenizer-llama2-spm-{LLAMA_CPP_PYTHON_VERSION}-build{_BUILD_VERSION}"
                             f"-transformers{transformers.__version__}-tokenizers{tokenizers.__version__}")
    if (cached / "tokenizer.json").is_file():  # written by atomic_dir, so present means complete
        return load_tokenizer(cached)
    tok = _build_from_gguf(vocab_dir())
    try:
        tok.save(cached)
    except OSError:  # another process saved it first (rename over a non-empty folder); theirs is identical
        if not (cached / "tokenizer.json").is_file():
            raise
    return tok


def _build_from_gguf(folder: Path) -> Tokenizer:
    tok = Tokenizer.from_spm_vocab(read_spm_vocab(folder / VOCAB_GGUF))
    wrong = [text for text, ids in vocab_test_cases(folder) if tok.encode(text) != ids]
    if wrong:
        raise RuntimeError(f"the tokenizer built from {folder / VOCAB_GGUF} disagrees with llama.cpp's test vectors "
                           f"on {len(wrong)} cases (first: {wrong[0]!r}); please report it with your tokenizers "
                           "version")
    return tok
