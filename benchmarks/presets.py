"""Random-weight artifacts for `python -m benchmarks --preset NAME`, built once and cached by content.

    checkpoint, bundle = ensure_preset("bench-1b")   # $SQLLAVA_EDGE_CACHE/bench/bench-1b-<key>/{checkpoint,bundle}

The cache key is a sha256 over the preset's full model config, the weight seed, the export options and the versions
of every tool that shapes the artifacts; a cached folder is used only if its build record matches the key and the
bundle's files still match their sha256 in the manifest (a half-built or tampered folder is rebuilt, never trusted).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from sqllava_edge.config import get_preset
from sqllava_edge.errors import BundleError
from sqllava_edge.fileutil import atomic_dir, atomic_write

CACHE_ENV = "SQLLAVA_EDGE_CACHE"
BUILD_VERSION = 1  # bump when what a preset build produces changes for the same key
WEIGHT_SEED = 0
RECORD = "build.json"
# What each preset exports: bench-1b's acceptance setting is q4_k_m; fp32 vision is the parity
# reference and int8 the CPU choice (fp16 is for GPUs, built on demand with --vision-precision).
EXPORTS = {"bench-1b": {"quants": ["q4_k_m"], "vision_precisions": ["fp32", "int8"]},
           "tiny": {"quants": ["q4_k_m"], "vision_precisions": ["fp32", "int8"]}}
CALIBRATION_PAIRS = 4  # fidelity vs fp32 at export (the speed-vs-quality chart); random weights: the numbers are noise
_TOOLS = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "gguf", "llama_cpp_python", "numpy")


def cache_root() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "sqllava-edge")
    return Path(base) / "bench"


def preset_key(name: str, quants: list[str], vision_precisions: list[str]) -> str:
    from export import EXPORT_CODE_VERSION, tool_versions

    blob = {"preset": name, "config": get_preset(name).to_dict(), "seed": WEIGHT_SEED, "build_version": BUILD_VERSION,
            "export_code_version": EXPORT_CODE_VERSION, "calibration_pairs": CALIBRATION_PAIRS, "quants": sorted(quants),
            "vision_precisions": sorted(vision_precisions), "tools": tool_versions(*_TOOLS)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _cached(folder: Path, key: str) -> bool:
    from sqllava_edge.bundle import read_manifest

    record = folder / RECORD
    if not record.is_file():
        return False
    try:
        if json.loads(record.read_text()).get("key") != key:
            return False
        read_manifest(folder / "bundle", verify=True)
    except (json.JSONDecodeError, OSError, BundleError):
        return False
    return (folder / "checkpoint" / "sqllava_edge.json").is_file()


def ensure_preset(name: str, quants: list[str] | None = None, vision_precisions: list[str] | None = None,
                  log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """(checkpoint folder, bundle folder) of the preset's random-weight model, building them if not cached."""
    get_preset(name)  # ValueError listing the valid presets
    defaults = EXPORTS.get(name, EXPORTS["bench-1b"])
    quants = list(quants or defaults["quants"])
    vision_precisions = list(vision_precisions or defaults["vision_precisions"])
    key = preset_key(name, quants, vision_precisions)
    folder = cache_root() / f"{name}-{key[:16]}"
    if _cached(folder, key):
        log(f"[bench] using cached {name} artifacts in {folder}")
        return folder / "checkpoint", folder / "bundle"
    log(f"[bench] building {name} random-weight artifacts into {folder} (once; later runs reuse them)")
    with atomic_dir(folder) as tmp:
        _run([sys.executable, "-m", "benchmarks.presets", name, str(tmp / "checkpoint")])
        _run([sys.executable, "-m", "export", str(tmp / "checkpoint"), "--out", str(tmp / "bundle"),
              "--quant", *quants, "--vision-precision", *vision_precisions,
              "--calibration-pairs", str(CALIBRATION_PAIRS)])
        # The bundle's provenance names the temporary checkpoint path; the record names the final one.
        with atomic_write(tmp / RECORD, "w") as handle:
            json.dump({"key": key, "preset": name, "quants": quants, "vision_precisions": vision_precisions,
                       "seed": WEIGHT_SEED}, handle, indent=2)
    remove_stale(folder, log)
    return folder / "checkpoint", folder / "bundle"


def _run(cmd: list[str]) -> None:
    log_cmd = " ".join(cmd[1:])
    # stdout carries the benchmark report: the build's own output goes to stderr with our other progress lines
    result = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], stdout=sys.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"building the preset failed: `python {log_cmd}` exited with {result.returncode} (see above)")


def write_random_checkpoint(name: str, folder: str | os.PathLike) -> Path:
    """SQLLaVA.from_config(preset, seed) saved as a checkpoint folder (no tokenizer: export uses the default one)."""
    from sqllava_edge.checkpoint import save_checkpoint
    from sqllava_edge.model import SQLLaVA

    model = SQLLaVA.from_config(get_preset(name), seed=WEIGHT_SEED).eval()
    return save_checkpoint(folder, model, provenance={"random_weights": True, "preset": name, "seed": WEIGHT_SEED})


def remove_stale(keep: Path, log: Callable[[str], None] = print) -> None:
    """Delete builds of the same preset under other keys (older tool versions): each holds gigabytes."""
    name = keep.name[: -17]  # "<preset>-<16 hex>"
    for other in keep.parent.iterdir():
        if other != keep and other.is_dir() and other.name[:-17] == name and len(other.name) == len(keep.name):
            log(f"[bench] removing stale build {other}")
            shutil.rmtree(other, ignore_errors=True)


if __name__ == "__main__":  # python -m benchmarks.presets PRESET CHECKPOINT_DIR (called by ensure_preset)
    write_random_checkpoint(sys.argv[1], sys.argv[2])
