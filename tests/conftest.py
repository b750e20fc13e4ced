"""Session-wide fixtures shared by several test files."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A random-weight tiny bundle (fp32 vision ONNX, f32 GGUF), exported once per session (tests/serve_helpers.py),
    or the one $SQLLAVA_EDGE_TEST_BUNDLE names (.ci/runtime-venv: an environment without torch cannot export)."""
    if os.environ.get("SQLLAVA_EDGE_TEST_BUNDLE"):
        return Path(os.environ["SQLLAVA_EDGE_TEST_BUNDLE"])
    for module in ("onnxruntime", "llama_cpp"):
        try:
            __import__(module)
        except (ImportError, OSError):
            pytest.skip(f"a bundle needs {module} (pip install '.[cpu]')")
    from tests.serve_helpers import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("tiny"))


# Measured backend selection (runtimes.tune) times every option on a bundle's first load; the suite uses the
# rule-based order (tests/test_tune.py turns it back on where it is the subject). Set before any test runs, so
# subprocesses (CLI, server) inherit it.
os.environ["SQLLAVA_EDGE_TUNE"] = "0"
