"""Where a benchmark writes its table in docs/BENCHMARKS.md, leaving the prose around it alone.

Two shapes, one per kind of benchmark page:

- a *region*: the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` is replaced, so
  hand-written analysis above and below a table survives a re-run (the markers are appended,
  under ``section`` when the page lacks it, the first time);
- a *section*: a whole ``## Heading`` up to the next ``## `` is the benchmark's own output and is
  replaced (inserted after ``after``'s section, or at the end, the first time).
"""

from __future__ import annotations

import os
import re

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "BENCHMARKS.md")


def _read(path: str) -> str:
    return open(path).read() if os.path.exists(path) else "# Benchmarks\n"


def write_doc_region(region: str, text: str, path: str = DOC, section: str | None = None) -> None:
    begin, end = f"<!-- {region}:begin -->", f"<!-- {region}:end -->"
    doc = _read(path)
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        doc = head + block + rest.split(end, 1)[1]
    else:
        if section is not None and section not in doc:
            doc = doc.rstrip("\n") + f"\n\n{section}\n"
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        handle.write(doc)


def _section_pattern(heading: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)


def write_doc_section(markdown: str, section: str, path: str = DOC, after: str | None = None) -> str:
    """Replace the section headed ``section`` (``markdown`` starts with that heading); returns the path."""
    doc = _read(path)
    own = _section_pattern(section)
    if own.search(doc):
        doc = own.sub(lambda _: markdown, doc)
    else:
        previous = _section_pattern(after).search(doc) if after else None
        at = previous.end() if previous else len(doc)
        doc = doc[:at].rstrip("\n") + "\n\n" + markdown + ("\n" + doc[at:] if doc[at:] else "")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        handle.write(doc)
    return path
