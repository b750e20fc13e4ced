"""MkDocs hook: links from docs/ pages to repository files outside docs/ (benchmarks/RESULTS.md, sources).

MkDocs only knows the files under docs_dir, so it reports `../benchmarks/RESULTS.md` as not found although the
file is in the repository (and the link works where the Markdown is read in place). This hook checks each such link
against the repository itself: a link to an existing file becomes a link to it on `repo_url` (the plain path in
code font when mkdocs.yml sets no repo_url); a link to a missing file is a warning, which `mkdocs build --strict`
turns into a failed build.
"""
from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.repo_links")
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def _outside(page_uri: str, target: str) -> str | None:
    """The repository path a relative link leaves docs_dir for, or None when it stays inside (or is not relative)."""
    if re.match(r"^[a-z][a-z0-9+.-]*:|^/|^#", target):
        return None
    path = posixpath.normpath(posixpath.join(posixpath.dirname(page_uri), target.split("#")[0]))
    return path[3:] if path.startswith("../") else None


def on_page_markdown(markdown: str, page, config, files):
    repo = Path(config["docs_dir"]).resolve().parent
    repo_url = (config.get("repo_url") or "").rstrip("/")

    def rewrite(match: re.Match) -> str:
        bang, text, target = match.groups()
        path = _outside(page.file.src_uri, target)
        if path is None:
            return match.group(0)
        if not (repo / path).exists():
            log.warning("Doc file '%s' links to '%s', which is not in the repository", page.file.src_uri, target)
            return match.group(0)
        if repo_url:
            return f"{bang}[{text}]({repo_url}/blob/main/{path})"
        return f"`{path}`" if text.strip("`") == path else f"{text} (`{path}`)"

    return LINK.sub(rewrite, markdown)
