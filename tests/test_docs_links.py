"""Every relative link and image in the Markdown docs points at a file of the repository.

The benchmark report links plots under ``benchmarks/results-full/``; a report whose plots sit in an ignored folder
reads fine on the machine that made it and is broken in every clone. CI runs from a clean clone, so a link to a
file that is not committed fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted((ROOT / "integrations").rglob("*.md"))
    return [f for f in files if f.is_file()]


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)  # code blocks hold no links
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_the_link_pattern_finds_links_and_images(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "See [method](docs/method.md), ![plot](../plots/a.png), [web](https://x.org), [top](#top).\n"
        "```\n[not a link](nowhere.md)\n```\n"
    )
    assert relative_links(page) == ["docs/method.md", "../plots/a.png"]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    missing = [t for t in relative_links(path) if not (path.parent / t.split("#")[0]).exists()]
    assert not missing, f"{path.relative_to(ROOT)} links to files that are not in the repository: {missing}"
