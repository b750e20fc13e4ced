"""Everything `Assistant.load` does before it has an Assistant: open the folder, choose backends, plan memory, load.

    vision, choice = load_vision_checked(choose_vision(source, device), source, device)   # one part, as chosen
    llm = load_llm(choose_llm(source, device), source, device, n_ctx=2048)

Order matters: the memory plan runs before any weight is loaded, and every consistency check (manifest vs config,
tokenizer vs vocabulary, vision output vs LLM width) runs before the first question, so a broken or mixed bundle
fails at load with a BundleError instead of producing garbage later.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from runtimes import quality
from runtimes.base import LLMKind, VisionKind
from runtimes.memory import MemoryPlan, check_plan, plan_memory, torch_weight_bytes
from runtimes.devices import DeviceInfo, resolve_device
from runtimes.model_source import ModelSource
from runtimes.select import LLM_ENV, VISION_ENV, LLMChoice, VisionChoice, choose_llm, choose_vision, requested_kind
from sqllava_edge.config import ModelConfig
from sqllava_edge.errors import BackendUnavailableError, BundleError

DEFAULT_N_CTX = 2048  # image tokens + prompt + a 512-token answer + some chat history, for the 7B models
LLAMA_CPP_KV_BYTES = 2  # LlamaCppLLM's default f16 KV cache (f32, 4 bytes, for an f32 GGUF)


@dataclass(frozen=True)
class Backends:
    """What `Assistant.load` chose, and why (`assistant.backends`; printed by `sqllava-edge inspect` and the demo)."""

    device: str
    vision: str  # VisionKind value
    vision_detail: str
    vision_reason: str
    llm: str  # LLMKind value
    llm_detail: str
    llm_reason: str
    memory: str  # the memory plan
    quality: str = ""  # bundles: every candidate artifact's speed and fidelity, kept or dropped and why (runtimes.quality)
    vision_precision: str = ""  # the artifacts that run ("" on the torch backends)
    llm_precision: str = ""

    def __str__(self) -> str:
        text = (f"device: {self.device}\nvision: {self.vision} ({self.vision_detail})\n  why: {self.vision_reason}\n"
                f"llm: {self.llm} ({self.llm_detail})\n  why: {self.llm_reason}\nmemory plan:\n  "
                + self.memory.replace("\n", "\n  "))
        if self.quality:
            text += "\ncandidates (speed, quality vs fp32 PyTorch):\n  " + self.quality.replace("\n", "\n  ")
        return text


@dataclass
class LoadedParts:
    vision: Any  # VisionBackend
    llm: Any  # LLMBackend
    tokenizer: Any
    config: ModelConfig
    template: str
    image_mode: str
    backends: "Backends"


def load_parts(path: str | os.PathLike, device, vision_backend: str | None, llm_backend: str | None,
               n_ctx: int | None, n_threads: int | None, gpu_layers: int | None, vision_precision: str | None,
               llm_precision: str | None, verify: bool, sequences: int, tune: bool | None = None,
               prefer: str = "latency", max_quality_loss=None) -> LoadedParts:
    from runtimes.quality import resolve_floor
    from runtimes.tune import check_prefer

    check_prefer(prefer)
    floor = resolve_floor(max_quality_loss)
    dev = resolve_device(device)
    source = ModelSource.open(path, verify=verify)
    source.quality_floor = floor
    config = source.config
    if source.is_bundle:
        _check_manifest(source)
    n_ctx = _n_ctx(n_ctx, config, sequences)
    if n_threads is not None and (not isinstance(n_threads, int) or n_threads < 1):
        raise ValueError(f"n_threads must be a positive int, got {n_threads!r}")
    explicit = {"vision_backend": requested_kind(VisionKind, vision_backend, VISION_ENV)[0],
                "llm_backend": requested_kind(LLMKind, llm_backend, LLM_ENV)[0], "vision_precision": vision_precision,
                "llm_precision": llm_precision, "n_threads": n_threads, "gpu_layers": gpu_layers}
    measured = _measured(source, dev, tune, prefer, [name for name, value in explicit.items() if value is not None])
    vision_choice = choose_vision(source, dev, vision_backend, vision_precision)
    vision_choice = _apply_vision(source, dev, vision_choice, *measured)

    def plan_for(llm_choice: LLMChoice) -> MemoryPlan:
        return _plan(config, dev, source, vision_choice, llm_choice, n_ctx)

    def fits(artifact, layers: int) -> bool:  # layers: what choose_llm will offload (0 without GPU offload support)
        return plan_for(LLMChoice(LLMKind.LLAMA_CPP, "", artifact, layers, artifact.precision == "f32")).fits

    llm_choice = choose_llm(source, dev, llm_backend, llm_precision, gpu_layers, fits)
    llm_choice = _apply_llm(source, dev, llm_choice, fits, *measured)
    plan = plan_for(llm_choice)
    check_plan(plan, _smaller_ggufs(source, llm_choice))
    arena = plan.vision_bytes if dev.has_gpu else None  # caps onnxruntime's CUDA arena (also for a TensorRT fallback)
    vision, vision_choice = load_vision_checked(vision_choice, source, dev, n_threads, gpu_mem_limit=arena)
    try:
        llm = load_llm(llm_choice, source, dev, n_ctx, n_threads, n_seq_max=sequences)
    except BaseException:
        vision.close()
        raise
    try:
        tokenizer = _tokenizer(source, dev)
        _check_parts(config, vision, llm)
    except BaseException:
        vision.close()
        llm.close()
        raise
    precisions = {"vision_onnx": getattr(vision_choice.artifact, "precision", ""),
                  "llm_gguf": getattr(llm_choice.artifact, "precision", "")}
    quality = _quality(source, floor, measured[0], precisions) if source.is_bundle else ""
    backends = Backends(_describe_device(dev), vision.name, vision.description, vision_choice.reason, llm.name,
                        llm.description, llm_choice.reason, plan.describe(), quality=quality,
                        vision_precision=precisions["vision_onnx"], llm_precision=precisions["llm_gguf"])
    template = source.manifest.template if source.is_bundle else config.template
    mode = source.manifest.preprocessing["mode"] if source.is_bundle else config.image_aspect_ratio
    return LoadedParts(vision, llm, tokenizer, config, template, mode, backends)


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


def _measured(source: ModelSource, dev: DeviceInfo, tune: bool | None, prefer: str, explicit: list[str]):
    """-> (tuning table or None, how it was obtained / why there is none, prefer). runtimes.tune measures on demand."""
    from runtimes.tune import tuned_table, tuning_enabled

    if not source.is_bundle:
        return None, "", prefer  # a training checkpoint runs on torch: nothing to measure
    if not tuning_enabled(tune):
        return None, "measured selection off (tune=False or $SQLLAVA_EDGE_TUNE=0): rule-based order", prefer
    if explicit:
        return None, f"measured selection skipped: {', '.join(explicit)} given explicitly", prefer
    if dev.kind != "cpu":
        return None, f"measured selection covers CPU runs only; {dev.kind}: rule-based order", prefer
    table, how = tuned_table(source)
    return table, how, prefer


def _apply_vision(source: ModelSource, dev: DeviceInfo, rule: VisionChoice, table, how: str, prefer: str) -> VisionChoice:
    from runtimes.tune import choose

    if table is None:
        return replace(rule, reason=f"{rule.reason} ({how})") if how else rule
    pick = choose(table, prefer, vision_allowed=quality.allowed(source.manifest, "vision_onnx", source.quality_floor))
    if pick.vision is None:
        return replace(rule, reason=f"{rule.reason} ({pick.vision_reason}; rule-based order; {how})")
    chosen = choose_vision(source, dev, None, pick.vision.precision)
    return replace(chosen, n_threads=pick.vision.n_threads,
                   reason=f"{pick.vision_reason}; onnxruntime CPU, {chosen.artifact.path} ({how})")


def _apply_llm(source: ModelSource, dev: DeviceInfo, rule: LLMChoice, fits, table, how: str, prefer: str) -> LLMChoice:
    from runtimes.tune import choose

    if table is None:
        return replace(rule, reason=f"{rule.reason} ({how})") if how else rule
    manifest = source.manifest
    good = quality.allowed(manifest, "llm_gguf", source.quality_floor)
    pick = choose(table, prefer, allowed=lambda precision: good(precision) and fits(manifest.find("llm_gguf", precision), 0),
                  vision_allowed=quality.allowed(manifest, "vision_onnx", source.quality_floor))
    if pick.llm is None:
        return replace(rule, reason=f"{rule.reason} ({pick.llm_reason}; rule-based order; {how})")
    chosen = choose_llm(source, dev, None, pick.llm.precision, None, fits)
    return replace(chosen, extra_buffers=pick.llm.extra_buffers, n_threads=pick.llm.n_threads,
                   n_threads_batch=pick.llm.n_threads_batch, n_ubatch=pick.llm.n_ubatch,
                   reason=f"{pick.llm_reason}; llama.cpp CPU, {chosen.artifact.path} ({how})")


def _quality(source: ModelSource, floor, table, chosen: dict[str, str]) -> str:
    """Every candidate artifact: its measured speed (when tuning ran), its recorded fidelity, kept or dropped and why."""
    from runtimes.tune import first_answer_s, llm_options, vision_options

    speeds = {}
    if table is not None:
        visions = {v.precision: v for v in vision_options(table)}
        for v in visions.values():
            speeds["vision_onnx", v.precision] = f"encode {v.encode_s * 1e3:.1f} ms"
        vision = visions.get(chosen["vision_onnx"])
        for o in llm_options(table):
            seconds = first_answer_s(table, vision, o)
            best = speeds.get(("llm_gguf", o.precision))
            if best is None or seconds < best[0]:
                speeds["llm_gguf", o.precision] = (seconds, f"first answer ~{seconds:.2f} s, decode {o.decode_tok_s:.1f} tok/s")
        speeds = {key: value[1] if isinstance(value, tuple) else value for key, value in speeds.items()}
    return quality.describe(source.manifest, floor, speeds, chosen)


def _n_ctx(n_ctx: int | None, config: ModelConfig, sequences: int = 1) -> int:
    """KV cells shared by all sequences. One sequence never exceeds the model's trained context (the pool enforces
    it), but several can together: a server's slots share n_ctx, so it may reach trained context x sequences."""
    limit = config.llm.max_position_embeddings
    if n_ctx is None:
        return min(DEFAULT_N_CTX, limit)
    if not isinstance(n_ctx, int) or n_ctx < config.num_image_tokens + 32:
        raise ValueError(f"n_ctx must be an int >= {config.num_image_tokens + 32} (the {config.num_image_tokens} "
                         f"image tokens plus a prompt), got {n_ctx!r}")
    if n_ctx > limit * max(1, sequences):
        raise ValueError(f"n_ctx {n_ctx} exceeds the model's trained context of {limit} positions times the "
                         f"{sequences} sequences that share it; use n_ctx <= {limit * max(1, sequences)}")
    return n_ctx


def _check_manifest(source: ModelSource) -> None:
    """The manifest's own fields must agree with its model config (a hand-edited or mixed manifest fails here)."""
    manifest, config = source.manifest, source.config
    pre = manifest.preprocessing
    problems = []
    if manifest.num_image_tokens != config.num_image_tokens:
        problems.append(f"num_image_tokens {manifest.num_image_tokens} vs config {config.num_image_tokens}")
    if manifest.embed_dim != config.llm.hidden_size:
        problems.append(f"embed_dim {manifest.embed_dim} vs config hidden size {config.llm.hidden_size}")
    if pre.get("image_size") != config.vision.image_size:
        problems.append(f"preprocessing image_size {pre.get('image_size')} vs config {config.vision.image_size}")
    if pre.get("mode") not in ("pad", "crop", "resize"):
        problems.append(f"unknown preprocessing mode {pre.get('mode')!r}")
    if manifest.special_tokens.get("eos") != config.llm.eos_token_id:
        problems.append(f"eos id {manifest.special_tokens.get('eos')} vs config {config.llm.eos_token_id}")
    if problems:
        raise BundleError(f"{source.folder}: the manifest contradicts its model config ({'; '.join(problems)}); "
                          "the bundle was edited or mixed from different exports, re-export it")


def _plan(config: ModelConfig, dev: DeviceInfo, source: ModelSource, vision: VisionChoice, llm: LLMChoice,
          n_ctx: int) -> MemoryPlan:
    vision_bytes = vision.artifact.size if vision.artifact is not None else torch_weight_bytes(config, "vision")
    share = 1.0
    if llm.kind is LLMKind.TORCH:
        llm_bytes, kv_bytes, llm_on_gpu = torch_weight_bytes(config, "llm"), 4, dev.kind == "cuda"
    else:
        kv_bytes = 4 if llm.exact else LLAMA_CPP_KV_BYTES
        llm_bytes, llm_on_gpu = llm.artifact.size, llm.gpu_layers != 0
        if llm.gpu_layers > 0:  # llama.cpp offloads the last gpu_layers layers; -1 (or more than there are) = all
            share = min(llm.gpu_layers, config.llm.num_layers) / config.llm.num_layers
    vision_on_gpu = vision.kind is VisionKind.TENSORRT or "cuda" in vision.providers or (
        vision.kind is VisionKind.TORCH and dev.kind == "cuda")
    return plan_memory(config, dev, llm_bytes=llm_bytes, vision_bytes=vision_bytes, n_ctx=n_ctx,
                       kv_bytes_per_value=kv_bytes, llm_on_gpu=llm_on_gpu, vision_on_gpu=vision_on_gpu,
                       llm_gpu_share=share)


def _smaller_ggufs(source: ModelSource, choice: LLMChoice) -> list[tuple[str, int]]:
    if not source.is_bundle or choice.artifact is None:
        return []
    others = [a for a in source.manifest.find_all("llm_gguf") if a.size < choice.artifact.size]
    return [(a.precision, a.size) for a in sorted(others, key=lambda a: -a.size)]


def _tokenizer(source: ModelSource, dev: DeviceInfo):
    from sqllava_edge.tokenizer import load_tokenizer

    if not source.is_bundle:
        return source.torch_model(dev)[1]
    artifact = source.manifest.find("tokenizer")
    if artifact is None:
        raise BundleError(f"{source.folder} has no tokenizer artifact; re-export the bundle")
    tokenizer = load_tokenizer(source.artifact_path(artifact), runtime=True)  # no transformers on a device
    special = source.manifest.special_tokens
    if (tokenizer.bos_id, tokenizer.eos_id) != (special.get("bos"), special.get("eos")):
        raise BundleError(f"{source.folder}: tokenizer bos/eos ({tokenizer.bos_id}, {tokenizer.eos_id}) differ from the "
                          f"manifest's ({special.get('bos')}, {special.get('eos')}); re-export the bundle")
    return tokenizer


def _check_parts(config: ModelConfig, vision, llm) -> None:
    """Loaded artifacts must fit the config: vision output (T, H) and the LLM's width and vocabulary."""
    from runtimes.vision import OnnxVision

    want = (config.num_image_tokens, config.llm.hidden_size)
    if isinstance(vision, OnnxVision) and any(got not in (None, w) for got, w in zip(vision.output_shape, want)):
        raise BundleError(f"the vision ONNX outputs {vision.output_shape} rows per image but the model config needs "
                          f"{want}: it was exported from another model; re-export the bundle")
    if llm.name == LLMKind.LLAMA_CPP.value and llm.n_embd != config.llm.hidden_size:
        raise BundleError(f"the GGUF has hidden size {llm.n_embd} but the model config says {config.llm.hidden_size}: "
                          "it was exported from another model; re-export the bundle")
    if llm.vocab_size != config.llm.vocab_size:
        raise BundleError(f"the LLM has {llm.vocab_size} tokens but the model config says {config.llm.vocab_size}: "
                          "it was exported from another model; re-export the bundle")


def _describe_device(dev: DeviceInfo) -> str:
    text = f"{dev.kind} ({dev.name}), {dev.ram_available / 2**30:.1f} GiB RAM available"
    if dev.gpu_memory_free is not None:
        text += f", {dev.gpu_memory_free / 2**30:.1f} GiB GPU memory free (compute {dev.compute_capability})"
    if dev.cpu_flags:
        text += f", CPU flags {' '.join(sorted(dev.cpu_flags))}"
    return text
