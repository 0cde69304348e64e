"""Shared by the benchmark scripts: replace one marked section of docs/benchmarks.md."""

from __future__ import annotations

import os

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "benchmarks.md")


def write_section(name: str, lines: list[str], path: str = DOC) -> None:
    """Put `lines` between `<!-- bench:NAME:begin/end -->` markers, replacing what was there."""
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    block = "\n".join([begin, *lines, end])
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)
