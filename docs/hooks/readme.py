"""A mkdocs hook: pages take their text from the README (and other files at the top), never a copy.

``<!-- readme: HEADING -->`` on a line of its own is replaced by the README
text under that heading, up to the next heading (so a subsection is
included by its own mark); ``<!-- include: PATH -->`` by the whole file at PATH, relative to
the repository's top. tests/test_docs.py expands pages the same way to run
their code blocks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
_MARK = re.compile(r"^<!-- (readme|include): (.+?) -->$", flags=re.M)
_HEADING = re.compile(r"^(#+) (.*)$")


def section(heading: str, text: str | None = None) -> str:
    """The README's text under ``heading`` up to the next heading, without the heading line; KeyError if none."""
    lines = (text if text is not None else (ROOT / "README.md").read_text()).splitlines()
    fenced, start = False, None
    for n, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        match = None if fenced else _HEADING.match(line)
        if match is None:
            continue
        if start is not None:
            return "\n".join(lines[start:n]).strip() + "\n"
        if match[2] == heading:
            start = n + 1
    if start is None:
        raise KeyError(f"README.md has no heading {heading!r}")
    return "\n".join(lines[start:]).strip() + "\n"


def expand(markdown: str) -> str:
    """``markdown`` with every readme and include mark replaced by the text it names."""

    def replace(match: re.Match[str]) -> str:
        if match[1] == "readme":
            return section(match[2])
        return (ROOT / match[2]).read_text()

    return _MARK.sub(replace, markdown)


def on_page_markdown(markdown: str, **_: Any) -> str:
    return expand(markdown)
