"""The export driver: checkpoint -> deployment bundle (merge, vision ONNX, GGUF, tokenizer, manifest) in one call.

`run_export` is what `python -m export` runs, and what `python -m export.onnx` / `export.gguf` run with the other
steps switched off; `run_cli` turns a driver's user-facing failures into one line and an exit code for every
export command line.

The bundle is built in a temporary folder beside the output and renamed into place only when every artifact has been
written and validated: a failure (bad input, validation, full disk, Ctrl-C) leaves no half-written bundle and an
existing bundle unchanged. Re-exporting reuses the previous bundle's artifacts whose inputs key (source checkpoint
content hash + step + options + tool versions) is unchanged and whose files still match their sha256.
"""
from __future__ import annotations

import errno
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from export import (base_manifest, carried_provenance, checkpoint_digest, inputs_key, peak_rss_mib, special_tokens_of,
                    step, tool_versions)
from export.fidelity import DEFAULT_PAIRS
from sqllava_edge.bundle import KINDS, MANIFEST_FILE, Artifact, Manifest, read_manifest, shareable_mode, write_manifest
from sqllava_edge.errors import BundleError, SQLLaVAError

VISION_PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_QUANTS = ("q4_k_m",)
DTYPES = ("float32", "float16", "bfloat16")
_VISION_TOOLS = ("torch", "transformers", "peft", "onnx", "onnxscript", "onnxruntime")
_GGUF_TOOLS = ("torch", "transformers", "peft", "gguf", "llama_cpp_python")


def supported_quants() -> tuple[str, ...]:
    """GGUF types export.gguf can write."""
    from export.gguf import QUANTS

    return QUANTS


def run_export(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    quants: Sequence[str] = DEFAULT_QUANTS,
    vision_precisions: Sequence[str] = VISION_PRECISIONS,
    include_tokenizer: bool = True,
    reuse: bool = True,
    dtype: str = "float32",
    calibration: str | os.PathLike | None = None,
    calibration_pairs: int = DEFAULT_PAIRS,
    fidelity: bool = True,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Export CHECKPOINT into the bundle folder OUT (atomically); returns the manifest written.

    calibration: a LLaVA JSON whose first `calibration_pairs` images (first question and answer each) measure every
    new artifact's fidelity against fp32 PyTorch (export/fidelity.py; default: the checkpoint's training data, else
    the validation text on random images). fidelity=False skips that measurement."""
    checkpoint, out = Path(checkpoint), Path(out)
    _check_options(quants, vision_precisions, dtype)
    started = time.perf_counter()
    from sqllava_edge.checkpoint import read_meta

    meta = read_meta(checkpoint)  # FileNotFoundError / CheckpointError with a clear message
    previous = _previous_bundle(out)
    with step("hashing the source checkpoint", log):
        source = checkpoint_digest(checkpoint)
    wanted = _plan(source, meta, vision_precisions, quants, include_tokenizer, dtype)
    reused = _reusable(previous, out, wanted, log) if reuse else {}
    fidelity_options = {"data": calibration, "n": calibration_pairs} if fidelity else None
    try:
        manifest = _build(checkpoint, out, source, wanted, reused, previous, dtype, log, fidelity_options)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on the device while writing the bundle {out}: free some space "
                                        f"or choose another --out. Nothing was written; any previous bundle there is unchanged") from exc
        raise
    total = time.perf_counter() - started
    log(f"[export] bundle {out} ready: {len(manifest.artifacts)} artifacts ({len(reused)} reused) in {total:.1f} s, "
        f"peak RSS {peak_rss_mib():.0f} MiB")
    return manifest


def _check_options(quants: Sequence[str], precisions: Sequence[str], dtype: str) -> None:
    known = supported_quants()
    unknown = [q for q in quants if q not in known]
    if unknown:
        raise ValueError(f"unknown quant type(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    unknown = [p for p in precisions if p not in VISION_PRECISIONS]
    if unknown:
        raise ValueError(f"unknown vision precision(s) {', '.join(unknown)}; choose from {', '.join(VISION_PRECISIONS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")


def _previous_bundle(out: Path) -> Manifest | None:
    """The manifest already at OUT (for reuse), None if OUT is absent; refuse to replace a folder that is no bundle."""
    if not out.exists():
        return None
    if not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_FILE).is_file()):
        raise ValueError(f"{out} exists and is not a sqllava-edge bundle; remove it or choose another --out")
    try:
        return read_manifest(out, verify=False)
    except BundleError:
        return None  # unreadable or older schema: rebuilt from scratch, replaced on success


def _plan(source: str, meta: dict, precisions, quants, include_tokenizer: bool, dtype: str) -> list[tuple[str, str, str]]:
    """(kind, precision, inputs_key) of every artifact to produce."""
    common = {"source_sha256": source, "config": meta["config"], "dtype": dtype}
    wanted = [("vision_onnx", p, inputs_key(step="vision_onnx", precision=p, tools=tool_versions(*_VISION_TOOLS), **common))
              for p in VISION_PRECISIONS if p in precisions]
    wanted += [("llm_gguf", q, inputs_key(step="llm_gguf", precision=q, tools=tool_versions(*_GGUF_TOOLS), **common))
               for q in dict.fromkeys(quants)]
    if include_tokenizer:
        wanted.append(("tokenizer", "", inputs_key(step="tokenizer", tools=tool_versions("transformers"), **common)))
    return wanted


def _reusable(previous: Manifest | None, out: Path, wanted, log) -> dict[tuple[str, str], Artifact]:
    reused = {}
    for kind, precision, key in wanted:
        old = previous.find(kind, precision) if previous else None
        if old is None or old.inputs_key != key:
            continue
        try:
            old.verify(out)
        except BundleError as exc:
            log(f"[export] not reusing {old.path}: {exc}")
            continue
        reused[(kind, precision)] = old
    return reused


def _build(checkpoint: Path, out: Path, source: str, wanted, reused, previous, dtype: str, log,
           fidelity: dict | None = None) -> Manifest:
    from sqllava_edge.fileutil import atomic_dir

    keys = {(kind, precision): key for kind, precision, key in wanted}
    todo = {kind: [p for k, p, _ in wanted if k == kind and (k, p) not in reused] for kind in KINDS}
    provenance = {"source_checkpoint": str(checkpoint.resolve()), "source_sha256": source,
                  "tools": tool_versions(*dict.fromkeys(_VISION_TOOLS + _GGUF_TOOLS)),
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "reused": sorted(a.path for a in reused.values()), **carried_provenance(checkpoint)}
    artifacts: list[Artifact] = []
    with atomic_dir(out) as tmp:
        os.chmod(tmp, shareable_mode(0o777))  # mkdtemp makes 0700; a bundle is meant to be shared
        for artifact in reused.values():
            _link_files(out, tmp, artifact)
            artifacts.append(artifact)
        tokenizer = _load_tokenizer(checkpoint)
        if todo["vision_onnx"] or todo["llm_gguf"]:
            model, merge_report = _load_merged(checkpoint, dtype, log)
            provenance["merge"] = merge_report
            if todo["vision_onnx"]:
                from export.onnx import export_vision_onnx

                with step(f"vision ONNX {', '.join(todo['vision_onnx'])}", log) as stats:
                    artifacts += export_vision_onnx(model, tmp, todo["vision_onnx"], log=log,
                                                    keys={p: keys["vision_onnx", p] for p in todo["vision_onnx"]})
                provenance["vision_onnx_export"] = stats
            if todo["llm_gguf"]:
                with step(f"GGUF {', '.join(todo['llm_gguf'])}", log) as stats:
                    artifacts += _export_gguf(model, tokenizer, tmp, todo["llm_gguf"], keys, log)
                provenance["gguf_export"] = stats
            if fidelity is not None:
                artifacts = _with_fidelity(model, tokenizer, checkpoint, tmp, artifacts, {a.path for a in reused.values()},
                                           fidelity, log)
            del model
        elif previous is not None and "merge" in previous.provenance:
            provenance["merge"] = previous.provenance["merge"]
        if todo["tokenizer"]:
            tokenizer.save(tmp / "tokenizer")
            files = [p.relative_to(tmp).as_posix() for p in sorted((tmp / "tokenizer").rglob("*")) if p.is_file()]
            artifacts.append(Artifact.from_files(tmp, "tokenizer", "tokenizer", files, "",
                                                 {"vocab_size": tokenizer.vocab_size}, inputs_key=keys["tokenizer", ""]))
        artifacts += _keep_engines(previous, out, tmp, artifacts, log)
        config = _config(checkpoint)
        manifest = base_manifest(config, special_tokens_of(tokenizer), provenance)
        for artifact in sorted(artifacts, key=lambda a: (list(KINDS).index(a.kind), KINDS[a.kind].index(a.precision))):
            manifest.add(artifact)
        write_manifest(tmp, manifest)
        read_manifest(tmp, verify=True)  # every file present and hashed as recorded, before the rename
    return manifest


def _with_fidelity(model, tokenizer, checkpoint: Path, tmp: Path, artifacts: list[Artifact], reused, options: dict,
                   log) -> list[Artifact]:
    """The artifacts with the fidelity of each new vision ONNX / GGUF recorded in its validation (export.fidelity)."""
    from dataclasses import replace

    from export.fidelity import calibration_pairs, measure_fidelity

    new = {a.path for a in artifacts if a.kind in ("vision_onnx", "llm_gguf") and a.path not in reused}
    if not new:
        return artifacts
    with step("fidelity vs fp32 PyTorch", log):
        pairs = calibration_pairs(model.config, tokenizer, checkpoint, options["data"], options["n"])
        records = measure_fidelity(model, tokenizer, tmp, artifacts, pairs, measure=new, log=log)
    return [replace(a, validation={**a.validation, "fidelity": records[a.path]}) if a.path in records else a
            for a in artifacts]


def _keep_engines(previous: Manifest | None, out: Path, tmp: Path, artifacts: list[Artifact], log) -> list[Artifact]:
    """TensorRT engines (built on devices by export.trt) survive a re-export if their fp16 ONNX is unchanged."""
    fp16 = next((a for a in artifacts if a.kind == "vision_onnx" and a.precision == "fp16"), None)
    kept = []
    for engine in previous.find_all("tensorrt_engine") if previous and fp16 else []:
        if engine.inputs_key != fp16.sha256[fp16.path]:
            log(f"[export] dropping {engine.path}: its fp16 ONNX changed; rebuild it with python -m export.trt")
            continue
        try:
            engine.verify(out)
        except BundleError as exc:
            log(f"[export] dropping {engine.path}: {exc}")
            continue
        _link_files(out, tmp, engine)
        kept.append(engine)
    return kept


def _config(checkpoint: Path):
    from sqllava_edge.checkpoint import read_meta
    from sqllava_edge.config import ModelConfig

    return ModelConfig.from_dict(read_meta(checkpoint)["config"])


def _load_tokenizer(checkpoint: Path):
    from sqllava_edge.tokenizer import default_tokenizer, load_tokenizer

    folder = checkpoint / "tokenizer"
    return load_tokenizer(folder) if folder.is_dir() else default_tokenizer()


def _load_merged(checkpoint: Path, dtype: str, log):
    import torch

    from export.merge import merge_model
    from sqllava_edge.checkpoint import load_checkpoint

    with step(f"loading {checkpoint} and merging LoRA", log):
        model, _ = load_checkpoint(checkpoint, dtype=getattr(torch, dtype))
        report = merge_model(model.eval(), log=log)
    return model, report


def _export_gguf(model, tokenizer, tmp: Path, quants: list[str], keys, log) -> list[Artifact]:
    """Call export.gguf (owned by the GGUF work); it returns validated manifest artifact dicts."""
    from export.gguf import export_gguf

    items = export_gguf(model, tokenizer, tmp, quants, keys={q: keys["llm_gguf", q] for q in quants}, log=log)
    artifacts = [item if isinstance(item, Artifact) else Artifact(**item) for item in items]
    for artifact in artifacts:
        artifact.check_schema()
    return artifacts


def _link_files(old_root: Path, new_root: Path, artifact: Artifact) -> None:
    """Reuse an artifact's files: hard links when possible (no copy, no extra disk), else a copy."""
    for name in artifact.files:
        src, dst = old_root / name, new_root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def run_cli(action: Callable[[], object]) -> int:
    """Run an export action; user-facing failures print one clear line and give a non-zero exit code."""
    try:
        action()
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (SQLLaVAError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
