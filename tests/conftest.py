"""Session-wide fixtures shared by several test files."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A random-weight tiny bundle (fp32 vision ONNX, f32 GGUF), exported once per session (tests/serve_helpers.py)."""
    for module in ("onnxruntime", "llama_cpp"):
        try:
            __import__(module)
        except (ImportError, OSError):
            pytest.skip(f"a bundle needs {module} (pip install '.[cpu]')")
    from tests.serve_helpers import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("tiny"))
