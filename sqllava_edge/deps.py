"""Which extra installs what: a missing optional dependency becomes one line naming the extra, not a traceback.

`pip install 'sqllava-edge[runtime]'` (or `[runtime-gpu]`) installs what a deployed device runs: bundles with
onnxruntime / TensorRT vision and llama.cpp, the CLI and the server, no torch. Training, export, conversion, the torch
backends and the benchmarks' PyTorch baseline need the `train` / `export` extras (pyproject.toml).

    require("torch", "train", "a training checkpoint")   # returns the module, or raises MissingExtraError
    explain(exc)                                         # one line for a ModuleNotFoundError of a known module
    explain_when_run_as_main("export", __name__)         # in a package __init__: `python -m pkg.x` says it in a line
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

from sqllava_edge.errors import SQLLaVAError

# import name -> the extra that installs it (the lightest one that has it)
EXTRA_OF = {
    "torch": "train", "transformers": "train", "peft": "train", "accelerate": "train", "matplotlib": "train",
    "safetensors": "train", "onnx": "export", "onnxscript": "export", "gguf": "export", "sentencepiece": "export",
    "onnxruntime": "runtime", "llama_cpp": "runtime", "tokenizers": "runtime", "fastapi": "runtime",
    "uvicorn": "runtime", "prometheus_client": "runtime", "av": "video",
}


class MissingExtraError(SQLLaVAError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def install_hint(module: str, extra: str | None = None) -> str:
    extra = extra or EXTRA_OF.get(module.split(".")[0], "cpu")
    return f"pip install 'sqllava-edge[{extra}]'"


def require(module: str, extra: str | None, what: str) -> ModuleType:
    """Import `module` for `what`, or raise MissingExtraError saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if getattr(exc, "name", None) not in (None, module.split(".")[0], module):
            raise  # the module is there but one of *its* imports failed: a broken install, show everything
        raise MissingExtraError(f"{what} needs {module.split('.')[0]}, which is not installed; "
                                f"{install_hint(module, extra)}") from None


def explain(exc: BaseException, what: str = "this", extra: str | None = None) -> str | None:
    """The one-line message for a ModuleNotFoundError of a module some extra installs; None for anything else.
    `extra` overrides the table for the training/export dependencies (a package knows which of its extras it is)."""
    if isinstance(exc, MissingExtraError):
        return str(exc)
    top = (getattr(exc, "name", None) or "").split(".")[0]
    if not isinstance(exc, ModuleNotFoundError) or top not in EXTRA_OF:
        return None
    extra = extra if extra and EXTRA_OF[top] in ("train", "export") else None
    return f"{what} needs {top}, which is not installed; {install_hint(top, extra)}"


def explain_when_run_as_main(extra: str, package: str) -> None:
    """Called by a package's __init__ (`package` is its __name__): when it is being run with `python -m
    package[.module]` (runpy sets sys.argv[0] to "-m" while it imports the package), a missing dependency of the
    module that runs ends the process with one line naming `extra` instead of a traceback. Imported as a library,
    nothing changes."""
    if sys.argv[:1] != ["-m"]:
        return
    previous = sys.excepthook

    def hook(kind, exc, tb):
        message = explain(exc, f"python -m {_running_module(package)}", extra)
        if message is None:
            return previous(kind, exc, tb)
        print(f"error: {message}", file=sys.stderr)

    sys.excepthook = hook


def _running_module(package: str) -> str:
    """The dotted name of the module runpy runs (sys.argv[0] is its file by now)."""
    root = Path(sys.modules[package].__file__).parent
    try:
        parts = Path(sys.argv[0]).resolve().relative_to(root.resolve()).with_suffix("").parts
    except ValueError:
        return package
    return ".".join([package, *(p for p in parts if p != "__main__")])
