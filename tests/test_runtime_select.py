"""Runtime pieces without a model: device detection, backend choice, memory plan, the KV sequence pool."""
from __future__ import annotations

import ctypes
import sys

import numpy as np
import pytest

import runtimes.device_facts as device_facts
import runtimes.select as select
import runtimes.vision as vision
from runtimes.base import LLMKind, VisionKind
from runtimes.memory import CUDA_CONTEXT_BYTES, check_plan, kv_cache_bytes, plan_memory
from runtimes.device_facts import cuda_driver_devices, detect_jetson, device_key
from runtimes.devices import DeviceInfo, _query_nvidia_gpu, detect_device, read_cpu_flags
from runtimes.loader import load_vision_checked
from runtimes.model_source import ModelSource
from runtimes.select import choose_llm, choose_vision, engine_mismatch, requested_kind
from runtimes.sequences import ImageRef, SequencePool, prompt_items
from sqllava_edge.bundle import Artifact, Manifest, preprocessing_for
from sqllava_edge.config import IMAGE_TOKEN_INDEX, LLMConfig, get_preset
from sqllava_edge.errors import BackendUnavailableError, BundleError, MemoryPlanError, PromptTooLongError
from tests.fake_llm import FakeLLM

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


def test_meminfo_and_cpu_sysfs_read_from_a_fake_tree(tmp_path):
    root = _fake_root(tmp_path, {"proc/meminfo": "MemTotal:  16000 kB\nMemAvailable:  8000 kB\nHugePages_Total:  0\n",
                                 "sys/devices/system/cpu/cpu0/cache/index2/size": "1024K\n"})
    assert device_facts.read_meminfo(root / "proc/meminfo") == {"MemTotal": 16000 * 1024, "MemAvailable": 8000 * 1024,
                                                                "HugePages_Total": 0}
    assert device_facts.read_meminfo(tmp_path / "missing") == {} and detect_device(root).ram_available == 8000 * 1024
    assert device_facts.cpu_sysfs(root) == {"governor": None, "l2_cache": "1024K", "l3_cache": None}


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
    monkeypatch.setattr(select, "_gpu_offload_supported", lambda: True)  # a CUDA build of llama-cpp-python
    assert choose_llm(source, JETSON).artifact.precision == "q4_k_m"
    squeezed = choose_llm(source, PLAIN_CPU, fits=lambda a, layers: a.size <= 5)
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
# Jetson detection from a fake device tree

ORIN_NX = {"proc/device-tree/model": b"NVIDIA Orin NX Developer Kit\x00",
           "proc/device-tree/compatible": b"nvidia,p3768-0000+p3767-0000\x00nvidia,p3767-0000\x00nvidia,tegra234\x00",
           "proc/meminfo": "MemAvailable:    12000000 kB\n"}
AGX_BOARD = "NVIDIA Jetson AGX Orin Developer Kit"


def test_orin_nx_is_a_jetson_without_jetson_in_its_model(tmp_path):
    device = detect_device(_fake_root(tmp_path, ORIN_NX))
    assert (device.kind, device.name, device.board) == ("jetson", "NVIDIA Orin NX Developer Kit", "NVIDIA Orin NX Developer Kit")
    # no CUDA to ask in a fake tree: the SoC table names the GPU as cuDeviceGetName does on Orin
    assert (device.gpu_name, device.compute_capability) == ("Orin", "8.7")


@pytest.mark.parametrize("files,name", [
    ({"proc/device-tree/compatible": b"nvidia,p3737-0000+p3701-0005\x00nvidia,tegra234\x00nvidia,tegra23x\x00"},
     "NVIDIA Jetson (tegra234)"),  # no model, no /etc/nv_tegra_release
    ({"sys/devices/soc0/family": b"Tegra\n", "sys/devices/soc0/soc_id": b"35\n"},
     "NVIDIA Jetson (tegra234)"),  # Docker masks /proc/device-tree; soc0 stays
])
def test_container_without_tegra_release_is_a_jetson(tmp_path, files, name):
    device = detect_device(_fake_root(tmp_path, files))
    assert (device.kind, device.name, device.gpu_name, device.compute_capability) == ("jetson", name, "Orin", "8.7")


def test_other_arm_boards_are_not_jetsons(tmp_path):
    pi = _fake_root(tmp_path, {"proc/device-tree/model": b"Raspberry Pi 4 Model B Rev 1.4\x00",
                               "proc/device-tree/compatible": b"raspberrypi,4-model-b\x00brcm,bcm2711\x00",
                               "sys/devices/soc0/family": b"BCM2835\n"})
    assert detect_jetson(pi) is None and detect_device(pi).kind == "cpu"


class FakeLibcuda:
    """The driver calls cuda_driver_devices makes, answering for the given devices (ctypes byref / buffers)."""

    def __init__(self, devices):
        self.devices = devices

    def cuInit(self, flags):
        return 0

    def cuDeviceGetCount(self, count):
        count._obj.value = len(self.devices)
        return 0

    def cuDeviceGet(self, dev, index):
        dev._obj.value = index
        return 0

    def cuDeviceGetName(self, buf, size, dev):
        buf.value = self.devices[dev.value]["name"].encode()
        return 0

    def cuDeviceGetAttribute(self, out, attribute, dev):
        device = self.devices[dev.value]
        major, minor = device["compute_capability"].split(".")
        out._obj.value = {75: int(major), 76: int(minor), 16: device["multiprocessors"]}[attribute]
        return 0

    def cuDeviceGetPCIBusId(self, buf, size, dev):
        buf.value = self.devices[dev.value]["pci_bus_id"].encode()
        return 0

    def cuDeviceTotalMem_v2(self, out, dev):
        out._obj.value = self.devices[dev.value]["total_memory"]
        return 0


RTX_4090 = {"index": 0, "name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9", "multiprocessors": 128,
            "pci_bus_id": "0000:02:00.0", "total_memory": 24 * GIB}
# What cuDeviceGet* report on two Orin modules (integrated GPU: no PCI bus id; total memory = the shared RAM)
AGX_ORIN_GPU = {"index": 0, "name": "Orin", "compute_capability": "8.7", "multiprocessors": 16, "pci_bus_id": "",
                "total_memory": 64_335_241_216}
ORIN_NANO_GPU = {"index": 0, "name": "Orin", "compute_capability": "8.7", "multiprocessors": 8, "pci_bus_id": "",
                 "total_memory": 7_990_161_408}


def test_cuda_driver_devices_reads_name_capability_and_bus_id():
    devices = cuda_driver_devices(FakeLibcuda([RTX_4090]))
    assert devices == [RTX_4090]


def test_gpu_is_the_one_cuda_uses_not_nvidia_smis_first(monkeypatch):
    """nvidia-smi lists GPUs in PCI order and ignores CUDA_VISIBLE_DEVICES; CUDA's device 0 here is the 4090 on bus 2."""
    monkeypatch.setattr(device_facts, "cuda_driver_devices", lambda lib=None: [RTX_4090])
    monkeypatch.setattr(device_facts.shutil, "which", lambda name: "/usr/bin/nvidia-smi")

    class Done:
        returncode = 0
        stdout = "00000000:01:00.0, 1900\n00000000:02:00.0, 20000\n"  # pci.bus_id, memory.free: a small GPU first

    monkeypatch.setattr(device_facts.subprocess, "run", lambda *args, **kwargs: Done())
    assert _query_nvidia_gpu() == (RTX_4090, 20000 * 2**20)


# --------------------------------------------------------------------------------------------------------------------
# TensorRT engines: which one runs here, and falling back when it cannot


def _engine(gpu: dict, board: str | None = None, version: str = "10.3.0") -> Artifact:
    """An engine entry as export.trt records it on the CUDA device `gpu` (a cuda_driver_devices entry)."""
    target = {"gpu": gpu["name"], "compute_capability": gpu["compute_capability"], "device_key": device_key(gpu),
              "tensorrt": version, "jetson": {"l4t": "36.4.3", "jetpack": "6.2", "board": board} if board else None}
    return _artifact("tensorrt_engine", "fp16", 50, target=target)


@pytest.fixture
def tensorrt_10_3(monkeypatch):
    """`import tensorrt` works and says 10.3.0 (the engine matching reads only the version)."""
    fake = type(sys)("tensorrt")
    fake.__version__ = "10.3.0"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.delenv("SQLLAVA_EDGE_VISION_BACKEND", raising=False)
    return fake


def _orin(board: str = AGX_BOARD, gpu: dict = AGX_ORIN_GPU) -> DeviceInfo:
    return DeviceInfo("jetson", board, 30 * GIB, compute_capability="8.7", gpu_name="Orin", board=board,
                      multiprocessors=gpu["multiprocessors"], gpu_total_memory=gpu["total_memory"])


READ_DRIVER = cuda_driver_devices


def _driver(monkeypatch, gpu: dict) -> None:
    """The CUDA driver answers for `gpu` (through the FakeLibcuda calls cuda_driver_devices makes)."""
    monkeypatch.setattr(device_facts, "cuda_driver_devices", lambda lib=None: READ_DRIVER(FakeLibcuda([gpu])))


HOST_AGX = {"proc/device-tree/model": AGX_BOARD.encode() + b"\x00",
            "proc/device-tree/compatible": b"nvidia,p3737-0000+p3701-0005\x00nvidia,tegra234\x00",
            "etc/nv_tegra_release": "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic\n"}
CONTAINER = {"sys/devices/soc0/family": b"Tegra\n", "sys/devices/soc0/soc_id": b"35\n"}  # /proc/device-tree masked


def test_jetson_uses_the_engine_built_on_it(tensorrt_10_3, monkeypatch, tmp_path):
    """export.trt records the device key from cuDeviceGet* ("Orin", 8.7, 16 multiprocessors, 64 GB); the runtime
    matches that, not the board string."""
    monkeypatch.setattr(vision, "tensorrt_problem", lambda: None, raising=False)  # as if torch had CUDA
    _driver(monkeypatch, AGX_ORIN_GPU)
    device = detect_device(_fake_root(tmp_path, HOST_AGX), ask_cuda=True)
    assert (device.multiprocessors, device.gpu_total_memory) == (16, AGX_ORIN_GPU["total_memory"])
    choice = choose_vision(_source(*ALL_VISION, _engine(AGX_ORIN_GPU, AGX_BOARD)), device)
    assert choice.kind is VisionKind.TENSORRT and "was built for it" in choice.reason


def test_engine_built_on_the_host_runs_in_a_container_and_boards_stay_apart(tensorrt_10_3, monkeypatch, tmp_path):
    """Docker hides /proc/device-tree: the same AGX Orin reads "NVIDIA Jetson AGX Orin Developer Kit" on the host and
    "NVIDIA Jetson (tegra234)" in an l4t container, and an Orin Nano's container reads alike. The CUDA driver's answer
    is the same inside and outside: the engine is keyed on it, the board string is only information."""
    pytest.importorskip("onnxruntime", reason="the fallback is onnxruntime")
    monkeypatch.setattr(vision, "tensorrt_problem", lambda: None, raising=False)
    built_on_host = _source(*ALL_VISION, _engine(AGX_ORIN_GPU, AGX_BOARD))
    _driver(monkeypatch, AGX_ORIN_GPU)
    agx_container = detect_device(_fake_root(tmp_path / "agx", CONTAINER), ask_cuda=True)
    assert agx_container.board == "NVIDIA Jetson (tegra234)" != AGX_BOARD
    assert agx_container.engine_key == device_key(AGX_ORIN_GPU)
    choice = choose_vision(built_on_host, agx_container)
    assert choice.kind is VisionKind.TENSORRT and "was built for it" in choice.reason
    _driver(monkeypatch, ORIN_NANO_GPU)
    nano_container = detect_device(_fake_root(tmp_path / "nano", CONTAINER), ask_cuda=True)
    assert nano_container.board == agx_container.board  # the board string cannot tell them apart
    other = choose_vision(built_on_host, nano_container)
    assert other.kind is VisionKind.ONNXRUNTIME
    assert "built for Orin (sm 8.7, 16 multiprocessors, 59.9 GiB)" in other.reason
    assert "this GPU is Orin (sm 8.7, 8 multiprocessors, 7.4 GiB)" in other.reason
    # a board whose CUDA driver did not answer has no key: no engine is trusted
    blind = detect_device(_fake_root(tmp_path / "blind", CONTAINER), ask_cuda=False)
    assert blind.engine_key is None and engine_mismatch(built_on_host.manifest.artifacts[-1].target, blind)


def test_engine_must_match_the_whole_device_key_not_just_capability(tensorrt_10_3, monkeypatch):
    pytest.importorskip("onnxruntime", reason="the fallback is onnxruntime")
    monkeypatch.setattr(vision, "tensorrt_problem", lambda: None, raising=False)
    rtx = DeviceInfo("cuda", "NVIDIA GeForce RTX 4090", 32 * GIB, gpu_memory_free=20 * GIB, compute_capability="8.9",
                     gpu_name="NVIDIA GeForce RTX 4090", multiprocessors=128, gpu_total_memory=24 * GIB)
    l40s = {**RTX_4090, "name": "NVIDIA L40S", "multiprocessors": 142, "total_memory": 48 * GIB}
    other_gpu = choose_vision(_source(*ALL_VISION, _engine(l40s)), rtx)  # same capability 8.9
    assert other_gpu.kind is VisionKind.ONNXRUNTIME and "built for NVIDIA L40S (sm 8.9" in other_gpu.reason
    nano = _orin("NVIDIA Jetson Orin Nano Developer Kit", ORIN_NANO_GPU)
    other_board = choose_vision(_source(*ALL_VISION, _engine(AGX_ORIN_GPU, AGX_BOARD)), nano)
    assert other_board.kind is VisionKind.ONNXRUNTIME and "16 multiprocessors" in other_board.reason
    with pytest.raises(BackendUnavailableError, match="no TensorRT engine for NVIDIA Jetson Orin Nano"):
        choose_vision(_source(*ALL_VISION, _engine(AGX_ORIN_GPU, AGX_BOARD)), nano, "tensorrt")
    legacy = _artifact("tensorrt_engine", "fp16", 50, target={"gpu": "Orin", "compute_capability": "8.7",
                                                              "tensorrt": "10.3.0"})
    assert "older sqllava-edge" in choose_vision(_source(*ALL_VISION, legacy), _orin()).reason


def test_engine_without_cuda_buffers_falls_back_in_auto_and_refuses_on_request(tensorrt_10_3):
    """The TensorRT backend holds its buffers in CUDA torch tensors; this torch has no CUDA (a CPU wheel)."""
    pytest.importorskip("onnxruntime", reason="the fallback is onnxruntime")
    if vision.cuda_available():
        pytest.skip("this machine has CUDA torch: the TensorRT backend can run")
    source = _source(*ALL_VISION, _engine(AGX_ORIN_GPU, AGX_BOARD))
    auto = choose_vision(source, _orin())
    assert auto.kind is VisionKind.ONNXRUNTIME and "cannot run here" in auto.reason and "PyTorch built with CUDA" in auto.reason
    with pytest.raises(BackendUnavailableError, match="PyTorch built with CUDA"):
        choose_vision(source, _orin(), "tensorrt")


class FakeBackend:
    def __init__(self, path, **kwargs):
        self.path, self.kwargs, self.dropped_providers = path, kwargs, ()


def test_engine_that_does_not_deserialize_falls_back_with_the_reason(tensorrt_10_3, monkeypatch):
    pytest.importorskip("onnxruntime", reason="the fallback is onnxruntime")
    monkeypatch.setattr(vision, "tensorrt_problem", lambda: None, raising=False)

    def broken_engine(path, device_index=0):
        raise BackendUnavailableError(f"TensorRT 10.3.0 could not deserialize {path}: it was built for another GPU")

    monkeypatch.setattr(vision, "TensorRTVision", broken_engine)
    monkeypatch.setattr(vision, "OnnxVision", FakeBackend)
    source = _source(*ALL_VISION, _engine(AGX_ORIN_GPU, AGX_BOARD))
    backend, choice = load_vision_checked(choose_vision(source, _orin()), source, _orin())
    assert isinstance(backend, FakeBackend) and "could not deserialize" in choice.reason and "onnxruntime" in choice.reason
    with pytest.raises(BackendUnavailableError, match="could not deserialize"):
        load_vision_checked(choose_vision(source, _orin(), "tensorrt"), source, _orin())


# --------------------------------------------------------------------------------------------------------------------
# TensorRT without PyTorch: cuda-python buffers. The fakes model the documented APIs on host memory
# (cudaMalloc hands out host blocks, cudaMemcpyAsync is a memmove, the "engine" doubles its input): they check the
# plumbing (dtypes, addresses, batching over the profile, copies back), not a GPU.


class FakeCudart:
    class cudaError_t:  # noqa: N801 - cuda-python's names
        cudaSuccess = 0

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self):
        self.blocks, self.copies = {}, []

    def cudaGetDeviceCount(self):  # noqa: N802
        return 0, 1

    def cudaSetDevice(self, index):  # noqa: N802
        return (0,)

    def cudaGetDeviceProperties(self, index):  # noqa: N802
        return 0, type("cudaDeviceProp", (), {"name": b"Orin"})()

    def cudaStreamCreate(self):  # noqa: N802
        return 0, 7

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        return (0,)

    def cudaStreamDestroy(self, stream):  # noqa: N802
        return (0,)

    def cudaMalloc(self, nbytes):  # noqa: N802
        block = ctypes.create_string_buffer(nbytes)
        self.blocks[ctypes.addressof(block)] = block
        return 0, ctypes.addressof(block)

    def cudaFree(self, pointer):  # noqa: N802
        self.blocks.pop(pointer)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):  # noqa: N802
        ctypes.memmove(dst, src, nbytes)
        self.copies.append(kind)
        return (0,)


class FakeTensorRT:
    """The TensorRT 10 runtime calls TensorRTVision makes; an fp16 engine mapping (b, 3, 4, 4) -> (b, 3, 16) * 2."""

    __version__ = "10.3.0"
    float32, float16 = "float32", "float16"

    class TensorIOMode:
        INPUT, OUTPUT = "input", "output"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return FakeEngine() if data == b"engine for Orin" else None


class FakeEngine:
    num_io_tensors = 2

    def get_tensor_name(self, i):
        return ["pixel_values", "image_embeds"][i]

    def get_tensor_mode(self, name):
        return "input" if name == "pixel_values" else "output"

    def get_tensor_dtype(self, name):
        return "float16"

    def get_tensor_profile_shape(self, name, profile):
        return [(1, 3, 4, 4), (1, 3, 4, 4), (2, 3, 4, 4)]

    def get_tensor_shape(self, name):
        return (-1, 3, 4, 4)

    def create_execution_context(self):
        return FakeContext()


class FakeContext:
    def __init__(self):
        self.shape, self.addresses = None, {}

    def set_input_shape(self, name, shape):
        assert shape[0] <= 2, "a batch beyond the profile's max"
        self.shape = shape

    def get_tensor_shape(self, name):
        return (self.shape[0], 3, 16)

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def execute_async_v3(self, stream):
        x = np.empty(self.shape, np.float16)
        ctypes.memmove(x.ctypes.data, self.addresses["pixel_values"], x.nbytes)
        y = np.ascontiguousarray(x.reshape(self.shape[0], 3, 16) * 2)
        ctypes.memmove(self.addresses["image_embeds"], y.ctypes.data, y.nbytes)
        return stream == 7


def test_tensorrt_runs_on_cuda_python_buffers_without_torch():
    cudart = FakeCudart()
    backend = vision.TensorRTVision.from_bytes(b"engine for Orin", "vision.orin.engine", trt=FakeTensorRT(),
                                               buffers=vision.CudaPythonBuffers(cudart=cudart))
    pixels = np.random.default_rng(0).standard_normal((3, 3, 4, 4)).astype(np.float32)
    out = backend.encode(pixels)  # batches of 2 + 1 (the profile's max is 2)
    assert out.dtype == np.float32 and out.shape == (3, 3, 16)
    np.testing.assert_allclose(out, pixels.reshape(3, 3, 16).astype(np.float16).astype(np.float32) * 2, rtol=1e-3)
    assert "Orin" in backend.description and len(cudart.blocks) == 2  # one input and one output buffer, reused
    assert cudart.copies == [1, 2, 1, 2]  # host -> device, engine, device -> host, per batch
    backend.close()
    assert not cudart.blocks
    with pytest.raises(BackendUnavailableError, match="could not deserialize vision.other.engine"):
        vision.TensorRTVision.from_bytes(b"engine for another GPU", "vision.other.engine", trt=FakeTensorRT(),
                                         buffers=vision.CudaPythonBuffers(cudart=FakeCudart()))


def test_cuda_python_is_enough_for_tensorrt(monkeypatch, tensorrt_10_3):
    """With cuda-python (and a device) the TensorRT backend needs no CUDA torch: auto selection takes the engine."""
    monkeypatch.setattr(vision, "cuda_available", lambda: False)
    monkeypatch.setattr(vision, "import_cudart", lambda: FakeCudart())
    assert vision.tensorrt_problem() is None
    choice = choose_vision(_source(*ALL_VISION, _engine(AGX_ORIN_GPU, AGX_BOARD)), _orin())
    assert choice.kind is VisionKind.TENSORRT
    monkeypatch.setattr(vision, "import_cudart", lambda: None)
    assert "cuda-python is not installed" in vision.tensorrt_problem()



class NoDeviceCudart(FakeCudart):
    """cuda-python present, but cudaSetDevice fails (driver / device trouble): CudaPythonBuffers raises RuntimeError."""

    def cudaSetDevice(self, index):  # noqa: N802
        return ("cudaErrorNoDevice",)


class BF16Engine(FakeEngine):
    def get_tensor_dtype(self, name):
        return "bfloat16"  # a dtype TensorRTVision does not map to numpy


class BF16TensorRT(FakeTensorRT):
    class Runtime(FakeTensorRT.Runtime):
        def deserialize_cuda_engine(self, data):
            return BF16Engine()


@pytest.mark.parametrize("trt,cudart,error", [
    (FakeTensorRT(), NoDeviceCudart(), RuntimeError),  # CudaPythonBuffers.__init__: CUDA runtime call failed
    (BF16TensorRT(), FakeCudart(), ValueError),  # an engine with bf16 tensors
], ids=["cuda-buffers", "bf16-engine"])
def test_any_engine_load_failure_falls_back_in_auto_and_raises_on_request(tensorrt_10_3, monkeypatch, tmp_path, trt,
                                                                           cudart, error):
    pytest.importorskip("onnxruntime", reason="the fallback is onnxruntime")
    monkeypatch.setattr(vision, "tensorrt_problem", lambda: None, raising=False)
    monkeypatch.setattr(vision, "_import_tensorrt", lambda: trt)
    monkeypatch.setattr(vision, "cuda_available", lambda: False)
    monkeypatch.setattr(vision, "import_cudart", lambda: cudart)
    monkeypatch.setattr(vision, "OnnxVision", FakeBackend)
    engine = _engine(AGX_ORIN_GPU, AGX_BOARD)
    source = _source(*ALL_VISION, engine)
    source.folder = tmp_path
    (tmp_path / engine.path).parent.mkdir(parents=True)
    (tmp_path / engine.path).write_bytes(b"engine for Orin")
    backend, choice = load_vision_checked(choose_vision(source, _orin()), source, _orin())
    assert isinstance(backend, FakeBackend) and "onnxruntime" in choice.reason
    assert f"TensorRT said: {error.__name__}" in choice.reason
    with pytest.raises(error):
        load_vision_checked(choose_vision(source, _orin(), "tensorrt"), source, _orin())


def test_cuda_python_hint_pins_12_and_jetpack_6_0_hears_about_tensorrt_first(monkeypatch):
    """`pip install cuda-python` on JetPack 6 brings 13.x (CUDA 13): the hint pins <13 as the runtime-gpu extra does.
    JetPack 6.0 (TensorRT 8.6) without cuda-python: the TensorRT refusal comes first, not a buffer hint that would
    leave the user with a TensorRT that still cannot run."""
    monkeypatch.setattr(vision, "cuda_available", lambda: False)
    monkeypatch.setattr(vision, "import_cudart", lambda: None)
    monkeypatch.delenv("SQLLAVA_EDGE_VISION_BACKEND", raising=False)
    current = type(sys)("tensorrt")
    current.__version__ = "10.3.0"
    monkeypatch.setitem(sys.modules, "tensorrt", current)
    assert "pip install 'cuda-python>=12.6,<13'" in vision.tensorrt_problem()
    old = type(sys)("tensorrt")
    old.__version__ = "8.6.2.3"
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    with pytest.raises(BackendUnavailableError) as caught:
        choose_vision(_source(*ALL_VISION), _orin(), "tensorrt")
    assert "TensorRT 8.6.2.3 is too old" in str(caught.value) and "cuda-python" not in str(caught.value)

# --------------------------------------------------------------------------------------------------------------------
# onnxruntime-gpu that lists CUDA but runs on the CPU


def _tiny_onnx(path):
    onnx = pytest.importorskip("onnx", reason="building a test graph needs onnx")
    from onnx import TensorProto, helper

    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [0, 3, 16])
    graph = helper.make_graph([helper.make_node("Reshape", ["pixel_values", "shape"], ["image_embeds"])], "tiny",
                              [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["B", 3, 4, 4])],
                              [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["B", 3, 16])], [shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")  # the CPU wheel's own note
def test_onnxruntime_cuda_that_does_not_start_is_reported_or_refused(tmp_path, monkeypatch):
    """onnxruntime-gpu without CUDA/cuDNN libraries lists CUDAExecutionProvider, then runs the session on the CPU.
    Here: the CPU wheel, made to list CUDA as onnxruntime-gpu does; its real session falls back to the CPU."""
    ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime")
    path = _tiny_onnx(tmp_path / "vision.onnx")
    listed = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: listed)
    with pytest.raises(BackendUnavailableError, match="could not start it"):
        vision.OnnxVision(path, providers=("cuda", "cpu"))
    backend = vision.OnnxVision(path, providers=("cuda", "cpu"), allow_cpu_fallback=True)
    assert backend.dropped_providers == ("cuda",) and backend.encode(np.ones((1, 3, 4, 4), np.float32)).shape == (1, 3, 16)
    # automatic selection says so in the reason
    source = _source(Artifact("vision_onnx", "vision.onnx", ["vision.onnx"], "fp32", 1, {"vision.onnx": "0" * 64}))
    source.folder = tmp_path
    choice = select.VisionChoice(VisionKind.ONNXRUNTIME, "jetson GPU", source.manifest.artifacts[0], ("cuda", "cpu"))
    backend, choice = load_vision_checked(choice, source, _orin())
    assert choice.providers == ("cpu",) and "vision runs on the CPU" in choice.reason


def test_onnxruntime_cuda_arena_is_capped():
    ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime")
    name, options = vision._ort_provider(type("ort", (), {"__version__": ort.__version__,
                                                         "get_available_providers": staticmethod(lambda: ["CUDAExecutionProvider"])}),
                                         "cuda", None, 3 * GIB)
    assert name == "CUDAExecutionProvider" and options["gpu_mem_limit"] == 3 * GIB
    plan = plan_memory(get_preset("sqllava-7b"), _orin(), llm_bytes=4 * GIB, vision_bytes=GIB // 2, n_ctx=1024,
                       kv_bytes_per_value=2, llm_on_gpu=True, vision_on_gpu=True)
    assert plan.vision_bytes == plan.pools[0].needs["vision weights"] + plan.pools[0].needs["vision workspace"]


# --------------------------------------------------------------------------------------------------------------------
# llama.cpp without GPU offload on a GPU machine


def test_cpu_only_llama_cpp_on_a_gpu_plans_for_the_cpu(monkeypatch):
    pytest.importorskip("llama_cpp", reason="the llama.cpp choice checks llama-cpp-python is importable")
    monkeypatch.delenv("SQLLAVA_EDGE_LLM_BACKEND", raising=False)
    rtx = DeviceInfo("cuda", "RTX", 32 * GIB, gpu_memory_free=20 * GIB, compute_capability="8.9", gpu_name="RTX")
    source = _source(*[_artifact("llm_gguf", p, s) for p, s in (("f16", 14), ("q8_0", 8), ("q4_k_m", 4))])
    asked = []
    monkeypatch.setattr(select, "_gpu_offload_supported", lambda: False)  # PyPI's CPU wheel
    cpu = choose_llm(source, rtx, fits=lambda a, layers: asked.append(layers) or True)
    assert cpu.artifact.precision == "q8_0" and cpu.gpu_layers == 0 and asked == [0]
    assert "no GPU offload" in cpu.reason and "llama.cpp CPU" in cpu.reason
    monkeypatch.setattr(select, "_gpu_offload_supported", lambda: True)
    gpu = choose_llm(source, rtx, fits=lambda a, layers: asked.append(layers) or True)
    assert gpu.artifact.precision == "f16" and gpu.gpu_layers == -1 and asked[-1] == -1


# --------------------------------------------------------------------------------------------------------------------
# Memory plan: CUDA context, partial offload


def test_plan_counts_the_cuda_context_on_a_jetson():
    config = get_preset("sqllava-7b")
    parts = dict(llm_bytes=int(3.8 * GIB), vision_bytes=int(0.3 * GIB), n_ctx=1024, kv_bytes_per_value=2)
    on_gpu = plan_memory(config, _orin(), llm_on_gpu=True, vision_on_gpu=True, ram_available=6 * GIB, **parts)
    on_cpu = plan_memory(config, _orin(), ram_available=6 * GIB, **parts)
    assert on_gpu.pools[0].needs["CUDA context + libraries"] >= CUDA_CONTEXT_BYTES
    assert "CUDA context" not in on_cpu.describe()
    assert on_cpu.fits and not on_gpu.fits  # the context is what tips an 8 GB Orin Nano over


def test_partly_offloaded_llm_counts_only_its_share_on_the_gpu():
    config = get_preset("sqllava-7b")
    gpu = DeviceInfo("cuda", "RTX", 32 * GIB, gpu_memory_free=8 * GIB, compute_capability="8.9", gpu_name="RTX")
    plan = plan_memory(config, gpu, llm_bytes=12 * GIB, vision_bytes=GIB, n_ctx=2048, kv_bytes_per_value=2,
                       llm_on_gpu=True, llm_gpu_share=0.25)
    by_name = {p.name: p for p in plan.pools}
    assert by_name["GPU memory"].needs["LLM weights"] == 3 * GIB and by_name["RAM"].needs["LLM weights"] == 9 * GIB
    assert by_name["GPU memory"].fits and "CUDA context + libraries" in by_name["GPU memory"].needs
    assert by_name["GPU memory"].needs["KV cache"] + by_name["RAM"].needs["KV cache"] == kv_cache_bytes(config.llm, 2048)


# --------------------------------------------------------------------------------------------------------------------
# Sequence pool (a recording fake backend: tests/fake_llm.py)


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

