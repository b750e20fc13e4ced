"""The real Llama-2 / Vicuna SentencePiece vocabulary (32000 tokens), taken from the llama-cpp-python source package.

SQ-LLaVA uses the Vicuna-v1.5 tokenizer, which is the Llama-2 SentencePiece model. The llama-cpp-python sdist on PyPI
ships that vocabulary as `vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf`, with tokenization test vectors beside it
(edge-deployment.md section 3). `vocab_dir()` extracts the three files once into the cache; no model hub is involved.

    python -m sqllava_edge.vocab              # fetch + extract (the Makefile calls this), prints the folder
    python -m sqllava_edge.vocab --sdist X    # offline: use an sdist you already have
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sqllava_edge.fileutil import atomic_dir, sha256_file

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
VOCAB_GGUF = "ggml-vocab-llama-spm.gguf"
VOCAB_FILES = (VOCAB_GGUF, VOCAB_GGUF + ".inp", VOCAB_GGUF + ".out")
_MEMBER_DIR = "/vendor/llama.cpp/models/"  # inside the sdist, below its top folder
_SOURCE_JSON = "source.json"
_TEST_SEPARATOR = "\n__ggml_vocab_test__\n"  # llama.cpp tests/test-tokenizer-0.cpp splits the .inp file on this

_PIP_COMMAND = (
    "python -m pip download --no-deps --no-binary :all: llama-cpp-python=={version} -d <folder>"
)


def cache_root() -> Path:
    """`$SQLLAVA_EDGE_CACHE`, else `~/.cache/sqllava-edge`."""
    env = os.environ.get("SQLLAVA_EDGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sqllava-edge"


def vocab_dir(sdist: str | os.PathLike | None = None) -> Path:
    """The folder holding the vocab gguf and its `.inp` / `.out` test vectors, extracting them on first use.

    `sdist`: a llama-cpp-python source archive you already have; by default pip downloads it (pip's cache makes that
    instant after the first time).
    """
    folder = cache_root() / "vocab"
    if _is_complete(folder):
        return folder
    with tempfile.TemporaryDirectory(prefix="sqllava-edge-sdist-") as tmp:
        archive = Path(sdist) if sdist is not None else _download_sdist(Path(tmp))
        if not archive.is_file():
            raise FileNotFoundError(f"{archive} does not exist; pass the path of a llama-cpp-python .tar.gz sdist")
        try:
            with atomic_dir(folder, overwrite=folder.exists()) as out:
                _extract_vocab(archive, out)
        except OSError:
            if not _is_complete(folder):  # another process may have won the race to rename; only then is this fine
                raise
    return folder


def vocab_file() -> Path:
    """Path of the Llama-2 SentencePiece vocabulary gguf (`ggml-vocab-llama-spm.gguf`)."""
    return vocab_dir() / VOCAB_GGUF


def _is_complete(folder: Path) -> bool:
    """True when `folder` holds the three files extracted from the sdist version this code expects."""
    try:
        source = json.loads((folder / _SOURCE_JSON).read_text())
    except (OSError, ValueError):
        return False
    return source.get("llama_cpp_python") == LLAMA_CPP_PYTHON_VERSION and all(
        (folder / name).is_file() for name in VOCAB_FILES
    )


def _download_sdist(dest: Path) -> Path:
    """Run pip to download the llama-cpp-python sdist into `dest`, streaming pip's output to stderr."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(dest)]
    print(f"sqllava-edge: fetching the Llama-2 vocabulary from the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} "
          "sdist with pip (about a minute the first time, a few seconds from pip's cache)", file=sys.stderr)
    tail: list[str] = []
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as err:
        raise RuntimeError(_download_help(f"could not run pip ({err})")) from err
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stderr.write(line)
        tail = (tail + [line.rstrip()])[-15:]
    if proc.wait() != 0:
        raise RuntimeError(_download_help("pip failed:\n  " + "\n  ".join(tail)))
    archives = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if len(archives) != 1:
        raise RuntimeError(_download_help(f"pip did not leave one llama_cpp_python-*.tar.gz in {dest}"))
    return archives[0]


def _download_help(reason: str) -> str:
    command = _PIP_COMMAND.format(version=LLAMA_CPP_PYTHON_VERSION)
    return (f"Cannot get the Llama-2 tokenizer vocabulary: {reason}\n"
            f"It comes from PyPI (never a model hub). On a machine with PyPI access run:\n  {command}\n"
            f"then: python -m sqllava_edge.vocab --sdist <folder>/llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz")


def _extract_vocab(archive: Path, out: Path) -> None:
    """Copy the three vocab files out of the sdist into `out` and record where they came from."""
    with tarfile.open(archive, "r:gz") as tar:
        members = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers()
                   if m.isfile() and _MEMBER_DIR in m.name and m.name.rsplit("/", 1)[-1] in VOCAB_FILES}
        missing = [name for name in VOCAB_FILES if name not in members]
        if missing:
            raise RuntimeError(f"{archive} has no {missing} under vendor/llama.cpp/models/; is it the "
                               f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist?")
        for name in VOCAB_FILES:
            source = tar.extractfile(members[name])
            assert source is not None  # isfile() was checked above
            (out / name).write_bytes(source.read())
    record = {"llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "sdist": archive.name,
              "sha256": {name: sha256_file(out / name) for name in VOCAB_FILES}}
    (out / _SOURCE_JSON).write_text(json.dumps(record, indent=1) + "\n")


def vocab_test_cases(folder: str | os.PathLike | None = None) -> list[tuple[str, list[int]]]:
    """The llama.cpp tokenizer test vectors: (text, ids without BOS), read the way test-tokenizer-0.cpp reads them.

    The `.inp` file is split on "\\n__ggml_vocab_test__\\n" (so a case may be empty or hold newlines); line k of the
    `.out` file holds the space-separated ids of case k.
    """
    folder = Path(folder) if folder is not None else vocab_dir()
    raw = (folder / (VOCAB_GGUF + ".inp")).read_bytes().decode("utf-8")
    texts = raw.split(_TEST_SEPARATOR)
    if texts and texts[-1] == "":  # the file ends with a separator
        texts.pop()
    lines = (folder / (VOCAB_GGUF + ".out")).read_bytes().decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(texts) != len(lines):
        raise ValueError(f"{folder}: {len(texts)} test inputs but {len(lines)} expected outputs")
    return [(text, [int(tok) for tok in line.split()]) for text, line in zip(texts, lines)]


@dataclass(frozen=True)
class SpmVocab:
    """A SentencePiece vocabulary as stored in GGUF (`tokenizer.ggml.*`). Types use SentencePiece's numbering
    (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)."""

    tokens: tuple[str, ...]
    scores: tuple[float, ...]
    types: tuple[int, ...]
    unk_id: int
    bos_id: int
    eos_id: int


def read_spm_vocab(path: str | os.PathLike | None = None) -> SpmVocab:
    """Read tokens, scores and types from a llama-family GGUF (default: the Llama-2 vocab gguf)."""
    import gguf

    reader = gguf.GGUFReader(str(path if path is not None else vocab_file()))

    def field(key: str):
        if key not in reader.fields:
            raise ValueError(f"{path}: GGUF field {key!r} missing; is this a llama SentencePiece vocabulary?")
        return reader.fields[key].contents()

    if field("tokenizer.ggml.model") != "llama":
        raise ValueError(f"{path}: tokenizer.ggml.model is {field('tokenizer.ggml.model')!r}, expected 'llama'")
    return SpmVocab(tuple(field("tokenizer.ggml.tokens")), tuple(float(s) for s in field("tokenizer.ggml.scores")),
                    tuple(int(t) for t in field("tokenizer.ggml.token_type")),
                    int(field("tokenizer.ggml.unknown_token_id")), int(field("tokenizer.ggml.bos_token_id")),
                    int(field("tokenizer.ggml.eos_token_id")))


def spm_model_bytes(vocab: SpmVocab) -> bytes:
    """Serialize `vocab` as a SentencePiece `tokenizer.model` (a ModelProto) with Llama-2's encoding settings.

    Written by hand (protobuf wire format) so that no protobuf package is needed. Settings that change how text is
    encoded match Llama-2's model: BPE, byte fallback, identity normalization, a dummy "▁" prefix, extra whitespace
    kept, whitespace-only pieces allowed, digits split.
    """
    out = bytearray()
    for piece, score, kind in zip(vocab.tokens, vocab.scores, vocab.types):
        body = _pb_bytes(1, piece.encode("utf-8")) + _pb_key(2, 5) + struct.pack("<f", score) + _pb_int(3, kind)
        out += _pb_bytes(1, body)  # ModelProto.pieces (field 1)
    trainer = (_pb_int(3, 2) + _pb_int(4, len(vocab.tokens))  # model_type BPE, vocab_size
               + _pb_int(25, 1) + _pb_int(26, 1)  # split_digits, allow_whitespace_only_pieces
               + _pb_int(35, 1)  # byte_fallback
               + _pb_int(40, vocab.unk_id) + _pb_int(41, vocab.bos_id) + _pb_int(42, vocab.eos_id) + _pb_int(43, -1))
    normalizer = _pb_bytes(1, b"identity") + _pb_int(3, 1) + _pb_int(4, 0) + _pb_int(5, 1)
    out += _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)  # ModelProto.trainer_spec / normalizer_spec
    return bytes(out)


def parse_spm_model(data: bytes, source: str = "tokenizer.model") -> SpmVocab:
    """Read a Llama-style SentencePiece `tokenizer.model` (BPE, dummy prefix, whitespace kept) without protobuf.

    Raises ValueError for models whose encoding settings our tokenizer pipeline does not reproduce.
    """
    tokens, scores, types = [], [], []
    trainer: dict[int, int] = {}
    normalizer: dict[int, int] = {}
    try:
        for number, value in _pb_fields(data):
            if number == 1:  # ModelProto.pieces
                piece = dict(_pb_fields(value))
                tokens.append(piece.get(1, b"").decode("utf-8"))
                scores.append(struct.unpack("<f", piece.get(2, b"\0\0\0\0"))[0])
                types.append(piece.get(3, 1))  # proto default: NORMAL
            elif number == 2:
                trainer = {k: v for k, v in _pb_fields(value) if isinstance(v, int)}
            elif number == 3:
                normalizer = {k: v for k, v in _pb_fields(value) if isinstance(v, int)}
    except (IndexError, UnicodeDecodeError, struct.error) as err:
        raise ValueError(f"{source} is not a readable SentencePiece model ({err})") from err
    # proto2 defaults: model_type UNIGRAM(1), add_dummy_prefix true, remove_extra_whitespaces true
    if trainer.get(3, 1) != 2 or normalizer.get(3, 1) != 1 or normalizer.get(4, 1) != 0 or not tokens:
        raise ValueError(f"{source} is not a Llama-style SentencePiece model (BPE, dummy prefix, extra whitespace "
                         "kept); use a folder with a tokenizer.json instead")
    unk_id, bos_id, eos_id = (_signed(trainer.get(number, default)) for number, default in ((40, 0), (41, 1), (42, 2)))
    return SpmVocab(tuple(tokens), tuple(scores), tuple(types), unk_id, bos_id, eos_id)


def _signed(value: int) -> int:
    """A varint-decoded int32 field: negative numbers arrive as 64-bit two's complement."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _pb_fields(data: bytes):
    """Yield (field number, value) of a protobuf message: ints for varints, bytes for the other wire types."""
    pos = 0
    while pos < len(data):
        key, pos = _pb_read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _pb_read_varint(data, pos)
        elif wire_type == 2:
            length, pos = _pb_read_varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire_type in (1, 5):  # fixed64 / fixed32
            size = 8 if wire_type == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        else:
            raise IndexError(f"unsupported protobuf wire type {wire_type}")
        if pos > len(data):
            raise IndexError("truncated protobuf message")
        yield number, value


def _pb_read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        shift += 7
        if not byte & 0x80:
            return value, pos


def _pb_varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 values are sent as 64-bit two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _pb_key(field: int, wire_type: int) -> bytes:
    return _pb_varint(field << 3 | wire_type)


def _pb_int(field: int, value: int) -> bytes:
    return _pb_key(field, 0) + _pb_varint(value)


def _pb_bytes(field: int, payload: bytes) -> bytes:
    return _pb_key(field, 2) + _pb_varint(len(payload)) + payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sqllava_edge.vocab", description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", help="a llama-cpp-python .tar.gz you already have (default: pip downloads it)")
    args = parser.parse_args(argv)
    try:
        print(vocab_dir(args.sdist))
    except (RuntimeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
