"""export.gguf: the tiny preset's LLM as GGUF, checked against PyTorch in llama.cpp, plus metadata, vocab, template.

Numbers are printed (pytest -s) as they are measured; the model is tests/gguf_helpers.tiny_model().
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from export import gguf as G
from export.gguf.__main__ import main as gguf_main
from sqllava_edge.conversation import Turn, render
from sqllava_edge.errors import ExportValidationError
from tests.gguf_helpers import CORPUS, f32_export, f32_gguf, tiny_model, tokenizer

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed (pip install llama-cpp-python)")


# ----------------------------------------------------------------------------------------------------------------
# Without llama.cpp


def test_unknown_quant_type_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown GGUF quant type\(s\) \['q3_xyz'\]; valid: f32, f16, bf16, q8_0"):
        G.export_gguf(tiny_model(), tokenizer(), tmp_path / "bundle", quants=["q8_0", "Q3_XYZ"])
    assert not (tmp_path / "bundle").exists()  # refused before writing anything
    assert G.check_quants(["Q8_0", "q8_0", "f32"]) == ["q8_0", "f32"]


def test_cli_rejects_unknown_quant_with_the_valid_list(tmp_path, capsys):
    assert gguf_main([str(tmp_path / "no-checkpoint"), "--out", str(tmp_path / "b"), "--quant", "q9_9"]) == 1
    err = capsys.readouterr().err
    assert "q9_9" in err and "q4_k_m" in err and not (tmp_path / "b").exists()


def test_permute_rope_interleaves_each_heads_halves():
    head_dim, n_head, width = 6, 2, 3
    rows = np.arange(n_head * head_dim, dtype=np.float32)[:, None] * np.ones((1, width), np.float32)  # row r = r
    out = G.permute_rope(rows, n_head)[:, 0].astype(int).tolist()
    # per head: rotate-half pairs (i, i + head_dim/2) become adjacent rows (llama.cpp's interleaved RoPE)
    assert out == [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]


@pytest.mark.parametrize("template", ["v1", "v1_sq", "llava_v1"])
def test_jinja_chat_template_renders_like_conversation_render(template):
    jinja2 = pytest.importorskip("jinja2", reason="jinja2 renders chat templates (installed with transformers)")
    env = jinja2.Environment()
    jinja = env.from_string(G.chat_template_jinja(template))
    conversations = [
        [Turn("user", "<image>\nWhat is this?")],
        [Turn("user", "<image>\nQ1"), Turn("assistant", "A1"), Turn("user", "Q2")],
    ]
    if template == "v1_sq":
        conversations.append([Turn("user", "<image>\nQ1"), Turn("assistant", "A1"), Turn("vuser", "Q2"),
                              Turn("assistant", "A2"), Turn("user", "Q3")])
    for turns in conversations:
        messages = [{"role": t.role, "content": t.text} for t in turns]
        got = jinja.render(messages=messages, add_generation_prompt=True)
        assert got == render(template, [*turns, Turn("assistant", None)])
    if template == "v1_sq":  # the self-questioning prompt: an open VUSER turn (content None)
        turns = [Turn("user", "<image>\nDescribe."), Turn("assistant", "A dog."), Turn("vuser", None)]
        messages = [{"role": t.role, "content": t.text} for t in turns]
        assert jinja.render(messages=messages, add_generation_prompt=False) == render(template, turns)
    with pytest.raises(ValueError, match="not a chat format"):
        G.chat_template_jinja("plain")


# ----------------------------------------------------------------------------------------------------------------
# With llama.cpp


@needs_llama_cpp
def test_f32_gguf_logits_equal_pytorch_at_every_position():
    from runtimes.llamacpp import LlamaCppLLM

    _, artifact = f32_export()
    v = artifact["validation"]
    print(f"\nf32 export validation: {v}")
    assert artifact["kind"] == "llm_gguf" and artifact["precision"] == "f32" and artifact["files"] == [artifact["path"]]
    assert v["positions"] == 64 and v["argmax_mismatches"] == 0 and v["top1_agreement"] == 1.0 and v["passed"]
    assert v["max_abs_diff"] < 1e-4  # f32 weights, f32 KV cache, no flash attention: the same arithmetic as torch
    # Independently, with the backend's defaults (f16 KV cache, llama.cpp's flash-attention choice):
    prompt = G.validation_prompt(tokenizer(), 64)
    reference = G.torch_logits(tiny_model().llm, prompt)
    with LlamaCppLLM(f32_gguf(), n_ctx=128, n_seq_max=1) as llm:
        logits = llm.prefill(0, tokens=prompt, all_logits=True)
    report = G.compare_logits(logits, reference)
    print(f"f32 GGUF, default backend settings: {report}")
    assert logits.shape == (64, 32000) and logits.dtype == np.float32
    assert report["argmax_mismatches"] == 0 and report["max_abs_diff"] < 1e-2


@needs_llama_cpp
def test_gguf_metadata_vocab_and_tensors():
    import gguf

    from sqllava_edge.vocab import read_spm_vocab

    reader = gguf.GGUFReader(str(f32_gguf()))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    llm = tiny_model().config.llm
    assert field("general.architecture") == "llama" and field("llama.block_count") == llm.num_layers
    assert field("llama.embedding_length") == 256 and field("llama.attention.head_count") == 4
    assert field("llama.rope.dimension_count") == llm.head_dim and field("llama.context_length") == 2048
    reference = read_spm_vocab()
    assert field("tokenizer.ggml.model") == "llama"
    assert tuple(field("tokenizer.ggml.tokens")) == reference.tokens
    assert np.allclose(field("tokenizer.ggml.scores"), reference.scores)
    assert tuple(field("tokenizer.ggml.token_type")) == reference.types
    assert [field(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")] == [1, 2, 0, 0]
    assert field("tokenizer.ggml.add_bos_token") is True and field("tokenizer.ggml.add_eos_token") is False
    assert field("tokenizer.chat_template") == G.chat_template_jinja("v1_sq")
    assert field("sqllava_edge.template") == "v1_sq"
    names = {t.name: t for t in reader.tensors}
    assert len(names) == 3 + 9 * llm.num_layers and "blk.3.ffn_down.weight" in names
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}


@needs_llama_cpp
def test_stock_llama_cpp_loads_tokenizes_and_generates_like_pytorch():
    import llama_cpp

    from sqllava_edge.generation import GenerationConfig
    from tests.reference import generate

    llm = llama_cpp.Llama(model_path=str(f32_gguf()), n_ctx=128, verbose=False)
    try:
        assert llm.tokenize(b"Hello world") == [1, 15043, 3186]
        assert llm.detokenize([15043, 3186]) == b" Hello world"  # SentencePiece "▁Hello": leading space kept
        assert llm.metadata["tokenizer.chat_template"] == G.chat_template_jinja("v1_sq")
        prompt = tokenizer().encode(CORPUS[1][:30], add_bos=True)
        stock = []
        for token in llm.generate(prompt, temp=0.0, top_k=1):
            if token == llm.token_eos() or len(stock) == 12:
                break
            stock.append(token)
    finally:
        llm.close()
    ours = generate(tiny_model(), prompt, GenerationConfig(max_new_tokens=12))
    print(f"\nstock llama.cpp greedy: {tokenizer().decode(stock)!r}; PyTorch: {tokenizer().decode(ours)!r}")
    assert stock == ours


@needs_llama_cpp
def test_quantized_ggufs_agree_with_pytorch(tmp_path):
    import gguf

    artifacts = G.export_gguf(tiny_model(), tokenizer(), tmp_path, quants=["q8_0", "q4_k_m", "q5_k_m"],
                              log=lambda _: None)
    by = {a["precision"]: a for a in artifacts}
    for quant, a in by.items():
        v = a["validation"]
        print(f"\n{quant}: {a['size'] / 2**20:.1f} MiB, top-1 agreement {v['top1_agreement']:.2%} "
              f"({v['argmax_mismatches']} of {v['positions']} differ), max |diff| {v['max_abs_diff']:.3g}")
    assert by["q8_0"]["validation"]["top1_agreement"] >= 0.95 and by["q8_0"]["validation"]["passed"]
    for quant in ("q4_k_m", "q5_k_m"):
        assert 0.0 <= by[quant]["validation"]["top1_agreement"] <= 1.0 and "passed" not in by[quant]["validation"]
    assert by["q4_k_m"]["size"] < by["q5_k_m"]["size"] < by["q8_0"]["size"] < f32_export()[1]["size"]
    assert not (tmp_path / "llm" / "model.f32.gguf").exists() and not list(tmp_path.glob(".gguf-work-*"))
    types = {q: {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / by[q]["path"])).tensors} for q in by}
    Q = gguf.GGMLQuantizationType
    assert types["q8_0"]["blk.0.attn_q.weight"] == Q.Q8_0
    assert types["q4_k_m"]["blk.0.attn_q.weight"] == Q.Q4_K  # 256-wide rows: K-quants apply as asked
    assert types["q5_k_m"]["blk.0.attn_q.weight"] == Q.Q5_K
    assert types["q8_0"]["blk.0.attn_norm.weight"] == Q.F32  # norms stay f32


@needs_llama_cpp
def test_prefill_candidates_q4_0_and_iq4_nl_export_with_their_agreement(tmp_path):
    """The 4-bit types benchmarks.prefill measures: written by llama.cpp, agreement recorded (not enforced)."""
    import gguf

    artifacts = G.export_gguf(tiny_model(), tokenizer(), tmp_path, quants=["q4_0", "iq4_nl"], log=lambda _: None)
    by = {a["precision"]: a for a in artifacts}
    assert sorted(by) == ["iq4_nl", "q4_0"]
    for a in by.values():
        v = a["validation"]
        assert 0.0 <= v["top1_agreement"] <= 1.0 and v["positions"] == G.VALIDATION_TOKENS and "passed" not in v
    Q = gguf.GGMLQuantizationType
    for quant, kind in (("q4_0", Q.Q4_0), ("iq4_nl", Q.IQ4_NL)):
        types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / by[quant]["path"])).tensors}
        assert types["blk.0.ffn_up.weight"] == kind, (quant, types["blk.0.ffn_up.weight"])


@needs_llama_cpp
def test_failed_validation_raises_names_tolerance_and_leaves_no_file(tmp_path, monkeypatch):
    real = G.torch_logits
    monkeypatch.setattr(G, "torch_logits", lambda llm, ids: np.roll(real(llm, ids), 1, axis=-1))  # wrong reference
    with pytest.raises(ExportValidationError, match=r"model\.f32\.gguf: tensor 'logits' top-1 agreement .* tolerance 100%"):
        G.export_gguf(tiny_model(), tokenizer(), tmp_path, quants=["f32"], log=lambda _: None)
    assert not (tmp_path / "llm" / "model.f32.gguf").exists() and not list(tmp_path.rglob("*.tmp-*"))


@needs_llama_cpp
def test_bare_llama_and_f16(tmp_path):
    llm = tiny_model().llm
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    (artifact,) = G.export_gguf(llm, tokenizer(), tmp_path, quants=["f16"], log=lambda _: None)
    v = artifact["validation"]
    print(f"\nf16 (from a bare LlamaForCausalLM): {v}")
    assert artifact["path"] == "llm/model.f16.gguf" and v["passed"] and v["max_abs_diff"] < 0.05
    assert all(torch.equal(before[k], t) for k, t in llm.state_dict().items())  # the input is not changed


@needs_llama_cpp
def test_cli_exports_a_checkpoint_into_a_bundle(tmp_path):
    from sqllava_edge.bundle import read_manifest
    from sqllava_edge.checkpoint import save_checkpoint

    checkpoint = save_checkpoint(tmp_path / "ckpt", tiny_model(), tokenizer())
    assert gguf_main([str(checkpoint), "--out", str(tmp_path / "bundle"), "--quant", "f32"]) == 0
    manifest = read_manifest(tmp_path / "bundle", verify=True)
    artifact = manifest.find("llm_gguf", "f32")
    assert artifact is not None and artifact.validation["argmax_mismatches"] == 0 and artifact.inputs_key
