"""What every benchmark shares: a printed table for people, one JSON object as the last line
for machines (``--json``)."""

from __future__ import annotations

import json
import sys


def emit(rows: list[tuple[str, ...]], header: tuple[str, ...], result: dict, as_json: bool) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("{:<%d}" % w for w in widths)
    print(line.format(*header))
    print(line.format(*("-" * w for w in widths)))
    for r in rows:
        print(line.format(*(str(c) for c in r)))
    if as_json:
        sys.stdout.flush()
        print(json.dumps(result, sort_keys=True))


def fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
