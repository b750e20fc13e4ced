"""Which backends to run here, and why: device detection, then a choice with a reason string, then loading.

    device = detect_device()                                  # NVIDIA desktop GPU / Jetson / CPU (+ VNNI, AMX)
    vision, reason = select_vision(source, device)            # auto, an argument, or SQLLAVA_EDGE_VISION_BACKEND
    llm, reason = select_llm(source, device, n_ctx=2048)      # auto, an argument, or SQLLAVA_EDGE_LLM_BACKEND

Auto choice (issue "Runtime"): desktop GPU -> TensorRT engine built for this GPU, else onnxruntime CUDA, and llama.cpp
with every layer offloaded; Jetson -> TensorRT + llama.cpp CUDA; CPU -> onnxruntime (int8 vision where the CPU has
VNNI/AMX and the bundle has it) + llama.cpp. A training checkpoint runs on the torch backends. An explicitly
requested backend that cannot run raises BackendUnavailableError naming what is missing; it is never swapped.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from runtimes.base import LLMKind, VisionKind
from sqllava_edge.config import ModelConfig
from sqllava_edge.errors import BackendUnavailableError, BundleError

VISION_ENV = "SQLLAVA_EDGE_VISION_BACKEND"
LLM_ENV = "SQLLAVA_EDGE_LLM_BACKEND"
INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # CPU features that make int8 matmuls fast
# GGUF precision preference per device kind, best quality that usually fits first (memory.py may skip to smaller).
GGUF_PREFERENCE = {
    "cuda": ("f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q4_0", "f32"),
    "jetson": ("q4_k_m", "q5_k_m", "q4_k_s", "q4_0", "q6_k", "q8_0", "f16", "bf16", "f32"),
    "cpu": ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q4_0", "f16", "bf16", "f32"),
}


# --------------------------------------------------------------------------------------------------------------------
# Device detection


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cuda" (NVIDIA desktop/server GPU), "jetson" (integrated GPU, shared RAM) or "cpu"
    name: str  # GPU or board name, or the CPU model
    ram_available: int  # bytes of RAM available now (MemAvailable); on Jetson the GPU shares it
    gpu_memory_free: int | None = None  # bytes free on a discrete GPU
    compute_capability: str | None = None  # e.g. "8.9"
    cpu_flags: frozenset[str] = field(default_factory=frozenset)  # the INT8_CPU_FLAGS and avx2/avx512f this CPU has

    @property
    def fast_int8(self) -> bool:
        return any(flag in self.cpu_flags for flag in INT8_CPU_FLAGS)

    @property
    def has_gpu(self) -> bool:
        return self.kind in ("cuda", "jetson")


def read_cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str]:
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86 "flags", ARM "Features"
            present = set(line.split(":", 1)[1].split())
            return frozenset(present & {*INT8_CPU_FLAGS, "avx2", "avx512f", "asimddp", "i8mm"})
    return frozenset()


def _cpu_name(root: Path) -> str:
    try:
        for line in (root / "proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def read_mem_available(meminfo: str | os.PathLike = "/proc/meminfo") -> int:
    """MemAvailable in bytes (0 if unknown)."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return 0


def detect_jetson(root: str | os.PathLike = "/") -> str | None:
    """The Jetson board name, from /proc/device-tree/model or /etc/nv_tegra_release; None elsewhere."""
    root = Path(root)
    model = root / "proc/device-tree/model"
    if model.is_file():
        name = model.read_bytes().rstrip(b"\x00").decode(errors="replace").strip()
        if "jetson" in name.lower() or (root / "etc/nv_tegra_release").is_file():
            return name or "NVIDIA Jetson"
    if (root / "etc/nv_tegra_release").is_file():
        release = (root / "etc/nv_tegra_release").read_text(errors="replace").splitlines()
        return f"NVIDIA Jetson ({release[0].lstrip('# ').strip()})" if release else "NVIDIA Jetson"
    return None


def _query_nvidia_gpu() -> tuple[str, int, str] | None:
    """(name, free bytes, compute capability) of GPU 0 from nvidia-smi, else from torch.cuda; None if there is none."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.free,compute_cap", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip().splitlines()
            name, free_mib, cap = (part.strip() for part in out[0].split(","))
            return name, int(float(free_mib)) * 2**20, cap
        except (subprocess.SubprocessError, OSError, ValueError, IndexError):
            pass
    if not Path("/proc/driver/nvidia").exists() and not Path("/dev/nvidia0").exists():
        return None  # no NVIDIA driver: do not import torch just to learn that
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(0)
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), int(free), f"{major}.{minor}"


def detect_device(root: str | os.PathLike = "/") -> DeviceInfo:
    """What this machine offers. `root` lets tests point /proc and /etc at a fake tree."""
    root = Path(root)
    flags = read_cpu_flags(root / "proc/cpuinfo")
    ram = read_mem_available(root / "proc/meminfo")
    jetson = detect_jetson(root)
    if jetson is not None:
        return DeviceInfo("jetson", jetson, ram, cpu_flags=flags)
    gpu = _query_nvidia_gpu() if root == Path("/") else None
    if gpu is not None:
        name, free, cap = gpu
        return DeviceInfo("cuda", name, ram, gpu_memory_free=free, compute_capability=cap, cpu_flags=flags)
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
                f"{'Jetson' if device == 'jetson' else 'GPU'} was found (nvidia-smi, /proc/driver/nvidia, "
                "/etc/nv_tegra_release, /proc/device-tree/model); use device='cpu' or leave device unset"
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
        from sqllava_edge.checkpoint import is_checkpoint, read_meta  # imports torch: only for checkpoints

        if is_checkpoint(folder):
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


@dataclass(frozen=True)
class LLMChoice:
    kind: LLMKind
    reason: str
    artifact: object | None = None  # bundle Artifact (llm_gguf); None for torch
    gpu_layers: int = 0  # llama.cpp layers offloaded to the GPU (-1 = all)
    exact: bool = False  # llama.cpp: f32 KV cache and no flash attention (f16 math), for an f32 GGUF


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
    from runtimes.vision import ort_available_providers

    kind, why = requested_kind(VisionKind, requested, VISION_ENV)
    if not source.is_bundle:
        if kind not in (None, VisionKind.TORCH):
            raise BackendUnavailableError(f"vision backend {kind.value!r} needs an exported bundle, but {source.folder} "
                                          "is a training checkpoint; export it: python -m export CHECKPOINT --out BUNDLE")
        return VisionChoice(VisionKind.TORCH, why or "training checkpoint folder: PyTorch vision tower + projector")
    if kind is VisionKind.TORCH:
        source.torch_model(device)  # raises: a bundle has no PyTorch weights
    if kind in (None, VisionKind.TENSORRT) and device.has_gpu:
        engine = _matching_engine(source, device)
        if engine is not None:
            return VisionChoice(VisionKind.TENSORRT, why or f"{device.kind} GPU {device.name}: TensorRT engine "
                                f"{engine.path} was built for it", engine)
    if kind is VisionKind.TENSORRT:
        _explain_no_tensorrt(source, device)
    providers = ort_available_providers()
    if not providers:
        from runtimes.vision import _import_onnxruntime

        _import_onnxruntime()  # raises BackendUnavailableError naming the package
    use_cuda = device.has_gpu and "cuda" in providers
    artifact, note = _pick_onnx(source, device, precision, use_cuda)
    chosen = ("cuda", "cpu") if use_cuda else ("cpu",)
    where = "CUDA" if use_cuda else "CPU"
    if not why:
        if device.has_gpu and not use_cuda:
            why = f"{device.kind} GPU found but this onnxruntime has no CUDA provider (install onnxruntime-gpu)"
        elif device.has_gpu:
            why = f"{device.kind} GPU {device.name} with no TensorRT engine for it in the bundle"
        else:
            why = f"no NVIDIA GPU ({device.name})"
    return VisionChoice(VisionKind.ONNXRUNTIME, f"{why}; onnxruntime {where}, {artifact.path} ({note})", artifact, chosen)


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
    for wanted in order:
        artifact = manifest.find("vision_onnx", wanted)
        if artifact is not None:
            return artifact, note if wanted == order[0] else f"{note}, bundle has no {order[0]}"
    raise BundleError(f"{source.folder} has no vision ONNX; re-export the bundle: python -m export CHECKPOINT --out {source.folder}")


def _matching_engine(source: ModelSource, device: DeviceInfo):
    try:
        import tensorrt
    except ImportError:
        return None
    for engine in source.manifest.find_all("tensorrt_engine"):
        target = engine.target or {}
        same_gpu = target.get("gpu") == device.name or (
            device.compute_capability is not None and target.get("compute_capability") == device.compute_capability)
        if same_gpu and str(target.get("tensorrt")) == tensorrt.__version__:
            return engine
    return None


def _explain_no_tensorrt(source: ModelSource, device: DeviceInfo) -> None:
    from runtimes.vision import _import_tensorrt

    if not device.has_gpu:
        raise BackendUnavailableError(f"vision backend 'tensorrt' needs an NVIDIA GPU, but this machine is CPU-only "
                                      f"({device.name}); use vision_backend='onnxruntime' or leave it unset")
    trt = _import_tensorrt()  # raises naming CUDA or the tensorrt package
    targets = [(e.target or {}) for e in source.manifest.find_all("tensorrt_engine")]
    have = ", ".join(f"{t.get('gpu')} / TensorRT {t.get('tensorrt')}" for t in targets) or "none"
    raise BackendUnavailableError(f"{source.folder} has no TensorRT engine for {device.name} with TensorRT "
                                  f"{trt.__version__} (engines: {have}); build one here: python -m export.trt {source.folder}")


def choose_llm(source: ModelSource, device: DeviceInfo, requested: str | None = None, precision: str | None = None,
               gpu_layers: int | None = None, fits=None) -> LLMChoice:
    """fits(artifact) -> bool lets the memory plan skip GGUF precisions that would not fit (auto choice only)."""
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
    artifact, note = _pick_gguf(source, device, precision, fits)
    where = "CPU" if layers == 0 else ("all layers on the GPU" if layers < 0 else f"{layers} layers on the GPU")
    if not why:
        why = f"{device.kind} ({device.name})"
        if device.has_gpu and not offload:
            why += "; this llama-cpp-python build has no GPU offload, so the LLM runs on the CPU"
    exact = artifact.precision == "f32"
    if exact:
        note += "; f32 KV cache and flash attention off, so logits match PyTorch"
    return LLMChoice(LLMKind.LLAMA_CPP, f"{why}; llama.cpp {where}, {artifact.path} ({note})", artifact, layers, exact)


def _pick_gguf(source: ModelSource, device: DeviceInfo, precision: str | None, fits):
    manifest = source.manifest
    if precision is not None:
        artifact = manifest.find("llm_gguf", precision)
        if artifact is None:
            have = [a.precision for a in manifest.find_all("llm_gguf")]
            raise BundleError(f"{source.folder} has no {precision} GGUF (it has {have or 'none'}); export it with "
                              f"python -m export CHECKPOINT --out {source.folder} --quant {precision}")
        return artifact, f"{precision} as requested"
    available = [a for p in GGUF_PREFERENCE[device.kind] if (a := manifest.find("llm_gguf", p)) is not None]
    if not available:
        raise BundleError(f"{source.folder} has no GGUF LLM; re-export the bundle: python -m export CHECKPOINT --out {source.folder}")
    order = GGUF_PREFERENCE[device.kind]
    for i, artifact in enumerate(available):
        if fits is None or fits(artifact):
            skipped = [a.precision for a in available[:i]]
            if skipped:
                note = f"{', '.join(skipped)} would not fit in memory"
            elif artifact.precision == order[0]:
                note = f"preferred on {device.kind}"
            else:
                note = f"the bundle's first in the {device.kind} order {', '.join(order)}"
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


def load_vision(choice: VisionChoice, source: ModelSource, device: DeviceInfo, n_threads: int | None = None):
    from runtimes import vision

    if choice.kind is VisionKind.TORCH:
        model, _ = source.torch_model(device)
        return vision.TorchVision(model)
    path = source.artifact_path(choice.artifact)
    if choice.kind is VisionKind.TENSORRT:
        return vision.TensorRTVision(path)
    return vision.OnnxVision(path, providers=choice.providers, n_threads=n_threads)


def load_llm(choice: LLMChoice, source: ModelSource, device: DeviceInfo, n_ctx: int, n_threads: int | None = None,
             n_seq_max: int = 4):
    if choice.kind is LLMKind.TORCH:
        from runtimes.torch_llm import TorchLLM

        model, _ = source.torch_model(device)
        return TorchLLM(model.llm, n_ctx, n_threads)
    from runtimes.llamacpp import LlamaCppLLM

    return LlamaCppLLM(str(source.artifact_path(choice.artifact)), n_ctx, n_threads=n_threads,
                       n_gpu_layers=choice.gpu_layers, n_seq_max=n_seq_max,
                       kv_type="f32" if choice.exact else "f16", flash_attn=False if choice.exact else None)


def select_vision(source: ModelSource, device: DeviceInfo, requested: str | None = None, precision: str | None = None,
                  n_threads: int | None = None):
    """-> (VisionBackend, reason)."""
    choice = choose_vision(source, device, requested, precision)
    return load_vision(choice, source, device, n_threads), choice.reason


def select_llm(source: ModelSource, device: DeviceInfo, n_ctx: int, requested: str | None = None,
               precision: str | None = None, n_threads: int | None = None, gpu_layers: int | None = None):
    """-> (LLMBackend, reason)."""
    choice = choose_llm(source, device, requested, precision, gpu_layers)
    return load_llm(choice, source, device, n_ctx, n_threads), choice.reason
