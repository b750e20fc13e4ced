"""sqllava-edge: SQ-LLaVA from training to edge deployment.

`from sqllava_edge import Assistant` is the public entry point. Heavy dependencies (torch, onnxruntime, llama_cpp,
tensorrt) load lazily, so importing the package itself needs only the standard library.
"""
from __future__ import annotations

from sqllava_edge.deps import explain_when_run_as_main
from sqllava_edge.version import __version__

__all__ = ["Assistant", "__version__"]


def __getattr__(name: str):
    if name == "Assistant":
        from sqllava_edge.assistant import Assistant

        return Assistant
    raise AttributeError(f"module 'sqllava_edge' has no attribute {name!r}")


explain_when_run_as_main("export", __name__)  # `python -m sqllava_edge.convert` without torch: one line naming the extra
