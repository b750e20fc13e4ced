"""Every citation of docs/spec.md in the code and the docs names a section (or a section-8 item) that exists there."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "spec.md"
# "docs/spec.md 1.4.2", "docs/spec.md 6.2 / 8.5", "docs/spec.md 2.1-2.2", and messages' "spec 6.1 / 2.1"
CITATION = re.compile(r"(?:docs/spec\.md|\b[Ss]pec)(?: sections?)? (\d+(?:\.\d+)*(?:\s*(?:[-/,]|and)\s*\d+(?:\.\d+)*)*)")


def sections() -> set[str]:
    text = SPEC.read_text()
    found = set(re.findall(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", text, re.M))
    eight = text[text.index("\n## 8. "):]
    found |= {f"8.{n}" for n in re.findall(r"^(\d+)\. ", eight, re.M)}  # the numbered items of section 8
    return found


def cited() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    files = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts] + list((ROOT / "docs").glob("*.md"))
    for path in files + [ROOT / "README.md"]:
        if path == SPEC:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in CITATION.finditer(line):
                for ref in re.split(r"\s*(?:[-/,]|and)\s*", match.group(1)):
                    out.setdefault(ref.rstrip("."), []).append(f"{path.relative_to(ROOT)}:{number}")
    return out


def test_every_spec_citation_names_an_existing_section():
    known = sections()
    assert {"1.4.2", "6.2", "8.15"} <= known  # the parser reads headings and section-8 items
    refs = cited()
    assert len(refs) > 30  # the code cites the spec throughout; an empty scan would prove nothing
    missing = {ref: where[:3] for ref, where in refs.items() if ref not in known}
    assert not missing, f"citations of sections docs/spec.md does not have: {missing}"


def test_the_code_cites_no_document_outside_the_repository():
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in [*ROOT.rglob("*.py"), ROOT / "docs" / "DESIGN.md"]
                 if ".venv" not in p.parts and p != Path(__file__).resolve()
                 for n, line in enumerate(p.read_text().splitlines(), 1) if "sqllava-spec.md" in line]
    assert not offenders, offenders
