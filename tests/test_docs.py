"""The user docs: measured tables match tools/results/*.json, relative links resolve, the README stays short."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import results_doc  # noqa: E402

MARKDOWN = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "runtime_ops" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings (outside code blocks)."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


@pytest.mark.parametrize("path", results_doc.DOCS, ids=lambda p: p.name)
def test_generated_tables_match_the_json(path):
    """Run `python tools/results_doc.py` after changing tools/results/*.json (or the doc's markers)."""
    text = path.read_text()
    assert results_doc.render(text) == text, f"{path.relative_to(REPO)} is stale: run python tools/results_doc.py"


def test_every_section_is_used_once_and_every_results_file_is_shown():
    names = [n for p in results_doc.DOCS for n in results_doc.block_names(p.read_text())]
    assert sorted(names) == sorted(results_doc.SECTIONS)
    shown = "".join(p.read_text() for p in results_doc.DOCS)
    unused = {"onnx-speed.json", "bench-scale-exports.json", "bench-scale-rtn.json"}  # earlier runs, superseded
    for f in sorted((REPO / "tools" / "results").glob("*.json")):
        assert f.name in unused or f"tools/results/{f.name}" in shown, f"{f.name} is in no generated table"


def test_render_replaces_only_the_block_and_refuses_unknown_names():
    text = "hand\n<!-- generated:quarot -->\nold figures\n<!-- end:quarot -->\nhand again\n"
    new = results_doc.render(text)
    assert new.startswith("hand\n<!-- generated:quarot -->\n| configuration |") and new.endswith(
        "<!-- end:quarot -->\nhand again\n") and "old figures" not in new
    with pytest.raises(KeyError):
        results_doc.render("<!-- generated:nope -->\n<!-- end:nope -->\n")


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_existing_files(path):
    for target in LINK.findall(re.sub(r"```.*?```", "", path.read_text(), flags=re.S)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{path.relative_to(REPO)} links to missing {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{path.relative_to(REPO)} links to missing heading {target}"


def test_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 300
