"""Printing replies: human tables by default, JSON with --json."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import msgspec


def print_json(value: Any) -> None:
    """Print `value` (a struct or plain data) as indented JSON."""
    print(json.dumps(msgspec.to_builtins(value), indent=2))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print rows under headers in aligned columns."""
    cells = [[str(h).upper() for h in headers]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def print_reply(reply: Any, as_json: bool, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a reply: as JSON with --json, else as `rows` under `headers`."""
    if as_json:
        print_json(reply)
    else:
        print_table(headers, rows)


def fail(message: str, code: int = 1) -> None:
    """Print an error and exit."""
    print(f"edgevm: {message}", file=sys.stderr)
    raise SystemExit(code)
