"""export: checkpoint -> deployment bundle (docs/DESIGN.md "Deployment bundle").

Steps, each a function from artifacts to artifacts, each also runnable alone:
  export.merge     LoRA adapters merged into the base weights (docs/spec.md 6.2)    python -m export.merge
  export.onnx      vision tower + projector -> ONNX fp32 / fp16 / int8               python -m export.onnx
  export.gguf      merged LLM -> GGUF, quantized by llama.cpp                        python -m export.gguf
  export.trt       fp16 ONNX -> TensorRT engine, on the target device                python -m export.trt
  export.pipeline  merge, onnx, gguf, tokenizer and the manifest in one go           python -m export
A command line (a `__main__`) only parses arguments and calls its step or the pipeline; nothing imports one.

This package file holds the small helpers every step shares (content hashes, tool versions, progress/time/memory
reporting). It imports nothing heavy, so `python -m export.trt --help` works without torch.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from sqllava_edge.deps import explain_when_run_as_main

# Bump when a step's output for the same inputs changes, so re-exports do not reuse stale artifacts.
EXPORT_CODE_VERSION = 3  # 2: every artifact's fidelity vs fp32 recorded (export/fidelity.py); 3: int8 attention fused
SKIP_IN_CHECKPOINT = ("training_state",)  # optimizer state does not change what is exported
# Checkpoint provenance a bundle manifest (and a merged checkpoint) repeats: facts about what the weights compute.
# sim_beta: which value a converted merged SQ-LLaVA folder's projector uses (sqllava_edge.convert, --sim-beta).
CARRIED_PROVENANCE = ("sim_beta",)

explain_when_run_as_main("export", __name__)  # `python -m export ...` without torch: one line naming the extra


def checkpoint_digest(folder: str | os.PathLike) -> str:
    """sha256 over every weight/config file a checkpoint exports from (base folders it references included)."""
    from sqllava_edge.checkpoint import read_meta
    from sqllava_edge.fileutil import sha256_file

    folder = Path(folder)
    meta = read_meta(folder)
    roots = {".": folder}
    for part, ref in meta.get("base", {}).items():
        if Path(ref).is_absolute():
            roots[f"base:{part}"] = Path(ref)
    digest = hashlib.sha256()
    for label, root in sorted(roots.items()):
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            if rel.split("/")[0] in SKIP_IN_CHECKPOINT or path.name.startswith("."):
                continue
            digest.update(f"{label}/{rel}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def carried_provenance(folder: str | os.PathLike) -> dict[str, Any]:
    """The CARRIED_PROVENANCE entries of a checkpoint's sqllava_edge.json (absent keys are left out)."""
    from sqllava_edge.checkpoint import read_meta

    provenance = read_meta(folder).get("provenance") or {}
    return {key: provenance[key] for key in CARRIED_PROVENANCE if key in provenance}


def inputs_key(**parts: Any) -> str:
    """A stable sha256 of what produces an artifact (source digest, step, options, tool versions)."""
    blob = json.dumps({"export_code_version": EXPORT_CODE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def tool_versions(*names: str) -> dict[str, str]:
    """Installed versions of the named distributions ("-" for missing ones), plus Python."""
    versions = {"python": sys.version.split()[0]}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "-"
    return versions


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB). Linux reports ru_maxrss in KiB, macOS in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@contextlib.contextmanager
def step(name: str, log=print) -> Iterator[dict[str, float]]:
    """Time a step and report it with the process's peak memory: `with step("onnx fp32") as stats: ...`."""
    stats: dict[str, float] = {}
    log(f"[export] {name} ...")
    start = time.perf_counter()
    yield stats
    stats["seconds"] = round(time.perf_counter() - start, 2)
    stats["peak_rss_mib"] = round(peak_rss_mib(), 1)
    log(f"[export] {name} done in {stats['seconds']:.1f} s (peak RSS {stats['peak_rss_mib']:.0f} MiB)")


def base_manifest(config, special_tokens: dict[str, int], provenance: dict[str, Any]):
    """A Manifest with the model-level fields filled in from a ModelConfig and the tokenizer's special ids."""
    from sqllava_edge.bundle import Manifest, preprocessing_for

    return Manifest(model=config.to_dict(), template=config.template, preprocessing=preprocessing_for(config),
                    special_tokens=dict(special_tokens), num_image_tokens=config.num_image_tokens,
                    embed_dim=config.llm.hidden_size, artifacts=[], provenance=provenance)


def special_tokens_of(tokenizer) -> dict[str, int]:
    return {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id, "unk": tokenizer.unk_id}
