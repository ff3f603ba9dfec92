"""The documentation cited by the README and the docstrings exists: every ``memory-math.md section N`` citation
names a numbered section of docs/memory-math.md, every relative link in README.md and docs/ reaches a file
(and, with an anchor, a heading of that file), and every file of the repository they name by its path exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import ROOT

MEMORY_MATH = ROOT / "docs" / "memory-math.md"
#: "memory-math.md section 5", "memory-math.md sections 1-3", "memory-math.md sections 1.6 and 3.4"
CITATION = re.compile(r"memory-math\.md\S*\s+(?:§|sections?\s+)(\d+(?:\.\d+)?(?:\s*(?:-|and|,)\s*\d+(?:\.\d+)?)*)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
#: a path into the repository, e.g. tests/train/test_distributed.py or benchmarks/RESULTS.md
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:titans_compose|tests|benchmarks|specs|docs|examples)/[\w./-]*\w\.(?:py|md|yaml|json))"
)
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """Markdown without code: fenced blocks, indented blocks and inline code spans (brackets there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = re.sub(r"^    .*$", "", text, flags=re.M)
    return re.sub(r"`[^`]*`", "", text)


def headings(path: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than '-' dropped, spaces as '-'."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def cited_files() -> list[Path]:
    return [
        ROOT / "README.md",
        *sorted((ROOT / "titans_compose").rglob("*.py")),
        *sorted((ROOT / "tests").rglob("*.py")),
    ]


def test_every_memory_math_citation_names_a_section():
    numbers = {h.split(" ", 1)[0].rstrip(".") for h in headings(MEMORY_MATH) if re.match(r"\d", h)}
    citations = []
    for path in cited_files():
        for match in CITATION.finditer(path.read_text()):
            for number in re.findall(r"\d+(?:\.\d+)?", match[1]):
                citations.append((path.relative_to(ROOT), number))
    assert len(citations) >= 15  # the docstrings, the README and the wiring pass's hint cite it
    missing = [(str(path), n) for path, n in citations if n not in numbers]
    assert not missing, f"citations of sections docs/memory-math.md does not have: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_reach_files_and_headings(doc):
    path = ROOT / doc
    for target in LINK.findall(prose(path.read_text())):
        if "://" in target:
            continue
        file, _, fragment = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.is_file(), f"{doc} links to {target}, which does not exist"
        if fragment:
            assert fragment in {anchor(h) for h in headings(linked)}, f"{doc} links to a missing heading: {target}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_repository_path_named_exists(doc):
    named = set(REPO_PATH.findall((ROOT / doc).read_text()))
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert not missing, f"{doc} names files that do not exist: {missing}"
