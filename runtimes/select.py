"""Which backends and artifacts to run here, and why: the rule-based choice, each with its reason string.

    choice = choose_vision(source, device)            # auto, an argument, or SQLLAVA_EDGE_VISION_BACKEND
    choice = choose_llm(source, device, fits=...)     # auto, an argument, or SQLLAVA_EDGE_LLM_BACKEND

source: runtimes.model_source.ModelSource; device: runtimes.devices.DeviceInfo. Loading a choice is
runtimes.loader's (load_vision_checked, load_llm); measured selection (runtimes.tune) overrides the order on a CPU.

Auto choice: desktop GPU -> TensorRT engine built for this GPU, else onnxruntime CUDA, and llama.cpp
with every layer offloaded; Jetson -> TensorRT + llama.cpp CUDA; CPU -> onnxruntime (int8 vision where the CPU has
VNNI/AMX and the bundle has it) + llama.cpp. A training checkpoint runs on the torch backends. An explicitly
requested backend that cannot run raises BackendUnavailableError naming what is missing; it is never swapped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from runtimes import quality
from runtimes.base import LLMKind, VisionKind
from runtimes.devices import INT8_CPU_FLAGS, DeviceInfo
from runtimes.model_source import ModelSource
from sqllava_edge.errors import BackendUnavailableError, BundleError

VISION_ENV = "SQLLAVA_EDGE_VISION_BACKEND"
LLM_ENV = "SQLLAVA_EDGE_LLM_BACKEND"
# GGUF precision preference per device kind, best quality that usually fits first (memory.py may skip to smaller).
GGUF_PREFERENCE = {
    "cuda": ("f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q4_0", "iq4_nl", "f32"),
    "jetson": ("q4_k_m", "q5_k_m", "q4_k_s", "q4_0", "iq4_nl", "q6_k", "q8_0", "f16", "bf16", "f32"),
    "cpu": ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q4_0", "iq4_nl", "f16", "bf16", "f32"),
}


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


def _requested_artifact(source: ModelSource, kind: str, precision: str, what: str, flag: str):
    """-> (the bundle's `kind` artifact of an explicitly asked precision, note); BundleError naming the precisions the
    bundle has and the export flag that adds the missing one."""
    artifact = source.manifest.find(kind, precision)
    if artifact is None:
        have = [a.precision for a in source.manifest.find_all(kind)]
        raise BundleError(f"{source.folder} has no {precision} {what} (it has {have or 'none'}); export it: "
                          f"python -m export CHECKPOINT --out {source.folder} {flag} {precision}")
    return artifact, f"{precision} as requested"


def _pick_onnx(source: ModelSource, device: DeviceInfo, precision: str | None, use_cuda: bool):
    manifest = source.manifest
    if precision is not None:
        return _requested_artifact(source, "vision_onnx", precision, "vision ONNX", "--vision-precision")
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
        return _requested_artifact(source, "llm_gguf", precision, "GGUF", "--quant")
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
