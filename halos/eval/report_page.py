"""leaderboard.md as reStructuredText (leaderboard.rst beside it), for the landing page of
Snakemake's HTML report: `snakemake --report report.html` renders its page from RST
(rules/report.rst includes this file and embeds the plots), not from Markdown.

Only the Markdown `halos report` writes is converted: headings, paragraphs with `code`,
**bold** and _italic_, pipe tables (which become list-tables) and images, embedded as data URIs
so that report.html stays whole wherever it is copied (Snakemake's own `embeddedimage`
directive leaves the file path in).
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

_CODE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
_ITALIC = re.compile(r"(?<![\w*])_([^_|]+?)_(?!\w)")
_IMAGE = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<path>[^)]+)\)")
_UNDERLINES = {1: "-", 2: "~", 3: "^"}  # under the page's own title (=)


def inline(text: str) -> str:
    """Markdown inline markup -> RST: `x` -> ``x``, _x_ -> *x* (**x** is the same)."""
    return _ITALIC.sub(r"*\1*", _CODE.sub(r"``\1``", text))


def list_table(lines: list[str]) -> list[str]:
    """A Markdown pipe table (header, separator, rows) -> an RST list-table."""
    rows = [[inline(c.strip()) for c in line.strip().strip("|").split("|")]
            for i, line in enumerate(lines) if i != 1]
    out = ["", ".. list-table::", "   :header-rows: 1", "   :class: leaderboard", ""]
    for row in rows:
        out += [("   * - " if i == 0 else "     - ") + cell for i, cell in enumerate(row)]
    return [line.rstrip() for line in out] + [""]


def heading(line: str) -> list[str]:
    level = len(line) - len(line.lstrip("#"))
    title = inline(line[level:].strip())
    return ["", title, _UNDERLINES.get(level, "^") * len(title), ""]


def image(line: str, folder: Path) -> list[str]:
    """![alt](plots/x.png), relative to the Markdown file's folder -> an embedded image."""
    match = _IMAGE.match(line)
    data = base64.encodebytes((folder / match["path"]).read_bytes()).decode().split()
    # The URI continues on indented lines (docutils joins them; it limits a line's length).
    return ["", ".. image:: data:image/png;base64,", *(f"   {chunk}" for chunk in data),
            f"   :alt: {match['alt']}", "   :class: plot", ""]


def markdown_to_rst(markdown: str, folder: Path) -> str:
    """`folder`: where the Markdown file is (its images are relative to it)."""
    out: list[str] = []
    table: list[str] = []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            out += list_table(table)
            table = []
        if line.startswith("#"):
            out += heading(line)
        elif _IMAGE.match(line):
            out += image(line, folder)
        else:
            out.append(inline(line))
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out))
    return text.strip() + "\n"
