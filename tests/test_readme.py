"""The README cannot rot: its CPU smoke block runs as written, and every other command's flags, in README.md and the
docs/ pages (the guides moved there), exist in its --help."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))


def bash_blocks(text: str) -> list[tuple[str, str]]:
    """(marker comment before the block or "", block body) for every ```bash block."""
    pattern = re.compile(r"(?:<!-- ([\w-]+) -->\n)?```bash\n(.*?)```", re.S)
    return [(m.group(1) or "", m.group(2)) for m in pattern.finditer(text)]


def commands(block: str) -> list[list[str]]:
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = line.split("  #")[0].split(" # ")[0].strip()
        if line and not line.startswith("#"):
            out.append(shlex.split(line))
    return out


def to_python(argv: list[str]) -> list[str] | None:
    """README spelling -> an argv runnable with this interpreter, or None for non-Python commands."""
    if argv[0] == "torchrun":
        argv = argv[argv.index("-m"):]
        return [sys.executable] + argv
    if argv[0] in ("python", "python3") and len(argv) > 2 and argv[1] == "-m":
        return [sys.executable] + argv[1:]
    if argv[0] == "sqllava-edge":
        return [sys.executable, "-m", "sqllava_edge.cli"] + argv[1:]
    return None


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_smoke_block_runs_as_written(tmp_path):
    blocks = [body for marker, body in bash_blocks(README) if marker == "smoke-run"]
    assert len(blocks) == 1, "README must hold exactly one <!-- smoke-run --> block"
    for argv in commands(blocks[0]):
        run = to_python(argv)
        assert run is not None, f"not a python command: {argv}"
        result = subprocess.run(run, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{' '.join(argv)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert (tmp_path / "smoke" / "bundle" / "manifest.json").is_file()


def _help_commands() -> list[list[str]]:
    seen, out = set(), []
    for marker, body in bash_blocks("\n".join([README] + [page.read_text() for page in DOC_PAGES])):
        if marker == "smoke-run":
            continue
        for argv in commands(body):
            run = to_python(argv)
            if run is None or run[2] in ("pip",):
                continue
            key = " ".join(run)
            if key not in seen:
                seen.add(key)
                out.append(run)
    return out


def test_docs_commands_are_checked():
    """The flag check reaches the guides: commands that only the docs/ pages show are among those checked."""
    keys = {" ".join(run[2:4]) for run in _help_commands()}
    assert {"benchmarks.soak --seconds", "sqllava_edge.convert --from", "benchmarks.chunked --preset"} <= keys


@pytest.mark.parametrize("run", _help_commands(), ids=lambda r: " ".join(r[2:5]))
def test_documented_flags_exist(run):
    module_end = 4 if run[3:4] and run[2] == "sqllava_edge.cli" else 3
    help_argv = run[:module_end] + ["--help"]
    result = subprocess.run(help_argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in (a.split("=")[0] for a in run[module_end:] if a.startswith("--")):
        assert re.search(rf"{re.escape(flag)}\b", result.stdout), f"README or docs/ uses {flag}, which `{' '.join(help_argv[2:])}` does not know"
