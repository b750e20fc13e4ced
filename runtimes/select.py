"""Which backends to run here, and why: device detection, then a choice with a reason string, then loading.

    device = detect_device()                                  # NVIDIA desktop GPU / Jetson / CPU (+ VNNI, AMX)
    vision, reason = select_vision(source, device)            # auto, an argument, or SQLLAVA_EDGE_VISION_BACKEND
    llm, reason = select_llm(source, device, n_ctx=2048)      # auto, an argument, or SQLLAVA_EDGE_LLM_BACKEND

Auto choice: desktop GPU -> TensorRT engine built for this GPU, else onnxruntime CUDA, and llama.cpp
with every layer offloaded; Jetson -> TensorRT + llama.cpp CUDA; CPU -> onnxruntime (int8 vision where the CPU has
VNNI/AMX and the bundle has it) + llama.cpp. A training checkpoint runs on the torch backends. An explicitly
requested backend that cannot run raises BackendUnavailableError naming what is missing; it is never swapped.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

from runtimes import quality
from runtimes.base import LLMKind, VisionKind
from sqllava_edge.checkpoint import META_FILE
from sqllava_edge.config import ModelConfig
from sqllava_edge.errors import BackendUnavailableError, BundleError

VISION_ENV = "SQLLAVA_EDGE_VISION_BACKEND"
LLM_ENV = "SQLLAVA_EDGE_LLM_BACKEND"
INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # CPU features that make int8 matmuls fast
# GGUF precision preference per device kind, best quality that usually fits first (memory.py may skip to smaller).
GGUF_PREFERENCE = {
    "cuda": ("f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q4_0", "iq4_nl", "f32"),
    "jetson": ("q4_k_m", "q5_k_m", "q4_k_s", "q4_0", "iq4_nl", "q6_k", "q8_0", "f16", "bf16", "f32"),
    "cpu": ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q4_0", "iq4_nl", "f16", "bf16", "f32"),
}


# --------------------------------------------------------------------------------------------------------------------
# Device detection


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cuda" (NVIDIA desktop/server GPU), "jetson" (integrated GPU, shared RAM) or "cpu"
    name: str  # GPU name (cuda), board name (jetson) or the CPU model
    ram_available: int  # bytes of RAM available now (MemAvailable); on Jetson the GPU shares it
    gpu_memory_free: int | None = None  # bytes free on a discrete GPU
    compute_capability: str | None = None  # e.g. "8.9"; "8.7" on Jetson Orin
    cpu_flags: frozenset[str] = field(default_factory=frozenset)  # the INT8_CPU_FLAGS and avx2/avx512f this CPU has
    gpu_name: str | None = None  # the CUDA device name (cuDeviceGetName), what export.trt records: "Orin" on Orin
    board: str | None = None  # Jetson only: the board as detect_jetson reads it (information only: containers hide it)
    multiprocessors: int | None = None  # the GPU's multiprocessor count, from the CUDA driver (None: not asked)
    gpu_total_memory: int | None = None  # bytes, cuDeviceTotalMem (on a Jetson the RAM it shares)
    gpu_index: int = 0  # the CUDA device (in CUDA's numbering, after CUDA_VISIBLE_DEVICES) planned and used

    @property
    def engine_key(self) -> dict | None:
        """What a TensorRT engine built for this GPU is keyed on (device_key), None when the CUDA driver was not asked."""
        if None in (self.gpu_name, self.compute_capability, self.multiprocessors, self.gpu_total_memory):
            return None
        return device_key({"name": self.gpu_name, "compute_capability": self.compute_capability,
                           "multiprocessors": self.multiprocessors, "total_memory": self.gpu_total_memory})

    @property
    def fast_int8(self) -> bool:
        return any(flag in self.cpu_flags for flag in INT8_CPU_FLAGS)

    @property
    def has_gpu(self) -> bool:
        return self.kind in ("cuda", "jetson")


def read_cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU flags selection looks at (int8 dot products, AVX2 / AVX-512, ARM dot product / i8mm); empty if unknown."""
    from runtimes.device_facts import cpu_flags, read_cpuinfo

    present = set(cpu_flags(read_cpuinfo(cpuinfo)))
    return frozenset(present & {*INT8_CPU_FLAGS, "avx2", "avx512f", "asimddp", "i8mm"})


def _cpu_name(root: Path) -> str:
    from runtimes.device_facts import read_cpuinfo

    return read_cpuinfo(root / "proc/cpuinfo").get("model name") or "CPU"


def read_mem_available(meminfo: str | os.PathLike = "/proc/meminfo") -> int:
    """MemAvailable in bytes (0 if unknown)."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return 0


# Tegra SoC -> (CUDA device name as cuDeviceGetName reports it, compute capability), for when CUDA itself cannot be
# asked (no libcuda in a container): Orin is "Orin", 8.7 (edge-deployment.md section 5). JetPack 6.1+ is Orin only.
TEGRA_GPUS = {"tegra234": ("Orin", "8.7")}
TEGRA_CHIP_IDS = {35: "tegra234"}  # /sys/devices/soc0/soc_id: the chip id (0x23 = T234, Orin)


def _device_tree_strings(path: Path) -> list[str]:
    """A device-tree string-list property (NUL-separated), [] when absent or unreadable."""
    try:
        raw = path.read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace").strip() for part in raw.split(b"\x00") if part.strip()]


def tegra_soc(root: str | os.PathLike = "/") -> str | None:
    """The Tegra SoC ("tegra234" on Orin) from the device tree's `compatible` list, else /sys/devices/soc0.

    Containers often see no /etc/nv_tegra_release, and Docker masks /sys/firmware (behind /proc/device-tree), but
    /sys/devices/soc0 (family "Tegra", soc_id = chip id) stays visible.
    """
    root = Path(root)
    for entry in _device_tree_strings(root / "proc/device-tree/compatible"):
        match = re.fullmatch(r"nvidia,(tegra\d+)", entry)
        if match:
            return match.group(1)
    soc0 = root / "sys/devices/soc0"
    family = _device_tree_strings(soc0 / "family")
    if family and family[0].lower() == "tegra":
        ids = _device_tree_strings(soc0 / "soc_id")
        chip = int(ids[0]) if ids and ids[0].isdigit() else None
        return TEGRA_CHIP_IDS.get(chip, "tegra") if chip is not None else "tegra"
    return None


def detect_jetson(root: str | os.PathLike = "/") -> str | None:
    """The Jetson board name (/proc/device-tree/model), None elsewhere.

    A Jetson is recognised by a Tegra SoC (device tree `compatible`, /sys/devices/soc0), "Jetson" in the model, or
    /etc/nv_tegra_release: an Orin NX devkit's model is "NVIDIA Orin NX Developer Kit", without "Jetson".
    """
    root = Path(root)
    model = _device_tree_strings(root / "proc/device-tree/model")
    name = model[0] if model else ""
    release = root / "etc/nv_tegra_release"
    soc = tegra_soc(root)
    if soc is None and "jetson" not in name.lower() and not release.is_file():
        return None
    if name:
        return name
    if release.is_file():
        lines = release.read_text(errors="replace").splitlines()
        return f"NVIDIA Jetson ({lines[0].lstrip('# ').strip()})" if lines else "NVIDIA Jetson"
    return f"NVIDIA Jetson ({soc})"


def device_key(device: dict) -> dict:
    """The identity of a GPU that TensorRT engines and timing caches are keyed on: what the CUDA driver reports, the
    same on the host and inside a container (name, compute capability, multiprocessor count, total memory).

    The board string is not part of it: Docker hides /proc/device-tree, so one Jetson reads "NVIDIA Jetson AGX Orin
    Developer Kit" on the host and "NVIDIA Jetson (tegra234)" in an l4t container, while two Orin boards built in
    containers would read alike. The driver tells an AGX Orin (16 or 14 multiprocessors, 64 / 32 GB) from an Orin NX or
    Nano (8 or 4, 16 / 8 / 4 GB) wherever it runs. device: a cuda_driver_devices() entry.
    """
    return {"gpu": device["name"], "compute_capability": device["compute_capability"],
            "multiprocessors": int(device["multiprocessors"]), "total_memory": int(device["total_memory"])}


def _load_libcuda():
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def cuda_driver_devices(lib=None) -> list[dict]:
    """The CUDA devices in CUDA's own numbering (CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER applied, fastest first by
    default), via the driver library: no toolkit, no torch, no context. [] without a usable driver.

    Each: index, name (cuDeviceGetName: "Orin" on Jetson Orin), compute_capability, multiprocessors, pci_bus_id,
    total_memory. lib: a loaded libcuda (tests pass a fake).
    """
    lib = lib if lib is not None else _load_libcuda()
    if lib is None or lib.cuInit(0) != 0:
        return []
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return []
    devices = []
    for index in range(count.value):
        dev, major, minor, sms = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        total = ctypes.c_size_t(0)
        name, bus = ctypes.create_string_buffer(256), ctypes.create_string_buffer(32)
        if lib.cuDeviceGet(ctypes.byref(dev), index) != 0:
            continue
        lib.cuDeviceGetName(name, 256, dev)
        lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
        lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ..._MINOR
        lib.cuDeviceGetAttribute(ctypes.byref(sms), 16, dev)  # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
        lib.cuDeviceGetPCIBusId(bus, 32, dev)  # "domain:bus:device.function"; empty on a Jetson's integrated GPU
        lib.cuDeviceTotalMem_v2(ctypes.byref(total), dev)
        devices.append({"index": index, "name": name.value.decode(errors="replace"),
                        "compute_capability": f"{major.value}.{minor.value}", "multiprocessors": int(sms.value),
                        "pci_bus_id": bus.value.decode(errors="replace"), "total_memory": int(total.value)})
    return devices


def _pci_key(bus_id: str) -> tuple[int, ...] | None:
    """'00000000:01:00.0' (nvidia-smi) and '0000:01:00.0' (CUDA) -> the same key."""
    match = re.fullmatch(r"([0-9a-fA-F]+):([0-9a-fA-F]+):([0-9a-fA-F]+)\.([0-9a-fA-F]+)", bus_id.strip())
    return tuple(int(part, 16) for part in match.groups()) if match else None


def _nvidia_smi_free(bus_id: str) -> int | None:
    """Free bytes of the GPU at this PCI bus id, from nvidia-smi (which lists GPUs in PCI order, ignoring
    CUDA_VISIBLE_DEVICES: so the row is picked by bus id, never by position). None if unknown."""
    if not shutil.which("nvidia-smi") or _pci_key(bus_id) is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=pci.bus_id,memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    for line in out.strip().splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 2 and _pci_key(parts[0]) == _pci_key(bus_id):
            try:
                return int(float(parts[1])) * 2**20
            except ValueError:
                return None
    return None


def _query_nvidia_gpu() -> tuple[dict, int] | None:
    """(cuda_driver_devices entry, free bytes) of the GPU that CUDA numbers 0, the one the memory plan checks and
    llama.cpp (main_gpu, no split), onnxruntime and TensorRT are pinned to; None without a usable CUDA driver.

    Name and capability come from the CUDA driver (honouring CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER); free memory
    from nvidia-smi's row with the same PCI bus id, else the device's total memory (no CUDA context is created here:
    one would hold ~300-400 MiB of GPU memory for the life of the process).
    """
    devices = cuda_driver_devices()
    if not devices:
        return None
    device = devices[0]
    free = _nvidia_smi_free(device["pci_bus_id"])
    return device, device["total_memory"] if free is None else free


def _jetson_gpu(root: Path, board: str, query_cuda: bool) -> dict:
    """A Jetson's GPU as cuda_driver_devices describes it when CUDA answers, else name and compute capability from
    the SoC table (the SoC from the device tree or soc0; failing those an "Orin" board, or L4T R36, which supports
    only Orin), without the multiprocessor count and memory that only the driver knows."""
    devices = cuda_driver_devices() if query_cuda else []
    if devices:
        return devices[0]
    soc = tegra_soc(root)
    if soc not in TEGRA_GPUS:
        try:
            release = (root / "etc/nv_tegra_release").read_text(errors="replace")
        except OSError:
            release = ""
        if "orin" in board.lower() or release.startswith("# R36 "):
            soc = "tegra234"
    name, capability = TEGRA_GPUS.get(soc or "", (None, None))
    return {"name": name, "compute_capability": capability}


def detect_device(root: str | os.PathLike = "/", ask_cuda: bool | None = None) -> DeviceInfo:
    """What this machine offers. `root` lets tests point /proc, /sys and /etc at a fake tree; the CUDA driver is asked
    on the real tree only, unless ask_cuda says otherwise (tests with a fake driver)."""
    root = Path(root)
    flags = read_cpu_flags(root / "proc/cpuinfo")
    ram = read_mem_available(root / "proc/meminfo")
    real = root == Path("/") if ask_cuda is None else ask_cuda
    jetson = detect_jetson(root)
    if jetson is not None:
        gpu = _jetson_gpu(root, jetson, real)
        return DeviceInfo("jetson", jetson, ram, compute_capability=gpu["compute_capability"], cpu_flags=flags,
                          gpu_name=gpu["name"], board=jetson, multiprocessors=gpu.get("multiprocessors"),
                          gpu_total_memory=gpu.get("total_memory"), gpu_index=gpu.get("index", 0))
    found = _query_nvidia_gpu() if real else None
    if found is not None:
        gpu, free = found
        return DeviceInfo("cuda", gpu["name"], ram, gpu_memory_free=free, compute_capability=gpu["compute_capability"],
                          cpu_flags=flags, gpu_name=gpu["name"], multiprocessors=gpu["multiprocessors"],
                          gpu_total_memory=gpu["total_memory"], gpu_index=gpu["index"])
    return DeviceInfo("cpu", _cpu_name(root), ram, cpu_flags=flags)


def resolve_device(device: str | DeviceInfo | None) -> DeviceInfo:
    """None = detect; "cpu" = ignore any GPU; "cuda" / "jetson" = require that kind of device."""
    if isinstance(device, DeviceInfo):
        return device
    found = detect_device()
    if device is None:
        return found
    if device == "cpu":
        return DeviceInfo("cpu", _cpu_name(Path("/")), found.ram_available, cpu_flags=found.cpu_flags)
    if device in ("cuda", "jetson", "gpu"):
        if not found.has_gpu or (device != "gpu" and found.kind != device):
            raise BackendUnavailableError(
                f"device {device!r} was requested but this machine is {found.kind} ({found.name}): no NVIDIA "
                f"{'Jetson' if device == 'jetson' else 'GPU'} was found (the CUDA driver libcuda, /etc/nv_tegra_release, "
                "the device tree, /sys/devices/soc0); use device='cpu' or leave device unset"
            )
        return found
    raise ValueError(f"unknown device {device!r}; valid: None (auto), 'cpu', 'cuda', 'jetson', 'gpu'")


# --------------------------------------------------------------------------------------------------------------------
# What the model folder offers


@dataclass
class ModelSource:
    """A deployment bundle (manifest + artifacts) or a training checkpoint folder (torch backends only)."""

    folder: Path
    config: ModelConfig
    manifest: object | None = None  # sqllava_edge.bundle.Manifest for a bundle
    _torch: tuple | None = None  # (SQLLaVA, Tokenizer) once loaded
    quality_floor: object | None = None  # runtimes.quality.QualityFloor the automatic choice keeps; None = none

    @property
    def is_bundle(self) -> bool:
        return self.manifest is not None

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> "ModelSource":
        from sqllava_edge.bundle import MANIFEST_FILE, read_manifest

        folder = Path(path)
        if not folder.exists():
            raise FileNotFoundError(f"{folder} does not exist; pass a bundle folder (python -m export) or a checkpoint folder")
        if (folder / MANIFEST_FILE).is_file():
            manifest = read_manifest(folder, verify=verify)
            try:
                config = manifest.config
            except (TypeError, ValueError) as exc:
                raise BundleError(f"{folder}: the manifest's model config is invalid ({exc}); re-export the bundle") from None
            return cls(folder, config, manifest)
        if (folder / META_FILE).is_file():
            from sqllava_edge.deps import require

            require("torch", "train", f"{folder}, a training checkpoint (the torch backends; a device runs its "
                    "exported bundle),")
            from sqllava_edge.checkpoint import read_meta

            return cls(folder, ModelConfig.from_dict(read_meta(folder)["config"]))
        raise BundleError(f"{folder} is neither a bundle (no manifest.json) nor a training checkpoint "
                          "(no sqllava_edge.json); export one with: python -m export CHECKPOINT --out BUNDLE")

    def torch_model(self, device: DeviceInfo):
        """(SQLLaVA, Tokenizer) from the checkpoint, loaded once and shared by the torch backends."""
        if self.is_bundle:
            source = self.manifest.provenance.get("source_checkpoint")
            hint = f" (this bundle was exported from {source})" if source else ""
            raise BackendUnavailableError(f"the torch backends need the training checkpoint folder, not a bundle{hint}; "
                                          "pass the checkpoint path to Assistant.load")
        if self._torch is None:
            from sqllava_edge.checkpoint import load_checkpoint

            self._torch = load_checkpoint(self.folder, merge_lora=True, device="cuda" if device.kind == "cuda" else "cpu")
        return self._torch

    def artifact_path(self, artifact) -> Path:
        return self.manifest.resolve(self.folder, artifact)


# --------------------------------------------------------------------------------------------------------------------
# Choices (pure decisions, testable without loading anything)


@dataclass(frozen=True)
class VisionChoice:
    kind: VisionKind
    reason: str
    artifact: object | None = None  # bundle Artifact (vision_onnx or tensorrt_engine); None for torch
    providers: tuple[str, ...] = ()  # onnxruntime providers, short names
    requested: bool = False  # asked for explicitly (argument or environment): never swapped for another backend
    fallback: "VisionChoice | None" = None  # auto TensorRT only: what to load if the engine does not load
    n_threads: int | None = None  # measured best (runtimes.tune); None = the caller's n_threads


@dataclass(frozen=True)
class LLMChoice:
    kind: LLMKind
    reason: str
    artifact: object | None = None  # bundle Artifact (llm_gguf); None for torch
    gpu_layers: int = 0  # llama.cpp layers offloaded to the GPU (-1 = all)
    exact: bool = False  # llama.cpp: f32 KV cache and no flash attention (f16 math), for an f32 GGUF
    extra_buffers: bool | None = None  # llama.cpp weight repacking, measured (runtimes.tune); None = LlamaCppLLM's rule
    n_threads: int | None = None  # measured best for single tokens / for batches; None = the caller's n_threads
    n_threads_batch: int | None = None
    n_ubatch: int | None = None  # llama.cpp micro-batch, measured (runtimes.tune); None = n_batch


def requested_kind(enum, argument: str | None, env: str):
    """The backend asked for by the argument, else by the environment variable, else None (auto)."""
    value, origin = (argument, "argument") if argument is not None else (os.environ.get(env) or None, env)
    if value is None or value == "auto":
        return None, ""
    try:
        return enum(value), f"requested by {origin}={value!r}"
    except ValueError:
        valid = ", ".join(k.value for k in enum)
        raise ValueError(f"unknown backend {value!r} ({origin}); valid: auto, {valid}") from None


def choose_vision(source: ModelSource, device: DeviceInfo, requested: str | None = None,
                  precision: str | None = None) -> VisionChoice:
    kind, why = requested_kind(VisionKind, requested, VISION_ENV)
    if not source.is_bundle:
        if kind not in (None, VisionKind.TORCH):
            raise BackendUnavailableError(f"vision backend {kind.value!r} needs an exported bundle, but {source.folder} "
                                          "is a training checkpoint; export it: python -m export CHECKPOINT --out BUNDLE")
        return VisionChoice(VisionKind.TORCH, why or "training checkpoint folder: PyTorch vision tower + projector",
                            requested=kind is not None)
    if kind is VisionKind.TORCH:
        source.torch_model(device)  # raises: a bundle has no PyTorch weights
    trt_note = ""
    if kind in (None, VisionKind.TENSORRT) and device.has_gpu:
        engine, trt_note = _matching_engine(source, device)
        if engine is not None:
            from runtimes.vision import tensorrt_problem

            problem = tensorrt_problem()
            if problem is None:
                reason = why or f"{device.kind} GPU {device.name}: TensorRT engine {engine.path} was built for it"
                if kind is not None:
                    return VisionChoice(VisionKind.TENSORRT, reason, engine, requested=True)
                fallback = _onnx_choice(source, device, precision, "", f"TensorRT engine {engine.path} did not load", False,
                                        strict=False)
                return VisionChoice(VisionKind.TENSORRT, reason, engine, fallback=fallback)
            if kind is VisionKind.TENSORRT:
                raise BackendUnavailableError(f"the TensorRT engine {engine.path} fits this GPU but cannot run here: {problem}")
            trt_note = f"TensorRT engine {engine.path} fits this GPU but cannot run here ({problem})"
    if kind is VisionKind.TENSORRT:
        _explain_no_tensorrt(source, device, trt_note)
    return _onnx_choice(source, device, precision, why, trt_note, kind is not None)


def _onnx_choice(source: ModelSource, device: DeviceInfo, precision: str | None, why: str, trt_note: str,
                 requested: bool, strict: bool = True) -> VisionChoice | None:
    """The onnxruntime choice; strict=False returns None instead of raising when onnxruntime cannot serve."""
    from runtimes.vision import ort_available_providers

    providers = ort_available_providers()
    if not providers:
        if not strict:
            return None
        from runtimes.vision import _import_onnxruntime

        _import_onnxruntime()  # raises BackendUnavailableError naming the package
    use_cuda = device.has_gpu and "cuda" in providers
    try:
        artifact, note = _pick_onnx(source, device, precision, use_cuda)
    except BundleError:
        if not strict:
            return None
        raise
    chosen = ("cuda", "cpu") if use_cuda else ("cpu",)
    where = "CUDA" if use_cuda else "CPU"
    if not why:
        if device.has_gpu and not use_cuda:
            why = (f"{device.kind} GPU found ({trt_note or 'no TensorRT engine for it in the bundle'}) but this "
                   "onnxruntime has no CUDA provider (install onnxruntime-gpu)")
        elif device.has_gpu:
            why = f"{device.kind} GPU {device.name}: {trt_note or 'no TensorRT engine for it in the bundle'}"
        else:
            why = f"no NVIDIA GPU ({device.name})"
    return VisionChoice(VisionKind.ONNXRUNTIME, f"{why}; onnxruntime {where}, {artifact.path} ({note})", artifact, chosen,
                        requested=requested)


def _pick_onnx(source: ModelSource, device: DeviceInfo, precision: str | None, use_cuda: bool):
    manifest = source.manifest
    if precision is not None:
        artifact = manifest.find("vision_onnx", precision)
        if artifact is None:
            have = [a.precision for a in manifest.find_all("vision_onnx")]
            raise BundleError(f"{source.folder} has no {precision} vision ONNX (it has {have or 'none'}); "
                              f"export it: python -m export CHECKPOINT --out {source.folder} --vision-precision {precision}")
        return artifact, f"{precision} as requested"
    if use_cuda:
        order, note = ("fp16", "fp32", "int8"), "fp16 preferred on a GPU"
    elif device.fast_int8:
        flags = "/".join(sorted(f for f in device.cpu_flags if f in INT8_CPU_FLAGS))
        order, note = ("int8", "fp32", "fp16"), f"CPU has {flags}: int8 preferred"
    else:
        order, note = ("fp32", "int8", "fp16"), "CPU without VNNI/AMX: fp32 preferred"
    kept = quality.keep(source, "vision_onnx", manifest.find_all("vision_onnx"))
    for wanted in order:
        artifact = next((a for a in kept if a.precision == wanted), None)
        if artifact is not None:
            return artifact, note if wanted == order[0] else (
                f"{note}, {order[0]} {'below the quality floor' if manifest.find('vision_onnx', order[0]) else 'not in the bundle'}")
    raise BundleError(f"{source.folder} has no vision ONNX; re-export the bundle: python -m export CHECKPOINT --out {source.folder}")


def _describe_key(key: dict) -> str:
    memory = key.get("total_memory")
    return (f"{key.get('gpu')} (sm {key.get('compute_capability')}, {key.get('multiprocessors')} multiprocessors, "
            f"{'?' if memory is None else f'{memory / 2**30:.1f} GiB'})")


def engine_mismatch(target: dict, device: DeviceInfo) -> str | None:
    """Why an engine recorded with `target` (export.trt) may not run on `device`; None when it matches.

    TensorRT engines are specific to the GPU: the engine's device_key (CUDA name, compute capability, multiprocessor
    count, total memory) must equal this GPU's. An AGX Orin and an Orin Nano are both "Orin", 8.7, and differ in the
    last two; the same board reads alike on the host and in a container. The Jetson board string is recorded for
    people to read, never compared: containers hide or rename it.
    """
    here = device.engine_key
    if here is None:
        return (f"this GPU's CUDA name, compute capability, multiprocessor count and memory are unknown ({device.name}; "
                "the CUDA driver libcuda did not answer)")
    built = target.get("device_key")
    if built is None:
        return (f"recorded without its device key (built for {target.get('gpu')} by an older sqllava-edge); rebuild it "
                "here: python -m export.trt BUNDLE")
    if built != here:
        return f"built for {_describe_key(built)}, this GPU is {_describe_key(here)}"
    return None


def _matching_engine(source: ModelSource, device: DeviceInfo):
    """(engine Artifact, "") for this GPU and TensorRT version, else (None, why none matched)."""
    try:
        import tensorrt
    except ImportError:
        return None, "the tensorrt package is not installed"
    problems = []
    for engine in source.manifest.find_all("tensorrt_engine"):
        target = engine.target or {}
        why = engine_mismatch(target, device)
        if why is None and str(target.get("tensorrt")) != tensorrt.__version__:
            why = f"built with TensorRT {target.get('tensorrt')}, this is {tensorrt.__version__}"
        if why is None:
            return engine, ""
        problems.append(f"{engine.path} {why}")
    return None, "; ".join(problems) or "no TensorRT engine in the bundle"


def _explain_no_tensorrt(source: ModelSource, device: DeviceInfo, note: str) -> None:
    from runtimes.vision import tensorrt_problem

    if not device.has_gpu:
        raise BackendUnavailableError(f"vision backend 'tensorrt' needs an NVIDIA GPU, but this machine is CPU-only "
                                      f"({device.name}); use vision_backend='onnxruntime' or leave it unset")
    problem = tensorrt_problem()  # names CUDA buffers, the tensorrt package or its version
    if problem is not None:
        raise BackendUnavailableError(problem)
    raise BackendUnavailableError(f"{source.folder} has no TensorRT engine for {device.name} ({note}); build one here: "
                                  f"python -m export.trt {source.folder}")


def choose_llm(source: ModelSource, device: DeviceInfo, requested: str | None = None, precision: str | None = None,
               gpu_layers: int | None = None, fits=None) -> LLMChoice:
    """fits(artifact, gpu_layers) -> bool lets the memory plan skip GGUF precisions that would not fit (auto choice).

    GPU offload support (`llama_supports_gpu_offload`; PyPI's llama-cpp-python wheel is CPU-only) is checked before
    anything is planned: without it the GGUF is ordered and sized for the CPU, and the reason says so.
    """
    kind, why = requested_kind(LLMKind, requested, LLM_ENV)
    if not source.is_bundle:
        if kind not in (None, LLMKind.TORCH):
            raise BackendUnavailableError(f"LLM backend {kind.value!r} needs an exported bundle with a GGUF, but "
                                          f"{source.folder} is a training checkpoint; export it: python -m export CHECKPOINT --out BUNDLE")
        return LLMChoice(LLMKind.TORCH, why or "training checkpoint folder: PyTorch LlamaForCausalLM with a KV cache")
    if kind is LLMKind.TORCH:
        source.torch_model(device)  # raises: a bundle has no PyTorch weights
    from runtimes.llamacpp import import_llama_cpp

    import_llama_cpp()  # raises BackendUnavailableError naming the package
    offload = _gpu_offload_supported()
    layers = gpu_layers if gpu_layers is not None else (-1 if device.has_gpu and offload else 0)
    if layers != 0 and not offload:
        raise BackendUnavailableError("gpu_layers was set but this llama-cpp-python build has no GPU offload; reinstall it "
                                      "with CUDA: CMAKE_ARGS='-DGGML_CUDA=on' pip install --force-reinstall llama-cpp-python")
    order = device.kind if layers != 0 else "cpu"  # the LLM runs where its layers are: precisions ordered for that
    artifact, note = _pick_gguf(source, order, precision, None if fits is None else lambda a: fits(a, layers))
    where = "CPU" if layers == 0 else ("all layers on the GPU" if layers < 0 else f"{layers} layers on the GPU")
    if not why:
        why = f"{device.kind} ({device.name})"
        if device.has_gpu and not offload:
            why += ("; this llama-cpp-python build has no GPU offload (llama_supports_gpu_offload() is False), so the "
                    "LLM is planned and run on the CPU: for the GPU reinstall it with CMAKE_ARGS='-DGGML_CUDA=on'")
    exact = artifact.precision == "f32"
    if exact:
        note += "; f32 KV cache and flash attention off, so logits match PyTorch"
    return LLMChoice(LLMKind.LLAMA_CPP, f"{why}; llama.cpp {where}, {artifact.path} ({note})", artifact, layers, exact)


def _pick_gguf(source: ModelSource, order_kind: str, precision: str | None, fits):
    manifest = source.manifest
    if precision is not None:
        artifact = manifest.find("llm_gguf", precision)
        if artifact is None:
            have = [a.precision for a in manifest.find_all("llm_gguf")]
            raise BundleError(f"{source.folder} has no {precision} GGUF (it has {have or 'none'}); export it with "
                              f"python -m export CHECKPOINT --out {source.folder} --quant {precision}")
        return artifact, f"{precision} as requested"
    order = GGUF_PREFERENCE[order_kind]
    available = quality.keep(source, "llm_gguf", [a for p in order if (a := manifest.find("llm_gguf", p)) is not None])
    if not available:
        raise BundleError(f"{source.folder} has no GGUF LLM; re-export the bundle: python -m export CHECKPOINT --out {source.folder}")
    for i, artifact in enumerate(available):
        if fits is None or fits(artifact):
            skipped = [a.precision for a in available[:i]]
            if skipped:
                note = f"{', '.join(skipped)} would not fit in memory"
            elif artifact.precision == order[0]:
                note = f"preferred on {order_kind}"
            else:
                note = f"the bundle's first in the {order_kind} order {', '.join(order)}"
            return artifact, f"{artifact.precision}: {note}"
    return available[-1], f"{available[-1].precision}, the smallest in the bundle"  # the memory plan will refuse it


def _gpu_offload_supported() -> bool:
    try:
        import llama_cpp
    except ImportError:
        return False
    return bool(llama_cpp.llama_supports_gpu_offload())


# --------------------------------------------------------------------------------------------------------------------
# Loading


def load_vision(choice: VisionChoice, source: ModelSource, device: DeviceInfo, n_threads: int | None = None,
                gpu_mem_limit: int | None = None):
    """The backend for `choice`, exactly (see load_vision_checked for the auto-mode fallbacks).

    gpu_mem_limit: bytes onnxruntime's CUDA arena may grow to (from the memory plan); None = unlimited.
    """
    from runtimes import vision

    if choice.kind is VisionKind.TORCH:
        model, _ = source.torch_model(device)
        return vision.TorchVision(model)
    path = source.artifact_path(choice.artifact)
    if choice.kind is VisionKind.TENSORRT:
        return vision.TensorRTVision(path, device_index=device.gpu_index)
    return vision.OnnxVision(path, providers=choice.providers, n_threads=choice.n_threads or n_threads,
                             gpu_mem_limit=gpu_mem_limit,
                             allow_cpu_fallback=not choice.requested)


def load_vision_checked(choice: VisionChoice, source: ModelSource, device: DeviceInfo, n_threads: int | None = None,
                        gpu_mem_limit: int | None = None):
    """-> (backend, the choice that really runs). In auto mode a TensorRT engine that does not load, whatever the
    failure (BackendUnavailableError, a RuntimeError from the CUDA buffers, a ValueError for an engine dtype the
    backend does not map, ...), falls back to onnxruntime with the failure in the reason, and onnxruntime silently
    dropping its CUDA provider is said too; an explicitly requested backend raises instead."""
    try:
        backend = load_vision(choice, source, device, n_threads, gpu_mem_limit)
    except Exception as exc:  # only the optional TensorRT attempt of automatic mode has a fallback
        if choice.fallback is None:
            raise
        said = str(exc) if isinstance(exc, BackendUnavailableError) else f"{type(exc).__name__}: {exc}"
        choice = replace(choice.fallback, reason=f"{choice.fallback.reason} (TensorRT said: {said})")
        backend = load_vision(choice, source, device, n_threads, gpu_mem_limit)
    dropped = getattr(backend, "dropped_providers", ())
    if dropped:
        choice = replace(choice, providers=tuple(p for p in choice.providers if p not in dropped),
                         reason=f"{choice.reason}; but onnxruntime could not start its {', '.join(dropped)} provider "
                                "(CUDA / cuDNN libraries missing or mismatched?), so vision runs on the CPU")
    return backend, choice


def load_llm(choice: LLMChoice, source: ModelSource, device: DeviceInfo, n_ctx: int, n_threads: int | None = None,
             n_seq_max: int = 4):
    if choice.kind is LLMKind.TORCH:
        from runtimes.torch_llm import TorchLLM

        model, _ = source.torch_model(device)
        return TorchLLM(model.llm, n_ctx, n_threads)
    from runtimes.llamacpp import LlamaCppLLM

    return LlamaCppLLM(str(source.artifact_path(choice.artifact)), n_ctx, n_threads=choice.n_threads or n_threads,
                       n_gpu_layers=choice.gpu_layers, n_seq_max=n_seq_max,
                       kv_type="f32" if choice.exact else "f16", flash_attn=False if choice.exact else None,
                       extra_buffers=choice.extra_buffers, n_threads_batch=choice.n_threads_batch,
                       n_ubatch=choice.n_ubatch, main_gpu=device.gpu_index)


def select_vision(source: ModelSource, device: DeviceInfo, requested: str | None = None, precision: str | None = None,
                  n_threads: int | None = None):
    """-> (VisionBackend, reason)."""
    backend, choice = load_vision_checked(choose_vision(source, device, requested, precision), source, device, n_threads)
    return backend, choice.reason


def select_llm(source: ModelSource, device: DeviceInfo, n_ctx: int, requested: str | None = None,
               precision: str | None = None, n_threads: int | None = None, gpu_layers: int | None = None):
    """-> (LLMBackend, reason)."""
    choice = choose_llm(source, device, requested, precision, gpu_layers)
    return load_llm(choice, source, device, n_ctx, n_threads), choice.reason
