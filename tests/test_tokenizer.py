"""The Llama-2 vocabulary, its llama.cpp test vectors, plain-text encoding, and the SentencePiece behaviour SQ-LLaVA
trained with (transformers 4.31's LlamaTokenizer, both `legacy` settings)."""
from __future__ import annotations

import io
import json
import random
import tarfile

import pytest

from sqllava_edge.config import IMAGE_TOKEN_INDEX
from sqllava_edge.tokenizer import Tokenizer, default_tokenizer, load_tokenizer, read_legacy
from sqllava_edge.vocab import (LLAMA_CPP_PYTHON_VERSION, VOCAB_FILES, main, parse_spm_model, read_spm_vocab,
                                spm_model_bytes, vocab_dir, vocab_test_cases)
from tests.slow_llama import SPECIAL, SPECIAL_IDS, sentencepiece, slow_llama


@pytest.fixture(scope="session")
def vocab_folder():
    try:
        return vocab_dir()
    except RuntimeError as err:
        pytest.skip(f"the Llama-2 vocabulary needs PyPI access once (pip download of llama-cpp-python): {err}")


@pytest.fixture(scope="session")
def tok(vocab_folder) -> Tokenizer:
    return default_tokenizer()


@pytest.fixture(scope="session")
def sp(vocab_folder):
    return sentencepiece()


def vicuna_folder(tok: Tokenizer, folder, legacy: bool | None):
    """A Vicuna-style tokenizer folder: tokenizer.model + a slow-tokenizer config (with `legacy` unless None)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(tok.spm_model)
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "pad_token": None}
    if legacy is not None:
        config["legacy"] = legacy
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_vocab_vectors_parse_like_llama_cpp(vocab_folder):
    cases = vocab_test_cases(vocab_folder)
    texts = [text for text, _ in cases]
    assert len(cases) > 40
    assert ("", []) in cases  # an empty case between two separators
    assert "\n\n" in texts and "    Hello\n    Hello" in texts  # cases hold newlines, not one line each
    assert "Hello world" in texts and not any(text.endswith("__ggml_vocab_test__") for text in texts)


def test_vocab_test_cases_format(tmp_path):
    sep = "\n__ggml_vocab_test__\n"
    (tmp_path / VOCAB_FILES[1]).write_text("a b" + sep + sep + "\n" + sep + " x" + sep, encoding="utf-8")
    (tmp_path / VOCAB_FILES[2]).write_text(" 1 2\n\n 3\n 4\n", encoding="utf-8")
    assert vocab_test_cases(tmp_path) == [("a b", [1, 2]), ("", []), ("\n", [3]), (" x", [4])]
    (tmp_path / VOCAB_FILES[2]).write_text(" 1 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="4 test inputs but 1"):
        vocab_test_cases(tmp_path)


def test_every_llama_cpp_vector_tokenizes_identically(tok, vocab_folder):
    wrong = [(text, tok.encode(text), ids) for text, ids in vocab_test_cases(vocab_folder) if tok.encode(text) != ids]
    assert wrong == []


def test_written_tokenizer_model_matches_sentencepiece(vocab_folder):
    spm = pytest.importorskip("sentencepiece", reason="checking tokenizer.model needs the sentencepiece package")
    vocab = read_spm_vocab()
    data = spm_model_bytes(vocab)
    assert parse_spm_model(data) == vocab  # our writer and reader agree
    sp = spm.SentencePieceProcessor(model_proto=data)  # and SentencePiece itself reads it as Llama-2
    assert (sp.vocab_size(), sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id()) == (32000, 1, 2, 0, -1)
    assert [text for text, ids in vocab_test_cases(vocab_folder) if sp.encode(text) != ids] == []


def test_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id, tok.vocab_size) == (1, 2, 0, 0, 32000)
    assert tok.encode("Hello world", add_bos=True) == [1, 15043, 3186]
    assert tok.hf.padding_side == "right"


@pytest.mark.parametrize("text,pieces", [
    ("</s>", ["▁</", "s", ">"]),  # typed control-token names are ordinary characters
    ("hi</s>there", ["▁hi", "</", "s", ">", "there"]),
    ("x <s> y<unk>", ["▁x", "▁<", "s", ">", "▁y", "<", "unk", ">"]),
    ("<image>\n<image>", ["▁<", "image", ">", "<0x0A>", "<", "image", ">"]),
    (" ASSISTANT: ", ["▁", "▁A", "SS", "IST", "ANT", ":", "▁"]),  # the dummy prefix before a leading space
])
def test_text_is_plain_text(tok, text, pieces):
    ids = tok.encode(text)
    assert tok.hf.convert_ids_to_tokens(ids) == pieces
    assert not {tok.bos_id, tok.eos_id, tok.unk_id, IMAGE_TOKEN_INDEX} & set(ids)


ALPHABET = [*" \n\t", *"abcXYZ019.,:;!?'\"()-é中🦙▁", "Hello", " world", "USER:", " ASSISTANT: ", "</s>", "<s>", "<unk>",
            "<image>", "  ", "\n\n", "VUSER"]


def test_plain_text_matches_sentencepiece(tok, sp):
    """SentencePiece never makes a control token out of text: our plain encoding is exactly SentencePiece's."""
    rng = random.Random(0)
    texts = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 25))) for _ in range(2000)]
    assert [text for text in texts if tok.encode(text) != sp.encode(text)] == []


@pytest.mark.parametrize("legacy", [True, False])
def test_text_between_special_tokens_matches_transformers_4_31(tok, sp, legacy):
    """The reference tokenized whole prompts with special tokens parsed. Each piece of text between them, encoded on
    its own (after_special when it follows one), gives the reference's ids for either `legacy` setting."""
    ours = Tokenizer.from_hf(tok.hf, tok.spm_model, legacy=legacy)
    reference = slow_llama(sp, legacy)
    rng = random.Random(1)
    wrong = []
    for _ in range(2000):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 25)))
        ids, after_special = [], False
        for piece in SPECIAL.split(text):
            if piece in SPECIAL_IDS:
                ids.append(SPECIAL_IDS[piece])
            elif piece:
                ids += ours.encode(piece, after_special=after_special)
            after_special = piece in SPECIAL_IDS if piece else after_special
        if ids != reference(text):
            wrong.append(text)
    assert wrong == []


@pytest.mark.parametrize("text,legacy_pieces,pieces", [
    ("USER: Q3", ["▁US", "ER", ":", "▁Q", "3"], ["US", "ER", ":", "▁Q", "3"]),  # 3148 vs 3308
    ("VUSER:", ["▁V", "USER", ":"], ["V", "USER", ":"]),  # 478 vs 29963
    (" ASSISTANT:", ["▁", "▁A", "SS", "IST", "ANT", ":"], ["▁", "▁A", "SS", "IST", "ANT", ":"]),  # a leading space
    ("\nx", ["▁", "<0x0A>", "x"], ["<0x0A>", "x"]),  # a lone "▁" first token is dropped
])
def test_text_after_eos_follows_legacy(tok, text, legacy_pieces, pieces):
    new = Tokenizer.from_hf(tok.hf, tok.spm_model, legacy=False)
    assert tok.hf.convert_ids_to_tokens(tok.encode(text, after_special=True)) == legacy_pieces
    assert tok.hf.convert_ids_to_tokens(new.encode(text, after_special=True)) == pieces
    assert new.encode(text) == tok.encode(text)  # only text right after a control token differs


@pytest.mark.parametrize("text", ["Hello world", "  two spaces\n\nnew lines\tand tabs ", "é🦙 中文 123", ""])
def test_decode_inverts_encode(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_decode_image_and_bad_ids(tok):
    ids = [tok.bos_id, *tok.encode("A USER: "), IMAGE_TOKEN_INDEX, *tok.encode("\nWhat?")]
    assert tok.decode(ids, skip_special_tokens=False) == "<s> A USER: <image>\nWhat?"
    assert IMAGE_TOKEN_INDEX not in tok.encode(tok.decode(ids))
    with pytest.raises(ValueError, match="IGNORE_INDEX"):
        tok.decode([1, -100, 5])


def test_save_and_load_roundtrip(tok, tmp_path, vocab_folder):
    out = tok.save(tmp_path / "ckpt" / "tokenizer")
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["tokenizer"]  # no temporary leftovers
    again = load_tokenizer(out)
    texts = [text for text, _ in vocab_test_cases(vocab_folder)] + ["A1</s>VUSER: Q2</s> ASSISTANT: A2"]
    assert [again.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    assert (again.pad_id, again.spm_model) == (0, tok.spm_model)


def test_sentencepiece_only_folder_loads_exactly(tok, tmp_path, vocab_folder):
    """A Vicuna-style folder (tokenizer.model + a slow-tokenizer config) must tokenize like the reference, with its
    `legacy` setting."""
    vicuna = load_tokenizer(vicuna_folder(tok, tmp_path, legacy=False))
    assert vicuna.is_sentencepiece and vicuna.pad_id == 0 and vicuna.legacy is False
    assert [text for text, ids in vocab_test_cases(vocab_folder) if vicuna.encode(text) != ids] == []
    assert vicuna.encode("VUSER: y", after_special=True)[0] == 29963 != tok.encode("VUSER: y", after_special=True)[0]


@pytest.mark.parametrize("config,legacy", [(None, True), ({}, True), ({"legacy": None}, True),
                                           ({"legacy": True}, True), ({"legacy": False}, False)])
def test_legacy_setting_is_read_and_saved(tok, tmp_path, config, legacy):
    """Missing means True (transformers' default); both folder kinds honour it; save writes it back."""
    folder = vicuna_folder(tok, tmp_path / "spm", legacy=None)
    if config is None:
        (folder / "tokenizer_config.json").unlink()
    else:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert read_legacy(folder) is legacy and load_tokenizer(folder).legacy is legacy
    saved = Tokenizer.from_hf(tok.hf, tok.spm_model, legacy=legacy).save(tmp_path / "saved")  # tokenizer.json folder
    assert json.loads((saved / "tokenizer_config.json").read_text())["legacy"] is legacy
    assert load_tokenizer(saved).legacy is legacy


@pytest.mark.parametrize("content,match", [('{"legacy": "false"}', "true or false"), ("{oops", "not valid JSON")])
def test_bad_legacy_setting_is_a_clear_error(tmp_path, content, match):
    (tmp_path / "tokenizer_config.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        read_legacy(tmp_path)


def test_sentencepiece_only_folder_with_added_tokens_is_refused(tok, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(tok.spm_model)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"[PAD]": 32000}))
    with pytest.raises(ValueError, match=r"\[PAD\]"):
        load_tokenizer(tmp_path)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x03\x0a\x01a")  # one piece, no BPE trainer spec
    with pytest.raises(ValueError, match="Llama-style"):
        load_tokenizer(tmp_path)


def _fake_sdist(path, names=VOCAB_FILES):
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            data = f"content of {name}".encode()
            info = tarfile.TarInfo(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/models/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_vocab_dir_extracts_from_a_local_sdist(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SQLLAVA_EDGE_CACHE", str(tmp_path / "cache"))
    sdist = _fake_sdist(tmp_path / "llama_cpp_python.tar.gz")
    assert main(["--sdist", str(sdist)]) == 0
    folder = tmp_path / "cache" / "vocab"
    assert capsys.readouterr().out.strip() == str(folder)
    assert (folder / VOCAB_FILES[1]).read_text() == f"content of {VOCAB_FILES[1]}"
    source = json.loads((folder / "source.json").read_text())
    assert source["llama_cpp_python"] == LLAMA_CPP_PYTHON_VERSION and set(source["sha256"]) == set(VOCAB_FILES)
    assert vocab_dir(sdist=tmp_path / "not-used.tar.gz") == folder  # complete: the sdist is not needed again


def test_vocab_dir_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("SQLLAVA_EDGE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vocab_dir(sdist=tmp_path / "missing.tar.gz")
    with pytest.raises(RuntimeError, match=r"is it the llama-cpp-python"):
        vocab_dir(sdist=_fake_sdist(tmp_path / "partial.tar.gz", VOCAB_FILES[:1]))
    assert not (tmp_path / "cache" / "vocab").exists()  # nothing half-written


# --- the runtime tokenizer (tokenizers alone, no transformers) gives the transformers tokenizer's ids and texts ------

RUNTIME_ALPHABET = [*ALPHABET, "🦙🦙", "👩‍👩‍👧", "🇫🇷", "\u200b", "\u00a0", "ß", "Ω", "ｱ", "𝔘", "\r\n", "\t\t",
                    "     ", "\n\n\n", "<im_patch>", "[INST]", "<<SYS>>", "ASSISTANT:", "VUSER:", "▁▁", "\x00", "\x7f",
                    "\ufffd", "a" * 40, " the", "ing", "0123456789"]


def _runtime_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    texts = ["".join(rng.choice(RUNTIME_ALPHABET) for _ in range(rng.randint(0, 30))) for _ in range(n)]
    long = "".join(rng.choice(RUNTIME_ALPHABET) for _ in range(3000))  # about 10,000 characters
    return [*texts, long, long[:4097], " " * 500, "\n" * 300, "".join(chr(c) for c in range(32, 1500))]


def _hf_style_folder(tok: Tokenizer, folder):
    """A transformers-4 Llama folder (as on the model hub): tokenizer.json with the Metaspace pre-tokenizer,
    tokenizer_class LlamaTokenizerFast, AddedToken dicts, a special_tokens_map.json, legacy false, no pad token."""
    folder.mkdir(parents=True)
    tok.hf.backend_tokenizer.save(str(folder / "tokenizer.json"))
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    data["normalizer"] = None
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    added = {name: {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
                    "rstrip": False, "single_word": False}
             for name, content in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}
    config = {"tokenizer_class": "LlamaTokenizerFast", "legacy": False, "add_bos_token": True, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "pad_token": None, **added}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(added))
    return folder


@pytest.fixture(scope="module")
def tokenizer_folders(tok, tmp_path_factory):
    """Folders a bundle or checkpoint can hold: ours (legacy true / false, with a token added as special, as the
    converter adds <im_patch>), a transformers-4 hub-style Llama folder, and a tokenizer.model-only Vicuna folder."""
    root = tmp_path_factory.mktemp("runtime-tok")
    patched = load_tokenizer(tok.save(root / "src"))
    patched.hf.add_tokens(["<im_patch>"], special_tokens=True)
    return {
        "bundle-legacy": tok.save(root / "legacy"),
        "bundle-new": Tokenizer.from_hf(load_tokenizer(tok.save(root / "src2")).hf, tok.spm_model,
                                        legacy=False).save(root / "new"),
        "bundle-added-special": patched.save(root / "added"),
        "hub-llama": _hf_style_folder(tok, root / "hub"),
        "spm-only": vicuna_folder(tok, root / "spm", legacy=False),
    }


@pytest.mark.parametrize("kind", ["bundle-legacy", "bundle-new", "bundle-added-special", "hub-llama", "spm-only"])
def test_runtime_tokenizer_encodes_like_transformers(tokenizer_folders, kind):
    """`load_tokenizer(runtime=True)` uses no transformers and gives, on 3000 strings (unicode, emoji,
    whitespace runs, control-token names, long inputs), the ids and offsets of transformers' own call with
    split_special_tokens=True, and the same ids after a control token (legacy)."""
    folder = tokenizer_folders[kind]
    ref, rt = load_tokenizer(folder), load_tokenizer(folder, runtime=True)
    assert rt._hf is None and rt.legacy == ref.legacy and rt.is_sentencepiece and ref.is_sentencepiece
    assert (rt.bos_id, rt.eos_id, rt.unk_id, rt.pad_id, rt.vocab_size) == (
        ref.hf.bos_token_id, ref.hf.eos_token_id, ref.hf.unk_token_id, ref.hf.pad_token_id, len(ref.hf))
    wrong = []
    for text in _runtime_texts(2, 3000):
        want = ref.hf(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
        got = rt.encode_with_offsets(text)
        if got != (want["input_ids"], [tuple(span) for span in want["offset_mapping"]]):
            wrong.append((text, "plain"))
        if rt.encode(text, after_special=True) != ref.encode(text, after_special=True):
            wrong.append((text, "after </s>"))
    assert wrong == []


@pytest.mark.parametrize("kind", ["bundle-legacy", "bundle-new", "bundle-added-special", "hub-llama", "spm-only"])
def test_runtime_tokenizer_prompts_like_transformers(tokenizer_folders, kind):
    """Whole prompts of the templates v1, v1_sq and plain (with the control tokens the templates place) are equal."""
    from sqllava_edge.conversation import Turn, prompt_ids

    folder = tokenizer_folders[kind]
    ref, rt = load_tokenizer(folder), load_tokenizer(folder, runtime=True)
    rng = random.Random(3)
    texts = _runtime_texts(4, 200)
    wrong = []
    for template in ("v1", "v1_sq", "plain"):
        for _ in range(60):
            roles = ["user", "assistant"] * rng.randint(1, 3)
            if template == "v1_sq" and rng.random() < 0.5:
                roles[2 if len(roles) > 2 else 0] = "vuser" if len(roles) > 2 else "user"
            if template == "plain":
                roles = ["user", "assistant"]
            turns = [Turn(role, rng.choice(texts)) for role in roles]
            turns[-1] = Turn("assistant", None) if rng.random() < 0.5 else turns[-1]
            has_image = template == "plain" or rng.random() < 0.7
            if template == "plain":
                turns = [Turn("user", ""), Turn("assistant", rng.choice(texts))]
            if prompt_ids(ref, turns, template, has_image) != prompt_ids(rt, turns, template, has_image):
                wrong.append((template, turns))
    assert wrong == []


@pytest.mark.parametrize("kind", ["bundle-legacy", "bundle-added-special", "hub-llama", "spm-only"])
def test_runtime_tokenizer_decodes_like_transformers(tokenizer_folders, kind):
    """Decoding (both skip_special_tokens settings, the image id) and the streamed pieces of runtimes.engine's
    TextStream are equal, on random ids (byte tokens that form no character, controls, added tokens) and on texts."""
    from runtimes.engine import TextStream

    folder = tokenizer_folders[kind]
    ref, rt = load_tokenizer(folder), load_tokenizer(folder, runtime=True)
    rng = random.Random(5)
    specials = [0, 1, 2, *range(3, 259), *range(rt.vocab_size - 1, rt.vocab_size - 3, -1)]  # controls, bytes, top
    sequences = [[rng.choice(specials) if rng.random() < 0.3 else rng.randrange(rt.vocab_size)
                  for _ in range(rng.randint(0, 40))] for _ in range(1500)]
    sequences += [ref.encode(text) for text in _runtime_texts(6, 500)]
    wrong = []
    for ids in sequences:
        for skip in (True, False):
            if rt.decode(ids, skip_special_tokens=skip) != ref.hf.decode(ids, skip_special_tokens=skip):
                wrong.append((ids, skip))
        with_image = [1, *ids[:5], IMAGE_TOKEN_INDEX, *ids[5:]]
        if rt.decode(with_image, skip_special_tokens=False) != ref.decode(with_image, skip_special_tokens=False):
            wrong.append((with_image, "image"))
    for ids in [*sequences[:200], *(ids for ids in sequences[1500:] if len(ids) < 80)]:  # streaming is quadratic
        streams = [TextStream(t, stop=("\n\n", "###")) for t in (ref, rt)]
        pieces = [[stream.push(i) for i in ids] + [stream.finish()] for stream in streams]
        if pieces[0] != pieces[1]:
            wrong.append((ids, "stream"))
    assert wrong == []


def test_runtime_tokenizer_has_no_hf(tokenizer_folders):
    rt = load_tokenizer(tokenizer_folders["bundle-legacy"], runtime=True)
    with pytest.raises(RuntimeError, match=r"sqllava-edge\[export\]"):
        rt.save(tokenizer_folders["bundle-legacy"].parent / "copy")
