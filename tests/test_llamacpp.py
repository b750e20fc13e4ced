"""runtimes.llamacpp.LlamaCppLLM against PyTorch and against itself: tokens, embedding rows, chunking, sequences.

The GGUF is the tiny model's f32 export (tests/gguf_helpers.py, written once per process). "exact" settings (f32 KV
cache, no flash attention) reproduce PyTorch's arithmetic; the defaults (f16 KV, llama.cpp's flash-attention
choice) are what users get.
"""
from __future__ import annotations

import functools
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

from runtimes.base import LLMBackend  # noqa: E402
from runtimes.llamacpp import LlamaCppLLM, import_llama_cpp, set_llama_logging  # noqa: E402
from sqllava_edge.config import IMAGE_TOKEN_INDEX  # noqa: E402
from sqllava_edge.conversation import answer_prompt  # noqa: E402
from sqllava_edge.errors import BackendUnavailableError, PromptTooLongError  # noqa: E402
from sqllava_edge.generation import GenerationConfig, Sampler  # noqa: E402
from tests.reference import generate  # noqa: E402
from tests.gguf_helpers import CORPUS, f32_gguf, tiny_model, tokenizer  # noqa: E402

EXACT = {"kv_type": "f32", "flash_attn": False}
EOS = 2


def backend(n_ctx: int = 256, **options) -> LlamaCppLLM:
    # One thread: the tiny model gains nothing from more, and llama.cpp's spinning workers crawl on a busy machine.
    return LlamaCppLLM(f32_gguf(), n_ctx=n_ctx, n_threads=1, **options)


def run_greedy(llm: LlamaCppLLM, seq: int, prompt: list[int], n: int, sampler: Sampler) -> list[int]:
    """The same loop as tests.reference.generate_tokens, over the backend (EOS stops, is not returned)."""
    logits, out = llm.prefill(seq, tokens=prompt), []
    for _ in range(n):
        token = sampler(logits)
        if token == EOS:
            break
        out.append(token)
        logits = llm.decode({seq: token})[seq]
    return out


def token_rows(ids) -> np.ndarray:
    """Rows of the token embedding matrix: (n, H) float32."""
    return tiny_model().llm.get_input_embeddings().weight[torch.as_tensor(list(ids))].detach().numpy()


def text_prompts() -> list[list[int]]:
    tok = tokenizer()
    return [tok.encode(CORPUS[0][:25], add_bos=True), tok.encode(CORPUS[3][:40], add_bos=True),
            answer_prompt(tok, "What colour is the car?", has_image=False)]


GREEDY = GenerationConfig(max_new_tokens=16)


@functools.lru_cache(maxsize=None)
def torch_greedy(k: int) -> list[int]:
    return generate(tiny_model(), text_prompts()[k], GREEDY)


@pytest.mark.parametrize("settings", [{}, EXACT], ids=["defaults", "exact"])
def test_greedy_text_generation_equals_pytorch(settings):
    with backend(**settings) as llm:
        assert isinstance(llm, LLMBackend) and llm.vocab_size == 32000 and llm.n_embd == 256
        for k, prompt in enumerate(text_prompts()):
            ours = run_greedy(llm, 0, prompt, GREEDY.max_new_tokens, Sampler(GREEDY))
            llm.release(0)
            print(f"\n{len(prompt)}-token prompt -> {tokenizer().decode(ours)!r}")
            assert ours == torch_greedy(k) and len(ours) > 0


def test_embedding_rows_equal_the_same_tokens():
    ids = tokenizer().encode(CORPUS[2], add_bos=True)
    with backend() as llm:
        by_token = llm.prefill(0, tokens=ids)
        by_embed = llm.prefill(1, embeds=token_rows(ids))
        step_token, step_embed = llm.decode({0: 450}), llm.decode({1: 450})
        assert llm.counters.prefill_tokens == len(ids) and llm.counters.prefill_embeds == len(ids)
    print(f"\ntokens vs embedding rows: max |diff| {np.abs(by_token - by_embed).max():.3g}")
    assert np.array_equal(by_token, by_embed) and np.array_equal(step_token[0], step_embed[1])


def test_image_embeddings_spliced_like_pytorch():
    model, tok = tiny_model(), tokenizer()
    torch.manual_seed(3)
    with torch.no_grad():
        image = model.encode_images(torch.randn(1, 3, 112, 112))  # (1, T, H), T = 64
    ids = answer_prompt(tok, "<image>\nWhat is in the picture?", has_image=True)
    cut = ids.index(IMAGE_TOKEN_INDEX)
    with torch.no_grad():
        reference = model(torch.tensor(ids), image_embeds=image).logits[0].float().numpy()  # (n + T - 1, V)
    with backend(**EXACT) as llm:
        llm.prefill(0, tokens=ids[:cut])
        llm.prefill(0, embeds=image[0].numpy())
        tail = llm.prefill(0, tokens=ids[cut + 1:], all_logits=True)
        assert llm.length(0) == len(ids) - 1 + image.shape[1]
    diff = np.abs(tail - reference[-len(tail):]).max()
    print(f"\nimage splice ({image.shape[1]} rows) vs PyTorch: max |diff| {diff:.3g} over {len(tail)} positions")
    assert (tail.argmax(-1) == reference[-len(tail):].argmax(-1)).all() and diff < 1e-3


def test_600_embedding_rows_with_n_batch_512_are_chunked():
    ids = (tokenizer().encode(" ".join(CORPUS), add_bos=True) * 8)[:600]
    with backend(n_ctx=1300, n_batch=512, **EXACT) as llm:
        by_embed = llm.prefill(0, embeds=token_rows(ids))  # 512 + 88 rows: one decode of 600 would abort
        by_token = llm.prefill(1, tokens=ids)
        assert llm.length(0) == llm.length(1) == 600
    with torch.no_grad():
        reference = tiny_model().llm(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
    print(f"\n600 rows: embeds vs tokens max |diff| {np.abs(by_embed - by_token).max():.3g}, "
          f"vs PyTorch {np.abs(by_embed - reference).max():.3g}")
    # The two sequences share one KV buffer at different cells, so sums run in another order: equal to ~1e-6.
    assert np.allclose(by_embed, by_token, rtol=0, atol=1e-5) and np.abs(by_embed - reference).max() < 1e-3


def test_a_smaller_micro_batch_gives_the_same_logits():
    ids = (tokenizer().encode(" ".join(CORPUS), add_bos=True) * 8)[:300]
    rows = token_rows(ids)
    with backend(n_ctx=400, n_batch=512, **EXACT) as whole, backend(n_ctx=400, n_batch=512, n_ubatch=64, **EXACT) as micro:
        assert "n_batch 512 (micro-batch 64)" in micro.description and micro.n_ubatch == 64 and whole.n_ubatch == 512
        a, b = whole.prefill(0, embeds=rows), micro.prefill(0, embeds=rows)  # one graph run vs five of <= 64 rows
    assert np.abs(a - b).max() < 1e-4 and a.argmax() == b.argmax()


def test_fork_and_batched_decode_equal_sequential_runs():
    config = GenerationConfig(max_new_tokens=10, temperature=1.0, top_k=50)
    prompt, steps = text_prompts()[2], 10
    with backend(n_ctx=256, n_seq_max=3, **EXACT) as llm:  # batched: one prefill, forks, 3 sequences per decode
        first = llm.prefill(0, tokens=prompt)
        llm.fork(0, 1)
        llm.fork(0, 2)
        assert [llm.length(s) for s in range(3)] == [len(prompt)] * 3
        samplers = {s: Sampler(config, seed=s) for s in range(3)}
        logits, batched = {s: first for s in range(3)}, {s: [] for s in range(3)}
        for _ in range(steps):
            tokens = {s: samplers[s](logits[s]) for s in range(3)}
            for s, t in tokens.items():
                batched[s].append(t)
            logits = llm.decode(tokens)
        assert llm.counters.decode_steps == steps and llm.counters.decode_tokens == 3 * steps
        assert llm.counters.prefill_tokens == len(prompt)
    for s in range(3):  # sequential: a fresh prefill per sample, one sequence at a time
        with backend(n_ctx=256, n_seq_max=1, **EXACT) as llm:
            sampler, logits, alone = Sampler(config, seed=s), llm.prefill(0, tokens=prompt), []
            for _ in range(steps):
                alone.append(sampler(logits))
                logits = llm.decode({0: alone[-1]})[0]
        assert alone == batched[s]
    print(f"\nthree samples: {[tokenizer().decode(batched[s]) for s in range(3)]}")
    assert len({tuple(v) for v in batched.values()}) > 1  # the samples differ, so the sequences really are separate


def test_truncate_then_prefill_equals_fresh():
    tok = tokenizer()
    a, b, c = tok.encode(CORPUS[0], add_bos=True), tok.encode(" " + CORPUS[1]), tok.encode(" " + CORPUS[4])
    with backend(**EXACT) as llm:
        llm.prefill(0, tokens=a)
        llm.prefill(0, embeds=token_rows(b))
        llm.truncate(0, len(a))
        assert llm.length(0) == len(a)
        resumed = llm.prefill(0, tokens=c)
        llm.truncate(0, len(a) + len(c) + 5)  # beyond the end: nothing to forget
        assert llm.length(0) == len(a) + len(c)
    with backend(**EXACT) as llm:
        fresh = llm.prefill(0, tokens=a + c)
    assert np.array_equal(resumed, fresh)


def test_prompt_too_long_is_refused_before_llama_cpp():
    with backend(n_ctx=32) as llm:
        with pytest.raises(PromptTooLongError, match="n_ctx=32"):
            llm.prefill(0, tokens=[1] + [450] * 32)
        with pytest.raises(PromptTooLongError):
            llm.prefill(0, embeds=np.zeros((33, 256), np.float32))
        assert llm.length(0) == 0 and llm.counters.prefill_tokens == 0
        llm.prefill(0, tokens=[1] + [450] * 31)  # exactly n_ctx still fits, and the backend is still usable
        with pytest.raises(PromptTooLongError, match="full"):
            llm.decode({0: 450})


def test_shared_kv_cache_full_is_refused_and_rolled_back():
    ids = (tokenizer().encode(" ".join(CORPUS), add_bos=True) * 3)[:200]
    with backend(n_ctx=256, n_seq_max=2, n_batch=128) as llm:  # 256 cells shared by both sequences
        before = llm.prefill(0, tokens=ids)
        with pytest.raises(PromptTooLongError, match="shared by all sequences"):
            llm.prefill(1, tokens=ids)  # fits n_ctx on its own, not beside sequence 0
        assert llm.length(1) == 0 and llm.counters.prefill_tokens == 200
        llm.release(0)
        assert np.array_equal(llm.prefill(1, tokens=ids), before)  # the rolled-back cells are free again


@pytest.mark.parametrize("call, error, message", [
    (lambda llm: llm.prefill(4, tokens=[1]), ValueError, "outside 0..3"),
    (lambda llm: llm.prefill(0), ValueError, "exactly one of"),
    (lambda llm: llm.prefill(0, tokens=[1], embeds=np.zeros((1, 256))), ValueError, "exactly one of"),
    (lambda llm: llm.prefill(0, tokens=[]), ValueError, "at least one token"),
    (lambda llm: llm.prefill(0, tokens=[1, IMAGE_TOKEN_INDEX]), ValueError, "image placeholders"),
    (lambda llm: llm.prefill(0, embeds=np.zeros((3, 128))), ValueError, r"\(n >= 1, 256\)"),
    (lambda llm: llm.prefill(0, embeds=np.full((2, 256), np.nan)), ValueError, "NaN"),
    (lambda llm: llm.decode({}), ValueError, "at least one"),
    (lambda llm: llm.decode({0: 32000}), ValueError, "outside the vocabulary"),
    (lambda llm: llm.truncate(0, -1), ValueError, "negative"),
])
def test_bad_input_is_a_clear_error_and_the_backend_stays_usable(call, error, message):
    with backend() as llm:
        with pytest.raises(error, match=message):
            call(llm)
        assert llm.prefill(0, tokens=[1, 450]).shape == (32000,)


def test_closed_backend_and_missing_files_and_missing_llama_cpp(tmp_path, monkeypatch):
    llm = backend()
    llm.close()
    llm.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        llm.prefill(0, tokens=[1])
    with pytest.raises(FileNotFoundError, match="python -m export.gguf"):
        LlamaCppLLM(tmp_path / "missing.gguf", n_ctx=64)
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="could not load"):
        LlamaCppLLM(tmp_path / "bad.gguf", n_ctx=64)
    with pytest.raises(ValueError, match="n_batch must be a positive integer"):
        LlamaCppLLM(f32_gguf(), n_ctx=64, n_batch=0)
    with pytest.raises(ValueError, match=r"n_ubatch \(1024\) must not exceed n_batch \(512\)"):
        LlamaCppLLM(f32_gguf(), n_ctx=64, n_ubatch=1024)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    with pytest.raises(BackendUnavailableError, match="pip install llama-cpp-python"):
        import_llama_cpp()
    with pytest.raises(BackendUnavailableError, match="pip install llama-cpp-python"):
        LlamaCppLLM(f32_gguf(), n_ctx=64)


def test_llama_cpp_logging_is_silent_unless_verbose(capfd):
    backend().close()
    assert capfd.readouterr().err == ""
    try:
        backend(verbose=True).close()
        assert "llama_context" in capfd.readouterr().err
    finally:
        set_llama_logging(False)


def test_the_llm_is_pinned_to_the_planned_gpu(monkeypatch):
    """llama.cpp's defaults split the layers over every visible GPU, while the memory plan checked one: the model is
    loaded with split_mode NONE on main_gpu = the planned CUDA device (a CPU-only build has no GPUs and ignores both;
    here the parameters llama.cpp receives are read)."""
    import llama_cpp

    from runtimes.base import LLMKind
    from runtimes.devices import DeviceInfo
    from runtimes.loader import load_llm
    from runtimes.model_source import ModelSource
    from runtimes.select import LLMChoice

    seen = []
    load = llama_cpp.llama_model_load_from_file

    def recording(path, params):
        seen.append((params.split_mode, params.main_gpu, params.n_gpu_layers))
        return load(path, params)

    monkeypatch.setattr(llama_cpp, "llama_model_load_from_file", recording)
    gguf = f32_gguf()
    with LlamaCppLLM(gguf, n_ctx=64, main_gpu=1) as llm:
        assert llm.prefill(0, tokens=[1, 450]).shape == (32000,)
    assert seen[-1][:2] == (llama_cpp.LLAMA_SPLIT_MODE_NONE, 1)
    second_gpu = DeviceInfo("cuda", "RTX", 32 * 2**30, gpu_memory_free=20 * 2**30, compute_capability="8.9",
                            gpu_name="RTX", gpu_index=1)  # what the plan checked: CUDA device 1
    source = ModelSource(gguf.parent, None, manifest=object())
    artifact = type("Artifact", (), {"path": gguf.name})()
    source.artifact_path = lambda a: gguf.parent / a.path
    load_llm(LLMChoice(LLMKind.LLAMA_CPP, "test", artifact, gpu_layers=0), source, second_gpu, n_ctx=64).close()
    assert seen[-1] == (llama_cpp.LLAMA_SPLIT_MODE_NONE, 1, 0)
    with pytest.raises(ValueError, match="main_gpu must be a CUDA device index"):
        LlamaCppLLM(gguf, n_ctx=64, main_gpu=-1)
