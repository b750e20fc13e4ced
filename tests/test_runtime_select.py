"""Runtime pieces without a model: device detection, backend choice, memory plan, the KV sequence pool."""
from __future__ import annotations

import numpy as np
import pytest

from runtimes.base import Counters, LLMKind, VisionKind
from runtimes.memory import check_plan, kv_cache_bytes, plan_memory
from runtimes.select import (DeviceInfo, ModelSource, choose_llm, choose_vision, detect_device, detect_jetson,
                             read_cpu_flags, requested_kind)
from runtimes.sequences import ImageRef, SequencePool, prompt_items, sample
from sqllava_edge.bundle import Artifact, Manifest, preprocessing_for
from sqllava_edge.config import IMAGE_TOKEN_INDEX, LLMConfig, get_preset
from sqllava_edge.errors import BackendUnavailableError, BundleError, MemoryPlanError, PromptTooLongError

GIB = 2**30
CPU_FLAGS = "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni amx_int8\n"


def _fake_root(tmp_path, files: dict[str, bytes | str]):
    for name, data in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return tmp_path


# --------------------------------------------------------------------------------------------------------------------
# Device detection


def test_jetson_from_device_tree(tmp_path):
    root = _fake_root(tmp_path, {"proc/device-tree/model": b"NVIDIA Jetson AGX Orin Developer Kit\x00",
                                 "proc/meminfo": "MemAvailable:    8000000 kB\n", "proc/cpuinfo": "Features\t: asimddp\n"})
    device = detect_device(root)
    assert (device.kind, device.name) == ("jetson", "NVIDIA Jetson AGX Orin Developer Kit")
    assert device.ram_available == 8_000_000 * 1024 and device.has_gpu and "asimddp" in device.cpu_flags


def test_jetson_from_tegra_release_only(tmp_path):
    root = _fake_root(tmp_path, {"etc/nv_tegra_release": "# R36 (release), REVISION: 4.0\n"})
    assert detect_jetson(root) == "NVIDIA Jetson (R36 (release), REVISION: 4.0)"
    assert detect_device(root).kind == "jetson"


def test_cpu_with_vnni_and_without(tmp_path):
    root = _fake_root(tmp_path, {"proc/cpuinfo": "model name\t: Test CPU\n" + CPU_FLAGS})
    device = detect_device(root)
    assert device.kind == "cpu" and device.name == "Test CPU" and device.fast_int8
    assert {"avx512_vnni", "amx_int8", "avx2"} <= device.cpu_flags and "sse2" not in device.cpu_flags
    plain = _fake_root(tmp_path / "plain", {"proc/cpuinfo": "flags\t: fpu avx2\n"})
    assert not detect_device(plain).fast_int8
    assert read_cpu_flags(tmp_path / "missing") == frozenset()


def test_this_machine_is_detected():
    device = detect_device()
    assert device.kind in ("cpu", "cuda", "jetson") and device.ram_available > 0


# --------------------------------------------------------------------------------------------------------------------
# Choices over a manifest (no files needed)


def _artifact(kind: str, precision: str, size: int, target=None) -> Artifact:
    path = f"{kind}/{precision or 'tok'}"
    return Artifact(kind, path, [path], precision, size, {path: "0" * 64}, target=target)


def _source(*artifacts: Artifact, name="tiny") -> ModelSource:
    config = get_preset(name)
    manifest = Manifest(config.to_dict(), config.template, preprocessing_for(config),
                        {"bos": 1, "eos": 2, "pad": 0, "unk": 0}, config.num_image_tokens, config.llm.hidden_size,
                        list(artifacts))
    return ModelSource(__import__("pathlib").Path("/bundle"), config, manifest)


VNNI_CPU = DeviceInfo("cpu", "test", 16 * GIB, cpu_flags=frozenset({"avx512_vnni"}))
PLAIN_CPU = DeviceInfo("cpu", "test", 16 * GIB, cpu_flags=frozenset({"avx2"}))
JETSON = DeviceInfo("jetson", "NVIDIA Jetson Orin Nano", 5 * GIB)
ALL_VISION = [_artifact("vision_onnx", p, 100) for p in ("fp32", "fp16", "int8")]


@pytest.mark.parametrize("device,precision,phrase", [
    (VNNI_CPU, "int8", "int8 preferred"),
    (PLAIN_CPU, "fp32", "CPU without VNNI/AMX"),
])
def test_cpu_vision_choice(device, precision, phrase, monkeypatch):
    pytest.importorskip("onnxruntime", reason="the onnxruntime choice needs onnxruntime")
    monkeypatch.delenv("SQLLAVA_EDGE_VISION_BACKEND", raising=False)
    choice = choose_vision(_source(*ALL_VISION), device)
    assert choice.kind is VisionKind.ONNXRUNTIME and choice.artifact.precision == precision
    assert phrase in choice.reason and choice.providers == ("cpu",)


def test_vision_choice_errors_name_what_is_missing(monkeypatch):
    monkeypatch.delenv("SQLLAVA_EDGE_VISION_BACKEND", raising=False)
    with pytest.raises(BackendUnavailableError, match="CPU-only"):
        choose_vision(_source(*ALL_VISION), PLAIN_CPU, "tensorrt")
    with pytest.raises(BackendUnavailableError, match="training checkpoint"):
        choose_vision(_source(*ALL_VISION), PLAIN_CPU, "torch")
    pytest.importorskip("onnxruntime", reason="the precision check runs after finding onnxruntime")
    with pytest.raises(BundleError, match="no fp16 vision ONNX"):
        choose_vision(_source(ALL_VISION[0]), PLAIN_CPU, precision="fp16")


def test_jetson_without_tensorrt_says_why(monkeypatch):
    pytest.importorskip("onnxruntime", reason="the fallback explanation names onnxruntime")
    monkeypatch.delenv("SQLLAVA_EDGE_VISION_BACKEND", raising=False)
    choice = choose_vision(_source(*ALL_VISION), JETSON)
    assert choice.kind is VisionKind.ONNXRUNTIME and "jetson GPU found" in choice.reason


def test_env_override_and_argument_precedence(monkeypatch):
    monkeypatch.setenv("SQLLAVA_EDGE_LLM_BACKEND", "torch")
    assert requested_kind(LLMKind, None, "SQLLAVA_EDGE_LLM_BACKEND")[0] is LLMKind.TORCH
    assert requested_kind(LLMKind, "llama.cpp", "SQLLAVA_EDGE_LLM_BACKEND")[0] is LLMKind.LLAMA_CPP
    assert requested_kind(LLMKind, "auto", "SQLLAVA_EDGE_LLM_BACKEND") == (None, "")
    monkeypatch.setenv("SQLLAVA_EDGE_LLM_BACKEND", "vllm")
    with pytest.raises(ValueError, match="SQLLAVA_EDGE_LLM_BACKEND"):
        requested_kind(LLMKind, None, "SQLLAVA_EDGE_LLM_BACKEND")


def test_llm_choice_prefers_per_device_and_skips_what_does_not_fit(monkeypatch):
    pytest.importorskip("llama_cpp", reason="the llama.cpp choice checks llama-cpp-python is importable")
    monkeypatch.delenv("SQLLAVA_EDGE_LLM_BACKEND", raising=False)
    ggufs = [_artifact("llm_gguf", p, s) for p, s in (("f16", 14), ("q8_0", 8), ("q4_k_m", 4))]
    source = _source(*ggufs)
    assert choose_llm(source, PLAIN_CPU).artifact.precision == "q8_0"
    assert choose_llm(source, JETSON).artifact.precision == "q4_k_m"
    squeezed = choose_llm(source, PLAIN_CPU, fits=lambda a: a.size <= 5)
    assert squeezed.artifact.precision == "q4_k_m" and "q8_0 would not fit" in squeezed.reason
    exact = choose_llm(_source(_artifact("llm_gguf", "f32", 30)), PLAIN_CPU)
    assert exact.exact and "f32 KV cache" in exact.reason


# --------------------------------------------------------------------------------------------------------------------
# Memory plan


def test_kv_cache_size_of_vicuna_7b():
    assert kv_cache_bytes(LLMConfig(), 1, 2) == 512 * 1024  # edge-deployment.md section 6: 512 KiB per token


def test_orin_nano_8gb_refuses_7b_q4_at_2048():
    """edge-deployment.md section 6: 7B Q4_K_M + fp16 CLIP + 2048-token KV does not fit an Orin Nano's ~5.2 GB."""
    config = get_preset("sqllava-7b")
    nano = DeviceInfo("jetson", "Orin Nano 8GB", int(5.2 * GIB))
    plan = plan_memory(config, nano, llm_bytes=int(4.0 * GIB), vision_bytes=int(0.6 * GIB), n_ctx=2048,
                       kv_bytes_per_value=2)
    assert not plan.fits and plan.pools[0].name.startswith("RAM (shared")
    with pytest.raises(MemoryPlanError, match="KV cache 1.00 GiB") as err:
        check_plan(plan)
    assert "--quant q4_k_m" in str(err.value) or "smaller LLM" in str(err.value)


def test_memory_suggests_a_context_that_fits():
    config = get_preset("sqllava-7b")
    board = DeviceInfo("jetson", "Orin 8GB, less running", int(6.2 * GIB))
    plan = plan_memory(config, board, llm_bytes=int(4.0 * GIB), vision_bytes=int(0.6 * GIB), n_ctx=2048,
                       kv_bytes_per_value=2)
    with pytest.raises(MemoryPlanError, match=r"n_ctx=(\d+)") as err:
        check_plan(plan)
    suggested = int(__import__("re").search(r"n_ctx=(\d+)", str(err.value)).group(1))
    assert 0 < suggested < 2048
    shorter = plan_memory(config, board, llm_bytes=int(4.0 * GIB), vision_bytes=int(0.6 * GIB), n_ctx=suggested,
                          kv_bytes_per_value=2)
    assert shorter.fits


def test_memory_suggests_a_smaller_quant_that_fits():
    config = get_preset("sqllava-7b")
    device = DeviceInfo("cpu", "small", 8 * GIB)
    plan = plan_memory(config, device, llm_bytes=int(7.2 * GIB), vision_bytes=int(1.2 * GIB), n_ctx=2048,
                       kv_bytes_per_value=2)
    with pytest.raises(MemoryPlanError, match="llm_precision='q4_k_m'"):
        check_plan(plan, [("q4_k_m", int(4.0 * GIB))])


def test_desktop_gpu_plans_gpu_and_ram_separately():
    config = get_preset("sqllava-7b")
    gpu = DeviceInfo("cuda", "RTX", 4 * GIB, gpu_memory_free=24 * GIB, compute_capability="8.9")
    plan = plan_memory(config, gpu, llm_bytes=14 * GIB, vision_bytes=GIB, n_ctx=4096, kv_bytes_per_value=2,
                       llm_on_gpu=True, vision_on_gpu=False)
    names = [p.name for p in plan.pools]
    assert names == ["GPU memory", "RAM"] and plan.pools[0].fits and "LLM weights" in plan.pools[0].needs


# --------------------------------------------------------------------------------------------------------------------
# Sequence pool (a recording fake backend)


class FakeLLM:
    """Counts what is prefilled; logits are a function of (sequence content) so sampling is deterministic."""

    name, description, vocab_size = "fake", "fake", 50

    def __init__(self, n_ctx: int):
        self.n_ctx, self.counters, self.seqs = n_ctx, Counters(), {}

    def _logits(self, seq):
        rng = np.random.default_rng(len(self.seqs[seq]) * 7919 + sum(self.seqs[seq]) % 1000)
        return rng.normal(size=self.vocab_size).astype(np.float32)

    def prefill(self, seq, tokens=None, embeds=None):
        if tokens is not None:
            self.counters.prefill_tokens += len(tokens)
            self.seqs.setdefault(seq, []).extend(tokens)
        else:
            self.counters.prefill_embeds += len(embeds)
            self.seqs.setdefault(seq, []).extend([-1] * len(embeds))
        assert len(self.seqs[seq]) <= self.n_ctx
        return self._logits(seq)

    def decode(self, tokens):
        self.counters.decode_steps += 1
        out = {}
        for seq, token in tokens.items():
            self.seqs[seq].append(token)
            out[seq] = self._logits(seq)
        return out

    def fork(self, src, dst):
        self.seqs[dst] = list(self.seqs.get(src, []))

    def length(self, seq):
        return len(self.seqs.get(seq, []))

    def truncate(self, seq, length):
        self.seqs[seq] = self.seqs.get(seq, [])[:length]

    def release(self, seq):
        self.seqs.pop(seq, None)

    def close(self):
        self.seqs.clear()


IMG = ImageRef("img-a", np.zeros((8, 4), np.float32))


def test_pool_reuses_a_shared_image_prefix_by_forking():
    llm = FakeLLM(200)
    pool = SequencePool(llm, 4)
    first = prompt_items([1, 5, IMAGE_TOKEN_INDEX, 6, 7], [IMG])
    seq, _ = pool.prefill(first)
    pool.done(seq)
    second = prompt_items([1, 5, IMAGE_TOKEN_INDEX, 6, 9, 9], [IMG])
    other, _ = pool.prefill(second)
    pool.done(other)
    assert other != seq, "the first prompt's sequence was overwritten instead of forked"
    assert llm.counters.prefill_embeds == 8 and llm.counters.prefill_tokens == 4 + 2
    assert llm.seqs[seq] == [1, 5] + [-1] * 8 + [6, 7]
    assert pool.cells_used() == 2 + 8 + 1 + 1 + 2  # the shared prefix [1, 5, img, 6] is counted once


def test_pool_evicts_idle_sequences_to_stay_within_n_ctx():
    llm = FakeLLM(40)
    pool = SequencePool(llm, 4)
    for image in range(3):
        ref = ImageRef(f"img-{image}", np.zeros((14, 4), np.float32))  # 17 positions per prompt
        seq, _ = pool.prefill(prompt_items([1, IMAGE_TOKEN_INDEX, 3, 4], [ref]))
        pool.done(seq)
        assert pool.cells_used() <= 40
    assert sum(1 for content in pool.content.values() if content) == 2  # the oldest was evicted
    with pytest.raises(PromptTooLongError, match="larger n_ctx"):
        pool.prefill(list(range(41)))


def test_pool_exact_repeat_reuses_logits_without_prefill():
    llm = FakeLLM(100)
    pool = SequencePool(llm, 2)
    seq, logits = pool.prefill([1, 2, 3])
    pool.done(seq)
    again, logits2 = pool.prefill([1, 2, 3])
    assert again == seq and np.array_equal(logits, logits2) and llm.counters.prefill_tokens == 3


def test_sample_batches_equal_sequences_and_stops_at_max():
    llm = FakeLLM(100)
    pool = SequencePool(llm, 4)
    root, logits = pool.prefill([1, 2, 3])
    forks = [pool.fork(root) for _ in range(3)]
    out = {seq: [] for seq in forks}
    pick = {seq: (lambda lg, k=k: int(np.argsort(lg)[-1 - k])) for k, seq in enumerate(forks)}  # never EOS 0? fine
    for seq, token in sample(pool, {seq: logits for seq in forks}, pick, max_new_tokens=5, eos_id=-1):
        out[seq].append(token)
    assert all(len(tokens) == 5 for tokens in out.values())
    assert llm.counters.decode_steps == 4  # 4 batched steps for 3 sequences (the 5th token is not fed)
    assert pool.cells_used() == 3 + 3 * 4
