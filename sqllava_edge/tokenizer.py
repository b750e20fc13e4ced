"""The Llama-2 SentencePiece tokenizer SQ-LLaVA uses, wrapped so every module encodes text the same way.

Text is text. `Tokenizer.encode` never turns characters into control tokens: "</s>", "<s>", "<unk>" and "<image>"
typed by anyone are encoded as the characters they are. BOS, EOS and the image position are inserted as ids by the
conversation templates (sqllava_edge.conversation), never parsed out of a string.

SQ-LLaVA trained with transformers 4.31's slow `LlamaTokenizer` (docs/spec.md 1.5 and 3.4). It split the rendered prompt on
special tokens and ran SentencePiece on each piece of text in between, so each piece gets the dummy prefix "▁"
(" ASSISTANT" right after "</s>" becomes ["▁", "▁A", ...]). One setting changes that: `legacy` in the checkpoint's
tokenizer_config.json (docs/spec.md 3.4). With `"legacy": false` (Vicuna-v1.5 configs carry it), a piece of text
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

Encoding and decoding run on the `tokenizers` library alone (`Tokenizer.backend`), exactly as transformers runs
them (`split_special_tokens=True` is the backend's `encode_special_tokens`; decode is the backend's, transformers
skipping its clean-up for BPE models). `load_tokenizer(folder, runtime=True)` builds a tokenizer without
transformers (what a deployed device uses); `Tokenizer.hf`, the transformers object that training, export
and conversion use, exists only on tokenizers loaded with transformers.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from sqllava_edge.config import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from sqllava_edge.fileutil import atomic_dir
from sqllava_edge.vocab import (LLAMA_CPP_PYTHON_VERSION, VOCAB_GGUF, SpmVocab, cache_root, parse_spm_model,
                                read_spm_vocab, spm_model_bytes, vocab_dir, vocab_file, vocab_test_cases)

__all__ = ["Tokenizer", "SpecialTokens", "load_tokenizer", "read_legacy", "read_special_tokens", "default_tokenizer",
           "vocab_file"]

SPIECE_UNDERLINE = "▁"
SPM_MODEL_FILE = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
_BUILD_VERSION = 1  # bump when Tokenizer.from_spm_vocab changes, so default_tokenizer's disk cache is rebuilt


@dataclass(frozen=True)
class SpecialTokens:
    """The strings of the tokens SQ-LLaVA places by id (docs/spec.md 1.5: pad = unk when the checkpoint names none)."""
    bos: str
    eos: str
    unk: str
    pad: str


LLAMA_SPECIAL = SpecialTokens(bos="<s>", eos="</s>", unk="<unk>", pad="<unk>")  # LlamaTokenizer's defaults


class Tokenizer:
    """A `tokenizers` tokenizer with SentencePiece encoding, plain-text encoding, and the ids SQ-LLaVA relies on.

    `backend` (a tokenizers.Tokenizer) does all encoding and decoding; for a Llama SentencePiece vocabulary the
    wrapper switches its pipeline to SentencePiece's own encoding (module docstring) and turns special-token
    parsing off (`encode_special_tokens`, what transformers' `split_special_tokens` sets).
    `hf` is the transformers tokenizer the backend belongs to when it was loaded with transformers (training,
    export, conversion; `from_hf`); a runtime tokenizer has none.
    `legacy` is the checkpoint's tokenizer_config.json setting (module docstring); `save` writes it back.
    `spm_model` holds the SentencePiece `tokenizer.model` bytes when known; `save` writes them beside tokenizer.json
    (GGUF exporters need the piece scores, which tokenizer.json does not keep).
    """

    def __init__(self, backend: Any, special: SpecialTokens, spm_model: bytes | None = None, legacy: bool = True,
                 hf: Any = None):
        if not isinstance(legacy, bool):
            raise ValueError(f"legacy must be true or false, got {legacy!r} (tokenizer_config.json)")
        self._backend, self._hf = backend, hf
        self.special = special
        self.spm_model = spm_model
        self.legacy = legacy
        missing = {name: token for name, token in vars(special).items() if backend.token_to_id(token) is None}
        if missing:
            raise ValueError(f"the tokenizer's vocabulary lacks its special tokens {missing}; the tokenizer files "
                             "are inconsistent: copy the base LLM's tokenizer files again")
        self.is_sentencepiece = _use_sentencepiece_encoding(backend)

    @classmethod
    def from_hf(cls, hf: Any, spm_model: bytes | None = None, legacy: bool = True) -> "Tokenizer":
        """Wrap a transformers fast tokenizer (its backend is used, not copied: tokens added to `hf` count)."""
        if not getattr(hf, "is_fast", False):
            raise ValueError(f"{type(hf).__name__} is not a fast (tokenizers-backed) tokenizer; load the folder with "
                             "load_tokenizer(), which needs tokenizer.json or tokenizer.model")
        hf.split_special_tokens = True  # text is text: "</s>" typed by anyone is 3 ordinary tokens (module docstring)
        if hf.pad_token is None:
            hf.pad_token = hf.unk_token  # docs/spec.md 1.5: pad_token = unk_token for every version but v0
        hf.padding_side = "right"  # docs/spec.md 1.5: the collator right-pads
        special = SpecialTokens(bos=str(hf.bos_token), eos=str(hf.eos_token), unk=str(hf.unk_token),
                                pad=str(hf.pad_token))
        return cls(hf.backend_tokenizer, special, spm_model=spm_model, legacy=legacy, hf=hf)

    @classmethod
    def from_spm_vocab(cls, vocab: SpmVocab, legacy: bool = True, *, runtime: bool = False) -> "Tokenizer":
        """Build the fast tokenizer of a Llama-style SentencePiece vocabulary (tokens, scores, types); with
        `runtime`, without transformers (no `hf`)."""
        from tokenizers import AddedToken, decoders, models, processors
        from tokenizers import Tokenizer as Backend

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
        bos, eos, unk = (vocab.tokens[i] for i in (vocab.bos_id, vocab.eos_id, vocab.unk_id))
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab.bos_id)])
        if runtime:
            return cls(backend, SpecialTokens(bos, eos, unk, unk), spm_model=spm_model_bytes(vocab), legacy=legacy)
        PreTrainedTokenizerFast = _transformers().PreTrainedTokenizerFast
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk,
                                     clean_up_tokenization_spaces=False)
        return cls.from_hf(hf, spm_model=spm_model_bytes(vocab), legacy=legacy)

    @property
    def backend(self) -> Any:
        """The tokenizers.Tokenizer that encodes and decodes (`hf`'s own one when there is `hf`)."""
        return self._backend if self._hf is None else self._hf.backend_tokenizer

    @property
    def hf(self) -> Any:
        """The transformers tokenizer; only a tokenizer loaded with transformers (not `runtime=True`) has one."""
        if self._hf is None:
            raise RuntimeError("this tokenizer was loaded for the runtime, without transformers; training, export and "
                               "conversion load it with load_tokenizer(folder) (pip install 'sqllava-edge[export]')")
        return self._hf

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
        backend = self.backend
        backend.encode_special_tokens = True  # transformers' split_special_tokens=True (set on every call, as it does)
        enc = backend.encode(text, add_special_tokens=False)
        ids, offsets = list(enc.ids), [tuple(span) for span in enc.offsets]
        control = self._control_ids()
        if control.intersection(ids):  # cannot happen with encode_special_tokens; never let it through
            raise RuntimeError(f"internal error: plain text {text[:60]!r} encoded to control ids "
                               f"{sorted(control.intersection(ids))}; please report it")
        if after_special and not self.legacy and self.is_sentencepiece and ids and not text.startswith((" ", "▁")):
            ids, offsets = self._drop_first_prefix(ids, offsets)
        return ids, offsets

    def _control_ids(self) -> frozenset[int]:
        """Ids of the special tokens (BOS, EOS, tokens added as special), unk excepted (unknown text without byte
        fallback may encode to it)."""
        added = self.backend.get_added_tokens_decoder()
        return frozenset(i for i, token in added.items() if token.special) - {self.unk_id}

    def _drop_first_prefix(self, ids: list[int], offsets: list[tuple[int, int]]):
        """transformers 4.31 `LlamaTokenizer(legacy=False)._tokenize` on text after a special token: the first
        SentencePiece token loses its leading "▁"; the rest of that piece is looked up as a piece (unknown: unk)."""
        piece = self.backend.id_to_token(ids[0])
        if not piece.startswith(SPIECE_UNDERLINE):
            return ids, offsets
        rest = piece[len(SPIECE_UNDERLINE):]
        if not rest:
            return ids[1:], offsets[1:]
        rest_id = self.backend.token_to_id(rest)
        return [self.unk_id if rest_id is None else rest_id, *ids[1:]], offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. The image id -200 is dropped, or shown as "<image>" when skip_special_tokens=False."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if i < 0 and i != IMAGE_TOKEN_INDEX]
        if bad:
            raise ValueError(f"cannot decode negative ids {sorted(set(bad))}; drop IGNORE_INDEX labels before decoding")
        decode = self.backend.decode  # transformers' decode for a BPE model (it skips its clean-up for BPE)
        if skip_special_tokens or IMAGE_TOKEN_INDEX not in ids:
            return decode([i for i in ids if i >= 0], skip_special_tokens=skip_special_tokens)
        pieces, current = [], []
        for i in ids:
            if i == IMAGE_TOKEN_INDEX:
                pieces.append(decode(current, skip_special_tokens=False))
                current = []
            else:
                current.append(i)
        pieces.append(decode(current, skip_special_tokens=False))
        return IMAGE_PLACEHOLDER.join(pieces)

    def token_id(self, token: str) -> int:
        """Id of a vocabulary token (the unk id for a string that is not one)."""
        found = self.backend.token_to_id(token)
        return self.unk_id if found is None else found

    @property
    def bos_id(self) -> int:
        return self.token_id(self.special.bos)

    @property
    def eos_id(self) -> int:
        return self.token_id(self.special.eos)

    @property
    def unk_id(self) -> int:
        return self.backend.token_to_id(self.special.unk)

    @property
    def pad_id(self) -> int:
        return self.token_id(self.special.pad)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write tokenizer.json, tokenizer_config.json (with `legacy`) and tokenizer.model when known to `folder`,
        atomically. Needs `hf` (transformers)."""
        hf = self.hf
        with atomic_dir(folder) as tmp:
            hf.save_pretrained(str(tmp))
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


def _use_sentencepiece_encoding(backend: Any) -> bool:
    """Give a Llama SentencePiece BPE tokenizer SentencePiece's own encoding: "▁" before every text it encodes,
    spaces as "▁", no pre-splitting. Returns False (and changes nothing) for other tokenizers."""
    from tokenizers import models, normalizers

    model = backend.model
    if not (isinstance(model, models.BPE) and model.byte_fallback and model.token_to_id(SPIECE_UNDERLINE) is not None):
        return False
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPIECE_UNDERLINE), normalizers.Replace(" ", SPIECE_UNDERLINE)])
    backend.pre_tokenizer = None
    return True


def load_tokenizer(folder: str | os.PathLike, *, runtime: bool = False) -> Tokenizer:
    """Load the tokenizer files of a checkpoint or HF model folder: tokenizer.json (+ tokenizer_config.json), or a
    Llama SentencePiece tokenizer.model alone. `legacy` comes from tokenizer_config.json (missing: True, as
    transformers does). Never contacts a model hub.

    `runtime`: with the tokenizers library alone, no transformers (a deployed device; the tokenizer has no `hf`,
    so it cannot be saved). The ids and texts are those of the transformers tokenizer (tests/test_tokenizer.py).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    legacy = read_legacy(folder)
    spm_path = folder / SPM_MODEL_FILE
    spm_model = spm_path.read_bytes() if spm_path.is_file() else None
    if (folder / "tokenizer.json").is_file():
        if runtime:
            from tokenizers import Tokenizer as Backend

            backend = Backend.from_file(str(folder / "tokenizer.json"))
            return Tokenizer(backend, read_special_tokens(folder), spm_model=spm_model, legacy=legacy)
        hf = _transformers().AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        return Tokenizer.from_hf(hf, spm_model=spm_model, legacy=legacy)
    if spm_model is not None:
        vocab = parse_spm_model(spm_model, source=str(spm_path))
        _check_no_added_tokens(folder, len(vocab.tokens))
        return Tokenizer.from_spm_vocab(vocab, legacy=legacy, runtime=runtime)
    raise FileNotFoundError(
        f"{folder} has no tokenizer.json or tokenizer.model; copy the base LLM's tokenizer files there, "
        "or write them with Tokenizer.save(folder) (e.g. default_tokenizer().save(folder))")


def _transformers():
    """The transformers module, or a one-line error naming the extra that installs it."""
    from sqllava_edge.deps import require

    return require("transformers", "export", "loading a tokenizer for training, export or conversion")


def _read_json(path: Path) -> dict:
    """A JSON object file of a tokenizer folder; {} when the file is missing."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); restore the checkpoint's original file") from None
    return data if isinstance(data, dict) else {}


def read_legacy(folder: str | os.PathLike) -> bool:
    """The `legacy` setting in `folder`/tokenizer_config.json; True when the file or the key is missing (transformers'
    default for Llama tokenizers, and what transformers 4.31 used)."""
    path = Path(folder) / TOKENIZER_CONFIG
    legacy = _read_json(path).get("legacy")
    if legacy is None:
        return True
    if not isinstance(legacy, bool):
        raise ValueError(f"{path}: \"legacy\" must be true or false, got {legacy!r}")
    return legacy


def read_special_tokens(folder: str | os.PathLike) -> SpecialTokens:
    """bos/eos/unk/pad strings as transformers reads them: tokenizer_config.json, overridden by
    special_tokens_map.json (transformers 4 writes both); a value is a string or an AddedToken dict with "content".
    Missing: LlamaTokenizer's defaults; pad missing: the unk token (docs/spec.md 1.5)."""
    folder = Path(folder)
    found = {**_read_json(folder / TOKENIZER_CONFIG), **_read_json(folder / "special_tokens_map.json")}
    tokens = {}
    for name in ("bos", "eos", "unk", "pad"):
        value = found.get(f"{name}_token")
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{folder}: {name}_token must be a string, got {value!r}")
        tokens[name] = value
    tokens = {name: value or getattr(LLAMA_SPECIAL, name) for name, value in tokens.items()}
    if found.get("pad_token") is None:
        tokens["pad"] = tokens["unk"]
    return SpecialTokens(**tokens)


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

    transformers = _transformers()
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
