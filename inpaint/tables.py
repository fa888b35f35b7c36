"""Markdown tables: the one writer behind the evaluation table, a study's results and the benchmarks' output, so
that what they print pastes into docs/ as it is. Cells arrive as text: each caller decides its numbers' digits."""

from __future__ import annotations

from collections.abc import Sequence


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """`header` and `rows` of cells as a Markdown table, a line a row (no newline at the end); a row of another
    length than the header is a ValueError, as it would shift its cells under the wrong columns."""
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row of {len(row)} cells under a header of {len(header)}: {list(row)}")
    lines = ["| " + " | ".join(cells) + " |" for cells in (header, *rows)]
    return "\n".join([lines[0], "|" + "---|" * len(header), *lines[1:]])


def aligned(rows: Sequence[tuple[str, str]]) -> str:
    """`name  value` lines with the values in one column: what a job prints when it ends."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
