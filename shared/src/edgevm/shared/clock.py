"""Wall-clock times as the protocol writes them: RFC 3339 UTC strings."""

from __future__ import annotations

from datetime import UTC, datetime


def now() -> str:
    """Return the current time as an RFC 3339 UTC string with milliseconds, e.g. 2026-11-27T21:04:05.123Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
