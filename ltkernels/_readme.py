"""Rewriting a generated block of a Markdown file: the tables that the benchmarks and the digits comparison
put into README.md between a pair of HTML-comment markers."""
from __future__ import annotations

import os
from typing import Union


def replace_marked_block(path: Union[str, os.PathLike], start: str, end: str, body: str) -> bool:
    """Writes ``start``, a newline, ``body``, a newline and ``end`` in place of the file's block from ``start``
    to ``end``, keeping what stands around it. Returns False, leaving the file untouched, when either marker
    is missing."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{start}\n{body}\n{end}{tail}")
    return True
