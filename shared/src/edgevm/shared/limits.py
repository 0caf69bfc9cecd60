"""The limits every request lives within (docs/protocol.md, Limits), and bounded excerpts of bad values.

An error message never repeats a bad value whole: a 1 MB string would make a 2 MB reply (body and header),
which NATS refuses. `excerpt` quotes its first EXCERPT_CHARS characters and says how long it was.
"""

from __future__ import annotations

import re
from typing import Any

# A request body larger than this is refused before it is decoded (413). 1 MiB is NATS's default
# max_payload, so a request that works against the embedded server works against any NATS server too.
MAX_REQUEST_BYTES = 1024 * 1024
# The deepest nesting of JSON (or YAML) a request may hold, in objects and arrays counted from the body.
MAX_DEPTH = 32
# The longest a bad value is quoted in an error message, and the longest an error message or field gets.
EXCERPT_CHARS = 64
MAX_ERROR_MESSAGE = 1024
MAX_ERROR_FIELD = 256
# The most entries of each list in a VmSpec or a command.
MAX_VOLUMES = 64
MAX_PORT_MAPPINGS = 256
MAX_VIRTUAL_NETWORKS = 32
MAX_VIRTUAL_INTERFACES = 32
MAX_PEERS = 256
# The largest size (memory, a volume) a request may give: 1 PiB.
MAX_SIZE_BYTES = 1024**5
# The most entries one page of a paged listing (vm.list, gw.vm.list with `limit`) asks for.
MAX_PAGE = 1000


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """Return `value` quoted for an error message: whole when short, else its start and its length."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def clip(text: str, limit: int) -> str:
    """Return `text` cut to at most `limit` characters, saying it was cut."""
    if len(text) <= limit:
        return text
    tail = f"... ({len(text)} characters)"
    return text[: max(0, limit - len(tail))] + tail


def depth_of(value: Any, limit: int = MAX_DEPTH) -> int:
    """Return how deep `value` (decoded JSON or YAML) nests, counting up to `limit` + 1 and no further."""
    return shape_of(value, limit)[0]


def shape_of(value: Any, limit: int = MAX_DEPTH) -> tuple[int, int]:
    """Return how deep `value` (decoded JSON or YAML) nests, counting up to `limit` + 1 and no further, and how
    many values it holds when every shared value (a YAML alias) is counted once per reference.

    Linear in the distinct values, however they are shared: YAML aliases make a graph whose expansion is
    exponential in its size ("billion laughs": 9 aliases of 9 aliases ... is 9**10 values in 900 bytes), and a
    walk of the expansion would hold the service's event loop for minutes. One level at a time, each distinct
    value once per level, with the number of references that reach it.
    """
    level: dict[int, tuple[Any, int]] = {id(value): (value, 1)}
    depth = values = 0
    while level:
        below: dict[int, tuple[Any, int]] = {}
        nested = False
        for item, count in level.values():
            values += count
            if isinstance(item, dict):
                children: Any = item.values()
            elif isinstance(item, list):
                children = item
            else:
                continue
            nested = True
            for child in children:
                seen = below.get(id(child))
                below[id(child)] = (child, count + (seen[1] if seen else 0))
        if nested:
            depth += 1
            if depth > limit:
                return depth, values
        level = below
    return depth, values


_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{},:]', re.S)


def too_deep_at(data: bytes, limit: int = MAX_DEPTH) -> str | None:
    """Return the JSON path (`a.b[2]`) of the first array or object of JSON `data` that nests deeper than
    `limit`, "" when it is the body itself, or None when nothing does. Only tokens are read, never decoded.
    """
    # Each frame: [is_object, key or index, last string seen].
    frames: list[list[Any]] = []
    for match in _TOKEN.finditer(data):
        token = match.group()
        if token in (b"{", b"["):
            if len(frames) >= limit:
                return _path(frames)
            frames.append([token == b"{", 0, None])
        elif token in (b"}", b"]"):
            if frames:
                frames.pop()
        elif not frames:
            continue
        elif token == b",":
            if not frames[-1][0]:
                frames[-1][1] += 1
        elif token == b":":
            frames[-1][1] = frames[-1][2]
        else:
            frames[-1][2] = token[1:-1].decode("utf-8", "replace")
    return None


def _path(frames: list[list[Any]]) -> str:
    return "".join(f".{key}" if is_object else f"[{key}]" for is_object, key, _ in frames).lstrip(".")
