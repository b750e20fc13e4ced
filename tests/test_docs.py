"""The documentation site builds with `mkdocs build --strict` (a broken link or anchor, a page missing from the nav,
or an API-reference entry naming a class or function that does not exist fails it), and the relative links of README
and the RESULTS notes point at files that exist."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")


def relative_links(text: str) -> list[str]:
    """Every link and image target in Markdown text that is a path (no scheme, not an in-page anchor)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold examples, not links
    targets = [a or b for a, b in LINK.findall(text)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:|^#", t)]


def test_relative_links_finds_links_and_images_but_not_urls():
    text = ('[a](docs/x.md#part) ![b](docs/y.png) [c](https://example.org/z) [d](#here) <img src="docs/w.png" alt="">\n'
            "```python\nprint([e](not/a/link.md))\n```\n")
    assert relative_links(text) == ["docs/x.md#part", "docs/y.png", "docs/w.png"]


def test_readme_relative_links_point_at_files():
    links = relative_links((ROOT / "README.md").read_text())
    assert len(links) >= 10  # README links every docs page; none found would mean the parser is broken
    missing = [link for link in links if not (ROOT / link.split("#")[0]).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


@pytest.mark.parametrize("notes", ["training/RESULTS.md", "benchmarks/RESULTS.md"])
def test_results_notes_relative_links_point_at_files(notes):
    page = ROOT / notes  # outside the site: mkdocs does not check these
    links = relative_links(page.read_text())
    assert links, f"{notes} links its plots; none found would mean the parser is broken"
    missing = [link for link in links if not (page.parent / link.split("#")[0]).exists()]
    assert not missing, f"{notes} links to files that do not exist: {missing}"


def test_every_docs_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert "index.md" in pages and "api.md" in pages
    assert not [p for p in pages if f": {p}" not in nav], "every docs/*.md page belongs in mkdocs.yml's nav"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
                    reason="mkdocs and mkdocstrings are not installed (pip install -e '.[dev]')")
def test_site_builds_strict(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                             str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1", "HOME": str(tmp_path)})
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("sqllava_edge.assistant.Assistant.load", "sqllava_edge.assistant.Chat.ask",
                 "sqllava_edge.generation.GenerationConfig", "runtimes.loader.Backends"):
        assert f'id="{name}"' in api, f"the API reference lost {name}"
    assert (tmp_path / "site" / "web-desktop.png").is_file()  # images under docs/ are published beside the pages
